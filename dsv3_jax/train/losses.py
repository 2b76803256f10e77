"""Training losses as pure functions: masked next-token cross-entropy, multi-token prediction, balance losses.

Batches are packed: `tokens`, `segment_ids` (0 = padding, equal ids = one document) and `positions`, each (B, T+1).
The model reads the first T columns; the target of column t is column t+1 (depth k of MTP: column t+k+1).
A target counts only when every token from the input to the target lies in one non-padding document, so no
prediction crosses a packed-document boundary. Cross-entropies are taken in float32 and returned as (sum, count)
so that gradient accumulation can divide by the token count of the whole global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def same_document_mask(segment_ids: jax.Array, depth: int) -> jax.Array:
    """valid[b, t] for t < T: columns t..t+depth+1 of segment_ids (B, T+1) share one non-padding segment.

    Returns (B, T - depth) booleans (depth 0 is the next-token mask; depth k the MTP mask of module k)."""
    t_in = segment_ids.shape[1] - 1
    n = t_in - depth
    seg = segment_ids
    valid = seg[:, :n] != 0
    for j in range(1, depth + 2):
        valid = valid & (seg[:, j:j + n] == seg[:, :n])
    return valid


def mtp_target_mask(segment_ids: jax.Array, depth: int) -> jax.Array:
    """(M, B, T) booleans: MTP depth k has a target at input column t (`same_document_mask(segment_ids, k)`,
    False in the last k columns). The model counts experts and balance only there."""
    b, t_in = segment_ids.shape[0], segment_ids.shape[1] - 1
    rows = [same_document_mask(segment_ids, k) for k in range(1, depth + 1)]
    return jnp.stack([jnp.concatenate([r, jnp.zeros((b, t_in - r.shape[1]), bool)], axis=1) for r in rows])


def cross_entropy_sum(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of float32 token cross-entropies over masked positions, and the number of those positions."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    nll_bt = -jnp.take_along_axis(logp, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask_bt.astype(jnp.float32)
    return (nll_bt * mask).sum(), mask.sum()


def next_token_loss(logits_btv: jax.Array, tokens: jax.Array, segment_ids: jax.Array, ce=cross_entropy_sum):
    """(sum, count) of the main next-token cross-entropy; logits (B, T, V) for tokens[:, :T]. `ce` (x_bt., targets,
    mask) -> (sum, count) takes what stands in place of the logits (e.g. the head's input for
    `Transformer.head_cross_entropy`)."""
    return ce(*next_token_item(logits_btv, tokens, segment_ids))


def next_token_item(x_bt_: jax.Array, tokens: jax.Array, segment_ids: jax.Array) -> tuple:
    """(x, targets (B, T), mask (B, T)) of the main loss: column t predicts token t+1."""
    return x_bt_, tokens[:, 1:], same_document_mask(segment_ids, 0)


def mtp_items(mtp_x_mbt_: jax.Array, tokens: jax.Array, segment_ids: jax.Array) -> list[tuple]:
    """Per MTP depth k, (x (B, T-k, ...), targets, mask): column t predicts token t+k+1 within one document."""
    items = []
    for k in range(1, mtp_x_mbt_.shape[0] + 1):
        n = tokens.shape[1] - 1 - k
        items.append((mtp_x_mbt_[k - 1][:, :n], tokens[:, k + 1:], same_document_mask(segment_ids, k)))
    return items


def mtp_losses(mtp_logits_mbtv: jax.Array, tokens: jax.Array, segment_ids: jax.Array, ce=cross_entropy_sum):
    """Per-depth (sums (M,), counts (M,)): depth k at column t predicts token t+k+1 within one document. `ce` as in
    `next_token_loss`."""
    sums, counts = [], []
    for item in mtp_items(mtp_logits_mbtv, tokens, segment_ids):
        s, c = ce(*item)
        sums.append(s)
        counts.append(c)
    return jnp.stack(sums), jnp.stack(counts)


def mtp_loss(per_depth_ce: jax.Array, lam: float | jax.Array) -> jax.Array:
    """L_MTP = lambda / M * sum_k CE_k for per-depth mean cross-entropies (M,)."""
    d = per_depth_ce.shape[0]
    return lam / max(d, 1) * per_depth_ce.sum() if d else jnp.zeros((), jnp.float32)


def balance_loss(aux: dict, alpha: float | jax.Array) -> jax.Array:
    """alpha * sum over MoE layers and MTP layers of the sequence-wise balance term sum_i f_i P_i."""
    total = aux["balance_loss"].sum()
    if "mtp_balance_loss" in aux:
        total = total + aux["mtp_balance_loss"].sum()
    return alpha * total


def aux_balance_terms(counts_le: jax.Array, affinity_le: jax.Array, k: int) -> jax.Array:
    """Per-layer batch-level (Switch/GShard) balance term E * sum_i f_i P_i, shape (L,).

    f_i = c_i / sum_j c_j (fraction of the batch's routed slots that went to expert i; no gradient) and
    P_i = A_i / N (mean over the N = sum_j c_j / K valid tokens of the normalised affinity s_i / sum_j s_j, A_i
    their sum). Perfect balance with uniform affinities gives 1."""
    e = counts_le.shape[-1]
    slots = jnp.maximum(counts_le.sum(-1, keepdims=True), 1.0)
    f = jax.lax.stop_gradient(counts_le) / slots
    p = affinity_le * k / slots
    return e * (f * p).sum(-1)


def aux_balance_loss(aux: dict, alpha: float | jax.Array, k: int) -> jax.Array:
    """alpha * sum over MoE layers and MTP layers of `aux_balance_terms` (the `aux_loss` balancing strategy)."""
    total = aux_balance_terms(aux["expert_counts"], aux["expert_affinity"], k).sum()
    if "mtp_expert_counts" in aux:
        total = total + aux_balance_terms(aux["mtp_expert_counts"], aux["mtp_expert_affinity"], k).sum()
    return alpha * total
