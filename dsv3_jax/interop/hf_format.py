"""The HF DeepSeek-V3 key layout: one Entry per checkpoint tensor, saying which part of which of our leaves it fills.

Torch stores linear weights [out, in]; ours are [in, out] with per-head dims split out and layers stacked into the
dense / MoE stacks. `load`, `save` (interop/hf.py) and the sliced loader (interop/hf_sliced.py) all read this map.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

_MAX_LISTED = 6


F8_DTYPE = "F8_E4M3"


SCALE_SUFFIX = "_scale_inv"


LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


class Target(NamedTuple):
    path: tuple  # flat-state path of our leaf
    index: tuple  # leading indices into the leaf (layer, expert)
    to_ours: Callable[[np.ndarray], np.ndarray]  # torch-layout array -> leaf[index]


class Entry(NamedTuple):
    key: str
    shape: tuple[int, ...]  # HF (torch) shape
    targets: tuple[Target, ...]
    to_hf: Callable[[np.ndarray], np.ndarray] | None  # leaf[index] -> torch layout (single-target entries)


def same(a):
    return a


def transpose(a):
    return a.T


def _rope_rows(lead: int, rope: int, interleave: bool) -> np.ndarray:
    """Row order that keeps the first `lead` rows and de-interleaves the `rope` rows after them."""
    order = np.arange(rope)
    if interleave:
        order = np.concatenate([order[0::2], order[1::2]])
    return np.concatenate([np.arange(lead), lead + order])


def _linear(rows: np.ndarray | None = None):
    """torch [out, in] -> ours [in, out], reordering the out rows first."""
    inv = None if rows is None else np.argsort(rows)
    return ((lambda a: a[rows].T) if rows is not None else transpose,
            (lambda w: w.T[inv]) if rows is not None else transpose)


def _heads_out(h: int, rows: np.ndarray | None = None):
    """torch [h*k, in] -> ours [in, h, k] (per-head outputs), with per-head row reordering."""
    inv = None if rows is None else np.argsort(rows)

    def to_ours(a):
        a = a.reshape(h, -1, a.shape[-1])
        return (a if rows is None else a[:, rows]).transpose(2, 0, 1)

    def to_hf(w):
        a = w.transpose(1, 2, 0)
        return (a if inv is None else a[:, inv]).reshape(-1, w.shape[0])

    return to_ours, to_hf


def _heads_in(h: int):
    """torch [D, h*v] -> ours [h, v, D] (per-head inputs)."""
    return (lambda a: a.T.reshape(h, -1, a.shape[0])), (lambda w: w.reshape(-1, w.shape[-1]).T)


def _block_entries(cfg, prefix: str, path: tuple, idx: tuple, moe: bool, fused: bool, interleave: bool):
    """Entries of one decoder layer `prefix` (e.g. "model.layers.3.") stored at our `path`[idx]."""
    d, h, c, r = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    k, n, v = cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    out = []

    def add(name, shape, sub, fns):
        out.append(Entry(prefix + name, shape, (Target(path + sub, idx, fns[0]),), fns[1]))

    identity = (same, same)
    add("input_layernorm.weight", (d,), ("attn_norm", "weight"), identity)
    add("post_attention_layernorm.weight", (d,), ("mlp_norm", "weight"), identity)
    q_heads = _heads_out(h, _rope_rows(n, r, interleave))
    if cfg.q_lora_rank is None:
        add("self_attn.q_proj.weight", (h * k, d), ("attn", "q_proj", "weight"), q_heads)
    else:
        q = cfg.q_lora_rank
        add("self_attn.q_a_proj.weight", (q, d), ("attn", "q_a_proj", "weight"), _linear())
        add("self_attn.q_a_layernorm.weight", (q,), ("attn", "q_a_norm", "weight"), identity)
        add("self_attn.q_b_proj.weight", (h * k, q), ("attn", "q_b_proj", "weight"), q_heads)
    add("self_attn.kv_a_proj_with_mqa.weight", (c + r, d), ("attn", "kv_a_proj", "weight"),
        _linear(_rope_rows(c, r, interleave)))
    add("self_attn.kv_a_layernorm.weight", (c,), ("attn", "kv_a_norm", "weight"), identity)
    add("self_attn.kv_b_proj.weight", (h * (n + v), c), ("attn", "kv_b_proj", "weight"), _heads_out(h))
    add("self_attn.o_proj.weight", (d, h * v), ("attn", "o_proj", "weight"), _heads_in(h))
    if not moe:
        f = cfg.intermediate_size
        for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            add(f"mlp.{name}_proj.weight", shape, ("mlp", name, "weight"), _linear())
        return out
    e, f = cfg.n_routed_experts, cfg.moe_intermediate_size
    add("mlp.gate.weight", (e, d), ("mlp", "router"), _linear())
    add("mlp.gate.e_score_correction_bias", (e,), ("mlp", "bias"), identity)
    if cfg.n_shared_experts:
        fs = f * cfg.n_shared_experts
        for name, shape in (("gate", (fs, d)), ("up", (fs, d)), ("down", (d, fs))):
            add(f"mlp.shared_experts.{name}_proj.weight", shape, ("mlp", "shared", name, "weight"), _linear())
    mlp = path + ("mlp",)
    if fused:  # transformers v5 in-memory layout: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]
        out.append(Entry(prefix + "mlp.experts.gate_up_proj", (e, 2 * f, d), (
            Target(mlp + ("w_gate",), idx, lambda a: a[:, :f].transpose(0, 2, 1)),
            Target(mlp + ("w_up",), idx, lambda a: a[:, f:].transpose(0, 2, 1))), None))
        out.append(Entry(prefix + "mlp.experts.down_proj", (e, d, f),
                         (Target(mlp + ("w_down",), idx, lambda a: a.transpose(0, 2, 1)),), None))
        return out
    for i in range(e):
        for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            out.append(Entry(f"{prefix}mlp.experts.{i}.{name}_proj.weight", shape,
                             (Target(mlp + (f"w_{name}",), idx + (i,), transpose),), transpose))
    return out


def entries(cfg, interleave: bool = True, fused_layers: frozenset = frozenset()) -> tuple[list[Entry], list[Entry]]:
    """(entries that fill the model, MTP copies of the shared embedding/head that are only checked)."""
    d, v, n = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    head = (("head", "weight"), (), transpose)
    main = [Entry("model.embed_tokens.weight", (v, d), (Target(("embed", "weight"), (), same),), same),
            Entry("model.norm.weight", (d,), (Target(("norm", "weight"), (), same),), same),
            Entry("lm_head.weight", (v, d), (Target(*head),), transpose)]
    for layer in range(n):
        moe = layer >= cfg.first_k_dense_replace
        stack, i = ("moe_layers", layer - cfg.first_k_dense_replace) if moe else ("dense_layers", layer)
        main += _block_entries(cfg, f"model.layers.{layer}.", (stack,), (i,), moe, layer in fused_layers, interleave)
    copies = []
    for depth in range(cfg.num_nextn_predict_layers):
        layer, prefix, path = n + depth, f"model.layers.{n + depth}.", ("mtp", depth)
        main += _block_entries(cfg, prefix, path + ("block",), (), True, layer in fused_layers, interleave)
        for name, sub in (("enorm", "enorm"), ("hnorm", "hnorm"), ("shared_head.norm", "norm")):
            main.append(Entry(f"{prefix}{name}.weight", (d,), (Target(path + (sub, "weight"), (), same),), same))
        main.append(Entry(f"{prefix}eh_proj.weight", (d, 2 * d), (Target(path + ("eh_proj", "weight"), (),
                                                                           transpose),), transpose))
        copies.append(Entry(f"{prefix}embed_tokens.weight", (v, d), (Target(("embed", "weight"), (), same),), same))
        copies.append(Entry(f"{prefix}shared_head.head.weight", (v, d), (Target(*head),), transpose))
    return main, copies


def listing(keys) -> str:
    keys = sorted(keys)
    more = f", ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more
