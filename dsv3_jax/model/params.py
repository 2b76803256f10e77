"""Parameter counts from abstract shapes (nothing is allocated): total, activated per token, main model and MTP."""

from __future__ import annotations

import math

import jax
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.transformer import Transformer


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
