"""DeepSeekMoE: routing as pure functions, the grouped-matmul expert FFN, the bias update rule and load statistics.

Legend: N tokens, E routed experts, K experts per token, G groups, D hidden size, F expert hidden size,
R = N*K routed rows, P padded rows (expert-aligned blocks of `block` rows).

Routing order (REFERENCE.md): float32 sigmoid scores s; biased scores s + b for selection only; group score is the
sum of each group's top-2 biased scores; groups outside the best `topk_group` are masked with -inf; top-K experts
by biased score; gates from the UNBIASED s, normalised when norm_topk_prob, then times routed_scaling_factor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ImplConfig, ModelConfig
from dsv3_jax.layers import MLP, param
from dsv3_jax.precision import Policy, policy, ragged_dot
from dsv3_jax.precision import einsum as policy_einsum


class RouterBias(nnx.Variable):
    """Per-expert selection bias (`e_score_correction_bias`): explicit state, never in the gradient or optimizer."""


# ----------------------------------------------------------------------------------------------------------------
# Routing.


def router_scores(x_nd: jax.Array, w_de: jax.Array) -> jax.Array:
    """Sigmoid affinities (N, E), computed in float32 at full precision."""
    logits = jnp.einsum("nd,de->ne", x_nd.astype(jnp.float32), w_de.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return jax.nn.sigmoid(logits)


def select_experts(scores_ne: jax.Array, bias_e: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Group-limited top-K selection on biased scores; gates from unbiased scores. Returns (idx (N, K), gates)."""
    n, e = scores_ne.shape
    biased = scores_ne + bias_e.astype(jnp.float32)[None]
    if cfg.n_group > 1:
        grouped = biased.reshape(n, cfg.n_group, e // cfg.n_group)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # (N, G): sum of each group's top-2
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)  # (N, topk_group)
        group_mask = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], keep].set(True)
        biased = jnp.where(jnp.repeat(group_mask, e // cfg.n_group, axis=1), biased, -jnp.inf)
    _, idx_nk = jax.lax.top_k(biased, cfg.num_experts_per_tok)
    gates = jnp.take_along_axis(scores_ne, idx_nk, axis=1)
    if cfg.norm_topk_prob:
        gates = gates / (gates.sum(-1, keepdims=True) + 1e-20)
    return idx_nk.astype(jnp.int32), gates * cfg.routed_scaling_factor


def expert_counts(idx_nk: jax.Array, valid_n: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert (E,), counting only valid (non-padding) tokens."""
    weights = jnp.broadcast_to(valid_n[:, None], idx_nk.shape).astype(jnp.float32)
    return jnp.zeros((num_experts,), jnp.float32).at[idx_nk.reshape(-1)].add(weights.reshape(-1))


def sequence_balance_loss(scores_bte: jax.Array, idx_btk: jax.Array, valid_bt: jax.Array, k: int) -> jax.Array:
    """Sequence-wise balance term sum_i f_i P_i, averaged over sequences (alpha is applied by the loss).

    f_i = E / (K T) * (tokens of the sequence choosing i); P_i = mean_t s[t, i] / sum_j s[t, j]; T counts valid
    tokens only."""
    b, t, e = scores_bte.shape
    valid = valid_bt.astype(jnp.float32)
    n_tok = jnp.maximum(valid.sum(-1), 1.0)  # (B,)
    chosen = jax.nn.one_hot(idx_btk, e, dtype=jnp.float32).sum(2) * valid[..., None]  # (B, T, E)
    f = e / (k * n_tok[:, None]) * chosen.sum(1)  # (B, E)
    s_norm = scores_bte / scores_bte.sum(-1, keepdims=True)
    p = (s_norm * valid[..., None]).sum(1) / n_tok[:, None]  # (B, E)
    per_seq = (f * p).sum(-1)
    has_tokens = (valid.sum(-1) > 0).astype(jnp.float32)
    return (per_seq * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)


def update_bias(bias_e: jax.Array, counts_e: jax.Array, gamma: float | jax.Array) -> jax.Array:
    """Aux-loss-free balancing: b_i += gamma * sign(mean(c) - c_i), from the global batch's counts."""
    return bias_e + gamma * jnp.sign(counts_e.mean(-1, keepdims=True) - counts_e)


def max_violation(counts_e: jax.Array) -> jax.Array:
    """MaxVio = max_i c_i / mean(c) - 1 (per layer when counts are (L, E))."""
    return counts_e.max(-1) / jnp.maximum(counts_e.mean(-1), 1e-9) - 1.0


# ----------------------------------------------------------------------------------------------------------------
# Grouped matmul backends: (R, D) rows sorted by expert, group sizes (E,) -> (R, F).


def _blocked_layout(sorted_expert_r: jax.Array, group_sizes_e: jax.Array, block: int, num_blocks: int):
    """Where each sorted row lands in an expert-aligned padded buffer, and each block's expert."""
    padded_sizes = (group_sizes_e + block - 1) // block * block
    padded_start = jnp.cumsum(padded_sizes) - padded_sizes  # (E,)
    start = jnp.cumsum(group_sizes_e) - group_sizes_e
    rank = jnp.arange(sorted_expert_r.shape[0]) - start[sorted_expert_r]
    dest_r = padded_start[sorted_expert_r] + rank
    block_expert = jnp.repeat(jnp.arange(group_sizes_e.shape[0]), padded_sizes // block,
                              total_repeat_length=num_blocks)
    return dest_r, block_expert


def grouped_ffn(x_nd: jax.Array, idx_nk: jax.Array, gates_nk: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                w_down: jax.Array, impl: str, block: int, policy: Policy) -> jax.Array:
    """sum_k gate_k * Expert_{idx_k}(x) for every token, computing each expert only on its own rows.

    w_gate, w_up: (E, D, F); w_down: (E, F, D). impl: ragged_dot | blocked | dense."""
    n, d = x_nd.shape
    k = idx_nk.shape[1]
    e = w_gate.shape[0]
    if impl == "dense":  # every expert on every token: a reference, never the training path
        h = jax.nn.silu(policy_einsum("nd,edf->nef", x_nd, w_gate, policy)) * policy_einsum(
            "nd,edf->nef", x_nd, w_up, policy)
        y_ned = policy_einsum("nef,efd->ned", h, w_down, policy)
        combine = jnp.zeros((n, e), gates_nk.dtype).at[jnp.arange(n)[:, None], idx_nk].add(gates_nk)
        return jnp.einsum("ned,ne->nd", y_ned, combine.astype(y_ned.dtype))

    flat_expert = idx_nk.reshape(-1)  # (R,)
    order = jnp.argsort(flat_expert, stable=True)
    sorted_expert = flat_expert[order]
    x_rd = x_nd[order // k]
    group_sizes = jnp.bincount(flat_expert, length=e).astype(jnp.int32)

    if impl == "ragged_dot":
        h = jax.nn.silu(ragged_dot(x_rd, w_gate, group_sizes, policy)) * ragged_dot(x_rd, w_up, group_sizes, policy)
        y_rd = ragged_dot(h, w_down, group_sizes, policy)
    elif impl == "blocked":
        r = x_rd.shape[0]
        num_blocks = min(-(-r // block) + e, r)
        dest, block_expert = _blocked_layout(sorted_expert, group_sizes, block, num_blocks)
        x_pd = jnp.zeros((num_blocks * block, d), x_rd.dtype).at[dest].set(x_rd, unique_indices=True)
        x_nbd = x_pd.reshape(num_blocks, block, d)
        h = jax.nn.silu(policy_einsum("nbd,ndf->nbf", x_nbd, w_gate[block_expert], policy)) * policy_einsum(
            "nbd,ndf->nbf", x_nbd, w_up[block_expert], policy)
        y_nbd = policy_einsum("nbf,nfd->nbd", h, w_down[block_expert], policy)
        y_rd = y_nbd.reshape(num_blocks * block, d)[dest]
    else:
        raise ValueError(f"unknown moe_impl {impl!r}")

    inverse = jnp.argsort(order)
    y_nkd = y_rd[inverse].reshape(n, k, d)
    return jnp.einsum("nkd,nk->nd", y_nkd, gates_nk.astype(y_nkd.dtype))


def resolve_impl(impl: str) -> str:
    """`auto` picks ragged_dot where it is a native grouped matmul (GPU/TPU) and the blocked form elsewhere."""
    if impl != "auto":
        return impl
    return "ragged_dot" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "blocked"


# ----------------------------------------------------------------------------------------------------------------
# The layer.


class MoE(nnx.Module):
    """Routed experts (sigmoid, group-limited, aux-loss-free bias) plus always-on shared experts."""

    def __init__(self, cfg: ModelConfig, impl: ImplConfig, rngs: nnx.Rngs):
        d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        self.policy = policy(impl)
        pdt = jnp.dtype(self.policy.param_dtype)
        self.cfg, self.impl = cfg, impl
        self.router = param(rngs, (d, e), ("embed", "experts"), cfg.initializer_range, jnp.float32)
        self.bias = RouterBias(jnp.zeros((e,), jnp.float32), axes=("experts",))
        self.w_gate = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), cfg.initializer_range, pdt)
        self.w_up = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), cfg.initializer_range, pdt)
        self.w_down = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), cfg.initializer_range, pdt)
        self.shared = MLP(cfg, f * cfg.n_shared_experts, self.policy, rngs) if cfg.n_shared_experts else None

    def __call__(self, x_btd: jax.Array, valid_bt: jax.Array) -> tuple[jax.Array, dict]:
        """Returns the layer output and aux {expert_counts (E,), balance_loss ()} over valid tokens."""
        cfg = self.cfg
        b, t, d = x_btd.shape
        x_nd = x_btd.reshape(b * t, d)
        scores = router_scores(x_nd, self.router[...])  # (N, E) float32
        idx, gates = select_experts(scores, self.bias[...], cfg)
        y = grouped_ffn(x_nd, idx, gates, self.w_gate[...], self.w_up[...], self.w_down[...],
                        resolve_impl(self.impl.moe_impl), self.impl.moe_block_size, self.policy)
        y_btd = y.reshape(b, t, d).astype(x_btd.dtype)
        if self.shared is not None:
            y_btd = y_btd + self.shared(x_btd)
        aux = {
            "expert_counts": expert_counts(idx, valid_bt.reshape(-1), cfg.n_routed_experts),
            "balance_loss": sequence_balance_loss(scores.reshape(b, t, -1), idx.reshape(b, t, -1), valid_bt,
                                                  cfg.num_experts_per_tok),
        }
        return y_btd, aux
