"""Helpers the tests' subprocess scripts import (xla_env.env puts the repository root on their path)."""

import traceback


def outcome(check, *args) -> str:
    """Run one check of a subprocess script: "ok", or the end of its traceback, so that one script can report
    many checks and each test asserts its own."""
    try:
        check(*args)
        return "ok"
    except Exception:
        return traceback.format_exc()[-3000:]
