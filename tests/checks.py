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


def packed_rows(rng, rows: int, seq: int, vocab: int = 258, cut: int = 9) -> dict:
    """A packed batch (rows, seq + 1) for the scripts' train steps: random tokens, two documents per row split at
    `cut`, padding at the end of the last row."""
    import numpy as np

    tokens = rng.integers(2, vocab, size=(rows, seq + 1)).astype(np.int32)
    seg = np.ones((rows, seq + 1), np.int32)
    seg[:, cut:] = 2
    seg[-1, -3:] = 0
    pos = np.tile(np.arange(seq + 1, dtype=np.int32), (rows, 1))
    pos[:, cut:] -= cut
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}
