"""Parameter counts from abstract shapes (nothing is allocated): total, activated per token, main model and MTP.

    python -m dsv3_jax.params PRESET [key=value ...]
"""

from __future__ import annotations

import json
import math
import sys

import jax
from flax import nnx

from dsv3_jax.config import ConfigError, ModelConfig, load_config, print_error
from dsv3_jax.model import Transformer


def _path_str(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def count_params(cfg: ModelConfig) -> dict:
    """Counts in parameters. Activated = the weights a token multiplies: everything except the routed experts it
    does not use (K of E per MoE layer) and the input embedding table (a lookup, one row per token); the output
    head counts. `activated_with_embedding` adds the table back."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    main = mtp = main_routed = mtp_routed = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _path_str(path)
        n = math.prod(leaf.shape)
        routed = any(f"mlp/{w}" in name for w in ("w_gate", "w_up", "w_down"))
        if name.startswith("mtp/"):
            mtp += n
            mtp_routed += n * routed
        else:
            main += n
            main_routed += n * routed
    unused = 1 - cfg.num_experts_per_tok / cfg.n_routed_experts
    embed = cfg.vocab_size * cfg.hidden_size
    shared_tensors = 2 * embed  # embedding + head, stored again in the MTP layer of the HF format
    return {
        "total": main,
        "activated": round(main - main_routed * unused) - embed,
        "activated_with_embedding": round(main - main_routed * unused),
        "mtp_total": mtp,
        "mtp_activated": round(mtp - mtp_routed * unused),
        "mtp_with_shared_embed_head": mtp + shared_tensors * bool(cfg.num_nextn_predict_layers),
        "total_with_mtp": main + mtp,
    }


def human(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main(argv: list[str]) -> int:
    """Print the counts of a preset (with overrides) as JSON and one summary line; bad input: one line, status 2."""
    if not argv:
        print("usage: python -m dsv3_jax.params PRESET [key=value ...]", file=sys.stderr)
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
