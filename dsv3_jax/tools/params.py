"""Parameter counts of a preset from abstract shapes.

    python -m dsv3_jax.tools.params PRESET [key=value ...]
"""

from __future__ import annotations

import json
import sys

from dsv3_jax.errors import ConfigError, print_error
from dsv3_jax.model.params import count_params, human
from dsv3_jax.presets import load_config


def main(argv: list[str]) -> int:
    """Print the counts of a preset (with overrides) as JSON and one summary line; bad input: one line, status 2."""
    if not argv:
        print("usage: python -m dsv3_jax.tools.params PRESET [key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        return print_error(e)
    counts = count_params(cfg.model)
    print(json.dumps(counts, indent=2))
    print(f"{argv[0]}: {human(counts['total'])} total, {human(counts['activated'])} activated per token; "
          f"MTP {human(counts['mtp_total'])} ({human(counts['mtp_with_shared_embed_head'])} with its embedding and "
          f"head copies)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
