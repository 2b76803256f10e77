"""DeepSeekMoE routing as pure functions, the auxiliary-loss-free bias rule and the load statistics.

Routing order, as the released model computes it: float32 sigmoid scores s; biased scores s + b for selection only;
group score is the sum of each group's top-2 biased scores; groups outside the best `topk_group` are masked with
-inf; top-K experts by biased score; gates from the UNBIASED s, normalised when norm_topk_prob, then times
routed_scaling_factor.

Legend: N tokens, E routed experts, K experts per token, G groups, B sequences, T tokens per sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig


class RouterBias(nnx.Variable):
    """Per-expert selection bias (`e_score_correction_bias`): explicit state, never in the gradient or optimizer."""


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
    total, n_seq = sequence_balance_terms(scores_bte, idx_btk, valid_bt, k)
    return total / jnp.maximum(n_seq, 1.0)


def sequence_balance_terms(scores_bte: jax.Array, idx_btk: jax.Array, valid_bt: jax.Array,
                           k: int, seq_axes: tuple[str, ...] = ()) -> tuple[jax.Array, jax.Array]:
    """(sum over sequences of sum_i f_i P_i, number of sequences with tokens): sums, so batch shards can psum them.
    Inside shard_map with the sequence split over `seq_axes`, each sequence's sums over its tokens are psum'd over
    them first (f_i P_i is a product of whole-sequence sums); the result is then the same on every chunk."""
    b, t, e = scores_bte.shape
    valid = valid_bt.astype(jnp.float32)
    chosen = jax.nn.one_hot(idx_btk, e, dtype=jnp.float32).sum(2) * valid[..., None]  # (B, T, E)
    s_norm = scores_bte / scores_bte.sum(-1, keepdims=True)
    seq_sums = (valid.sum(-1), chosen.sum(1), (s_norm * valid[..., None]).sum(1))  # (B,), (B, E), (B, E)
    n_valid, n_chosen, s_sum = jax.lax.psum(seq_sums, seq_axes) if seq_axes else seq_sums
    n_tok = jnp.maximum(n_valid, 1.0)  # (B,)
    f = e / (k * n_tok[:, None]) * n_chosen  # (B, E)
    p = s_sum / n_tok[:, None]  # (B, E)
    per_seq = (f * p).sum(-1)
    has_tokens = (n_valid > 0).astype(jnp.float32)
    return (per_seq * has_tokens).sum(), has_tokens.sum()


def update_bias(bias_e: jax.Array, counts_e: jax.Array, gamma: float | jax.Array) -> jax.Array:
    """Aux-loss-free balancing: b_i += gamma * sign(mean(c) - c_i), from the global batch's counts."""
    return bias_e + gamma * jnp.sign(counts_e.mean(-1, keepdims=True) - counts_e)


def max_violation(counts_e: jax.Array) -> jax.Array:
    """MaxVio = max_i c_i / mean(c) - 1 (per layer when counts are (L, E))."""
    return counts_e.max(-1) / jnp.maximum(counts_e.mean(-1), 1e-9) - 1.0


# Expert-FFN backends: one registry, one signature
#     backend(x_nd, routing, weights, ctx) -> y_nd = sum_k gate_k * Expert_{idx_k}(x_n)
# Local backends see every expert; expert-parallel ones run inside `jax.shard_map` (the layer wraps them) and see
# this device's tokens and its E_l experts.


class Routing(NamedTuple):
    idx_nk: jax.Array  # (N, K) int32 chosen experts
    gates_nk: jax.Array  # (N, K) float32 gates
