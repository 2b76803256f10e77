"""Attention of a handful of new tokens against the latent KV cache (decode), reading only the filled part of it.

Legend: B batch, T new tokens, S cache slots, H heads, c kv_lora_rank, r qk_rope_head_dim. The cache holds the
normalised latent c_kv (B, S, c) and the rotated shared key k_rope (B, S, r); the queries arrive absorbed into the
latent space (q . W_kb), so keys and values are never expanded per head.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import attention as attention_ops


class LatentCache(NamedTuple):
    """One layer's MLA cache (or a stack of them with a leading layer axis)."""

    c_kv: jax.Array  # (B, S, c)
    k_rope: jax.Array  # (B, S, r), already rotated

    @staticmethod
    def zeros(cfg: ModelConfig, batch: int, slots: int, layers: int | None, dtype) -> LatentCache:
        lead = () if layers is None else (layers,)
        dt = jnp.dtype(dtype)
        return LatentCache(jnp.zeros(lead + (batch, slots, cfg.kv_lora_rank), dt),
                           jnp.zeros(lead + (batch, slots, cfg.qk_rope_head_dim), dt))


DECODE_MAX_QUERIES = 64  # up to this many new tokens per row, the cache path takes `latent_attention`


def latent_attention(q_lat_bthc, q_rope_bthr, cache: LatentCache, pos_bt, scale: float, pol,
                     block: int) -> jax.Array:
    """A few new queries against the cache this step has just written (B, S, .): (B, T, H, c), c_kv the key
    shared by all heads (absorbed query) and the value (absorbed output); slot s is visible to the query at
    position p iff s <= p. Caches of up to `block` slots are read whole; longer ones in blocks of `block` slots,
    only as many as hold a visible slot (`_filled_blocks`), with an online softmax. Reading the written cache
    gives the loop-carried cache one chain (scatter in place, then reads): reading the cache as it was before the
    write made XLA copy every layer's cache twice per step. float32 scores, as every backend."""
    if cache.c_kv.shape[1] <= block:
        s_bths = _latent_scores(q_lat_bthc, q_rope_bthr, cache, jnp.int32(0), pos_bt, scale, pol)
        p_bths = jax.nn.softmax(s_bths, axis=-1)  # every query sees slot 0
        return attention_ops.matmul("bths,bsc->bthc", p_bths, cache.c_kv, pol).astype(q_lat_bthc.dtype)
    return _filled_blocks(q_lat_bthc, q_rope_bthr, cache, pos_bt, scale, pol, block).astype(q_lat_bthc.dtype)


def _latent_scores(q_lat_bthc, q_rope_bthr, keys: LatentCache, first, pos_bt, scale: float, pol) -> jax.Array:
    """Scaled scores against slots first.. of `keys` (B, T, H, S'), -inf where not visible. The cache is the left
    operand of both matmuls so that XLA:CPU reads it as stored (as the right operand of q.k it is copied
    transposed); the scores come out slot-major and are moved to slot-minor for the softmax, whose exp/max/sum
    XLA:CPU does not vectorise over a non-minor axis (the move costs less than the exp it speeds up)."""
    mm = functools.partial(attention_ops.matmul, pol=pol)
    s_bsth = (mm("bsc,bthc->bsth", keys.c_kv, q_lat_bthc) + mm("bsr,bthr->bsth", keys.k_rope, q_rope_bthr)) * scale
    slot_s = first + jnp.arange(keys.c_kv.shape[1])
    visible_bst = slot_s[None, :, None] <= pos_bt[:, None, :]
    return jnp.moveaxis(jnp.where(visible_bst[..., None], s_bsth, -jnp.inf), 1, -1)


def _filled_blocks(q_lat_bthc, q_rope_bthr, cache: LatentCache, pos_bt, scale: float, pol, block: int):
    """Blocks of `block` slots up to the largest position in the batch (a loop of dynamic length, so a decode
    step's attention costs what the filled part of the cache holds, not its size), online softmax in float32
    (`attention.online_softmax_step`). The last block may overlap the one before it (the cache need not be a
    multiple of `block`): its slots below j * block are masked, so no slot counts twice. Slot 0 is visible to
    every query, so no row ends with an empty sum."""
    slots = cache.c_kv.shape[1]

    def read(j):
        first = jnp.minimum(j * block, slots - block)
        keys = LatentCache(*(jax.lax.dynamic_slice_in_dim(a, first, block, axis=1) for a in cache))
        s_bths = _latent_scores(q_lat_bthc, q_rope_bthr, keys, first, pos_bt, scale, pol)
        fresh_s = first + jnp.arange(block) >= j * block
        return jnp.where(fresh_s, s_bths, -jnp.inf), keys.c_kv

    def update(j, carry):  # m, denom (B, T, H); acc (B, T, H, c)
        s_bths, c_bsc = read(j)
        pv = functools.partial(attention_ops.matmul, "bths,bsc->bthc", b=c_bsc, pol=pol)
        return attention_ops.online_softmax_step(*carry, s_bths, pv)

    bth = q_lat_bthc.shape[:3]
    init = (jnp.full(bth, -jnp.inf, jnp.float32), jnp.zeros(bth, jnp.float32),
            jnp.zeros((*bth, cache.c_kv.shape[-1]), jnp.float32))
    n_blocks = pos_bt.max() // block + 1
    _, denom_bth, acc_bthc = jax.lax.fori_loop(0, n_blocks, update, init)
    return acc_bthc / denom_bth[..., None]
