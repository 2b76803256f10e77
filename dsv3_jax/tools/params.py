"""Parameter counts of a preset from abstract shapes.

    python -m dsv3_jax.tools.params PRESET [key=value ...]
"""

from __future__ import annotations

import sys

from dsv3_jax.errors import UsageError, run_command


def main(argv: list[str] | None = None) -> int:
    """Print the counts of a preset (with overrides) as JSON and one summary line; bad input: one line, status 2."""
    return run_command(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__.strip())
            return 0
        raise UsageError("usage: python -m dsv3_jax.tools.params PRESET [key=value ...]")
    import json

    from dsv3_jax.model.params import count_params, human
    from dsv3_jax.presets import load_config

    cfg = load_config(argv[0], argv[1:])
    counts = count_params(cfg.model)
    print(json.dumps(counts, indent=2))
    print(f"{argv[0]}: {human(counts['total'])} total, {human(counts['activated'])} activated per token; "
          f"MTP {human(counts['mtp_total'])} ({human(counts['mtp_with_shared_embed_head'])} with its embedding and "
          f"head copies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
