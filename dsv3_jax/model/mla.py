"""Multi-head latent attention (MLA): the full-sequence path and the absorbed path on the latent KV cache.

Legend: B batch, T query tokens, S key tokens (cache slots), H heads, n qk_nope_head_dim, r qk_rope_head_dim,
v v_head_dim, k = n + r, c kv_lora_rank, q q_lora_rank, D hidden size.

The cache per layer holds only the normalised latent c_kv (B, S, c) and the rotated shared key k_rope (B, S, r).
Decode absorbs W_kb into the query and W_vb into the output, so keys and values are never expanded per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ImplConfig, ModelConfig
from dsv3_jax.kernels import attention as attention_ops
from dsv3_jax.kernels.latent_attention import DECODE_MAX_QUERIES, LatentCache, latent_attention
from dsv3_jax.kernels.precision import einsum as policy_einsum
from dsv3_jax.kernels.precision import policy
from dsv3_jax.model.layers import Linear, RMSNorm
from dsv3_jax.model.rope import apply_rope
from dsv3_jax.parallel import context_parallel
from dsv3_jax.parallel.sharding import constrain


class MLA(nnx.Module):
    """Multi-head latent attention with low-rank query/key/value compression and a shared rotary key."""

    def __init__(self, cfg: ModelConfig, impl: ImplConfig, rngs: nnx.Rngs):
        d, h, c, r = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        pol = policy(impl)
        attention_ops.check_available(impl.attention)
        self.cfg, self.impl = cfg, impl
        if cfg.q_lora_rank is None:
            self.q_proj = Linear("btd,dhk->bthk", (d, h, cfg.qk_head_dim), ("embed", "heads", "head_dim"), cfg, pol,
                                 rngs)
        else:
            q = cfg.q_lora_rank
            self.q_a_proj = Linear("btd,dq->btq", (d, q), ("embed", "q_lora"), cfg, pol, rngs)
            self.q_a_norm = RMSNorm(q, 1e-6, pol, rngs)  # latent norms use a fixed eps in the released model
            self.q_b_proj = Linear("btq,qhk->bthk", (q, h, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"), cfg,
                                   pol, rngs)
        self.kv_a_proj = Linear("btd,dc->btc", (d, c + r), ("embed", "kv_lora"), cfg, pol, rngs)
        self.kv_a_norm = RMSNorm(c, 1e-6, pol, rngs)
        self.kv_b_proj = Linear("btc,chk->bthk", (c, h, cfg.qk_nope_head_dim + cfg.v_head_dim),
                                ("kv_lora", "heads", "head_dim"), cfg, pol, rngs)
        self.o_proj = Linear("bthv,hvd->btd", (h, cfg.v_head_dim, d), ("heads", "head_dim", "embed"), cfg, pol, rngs)
        # copies of the absorbed weights, kept on a decode view (`keep_absorbed`)
        self.w_kb_hnc, self.w_vb_hcv = nnx.data(None), nnx.data(None)

    def absorbed_weights(self) -> tuple[jax.Array, jax.Array]:
        """W_kb (H, n, c) and W_vb (H, c, v) out of kv_b_proj, head-major as the absorbed matmuls batch over heads:
        the copies `keep_absorbed` stored, else sliced and transposed here."""
        if self.w_kb_hnc is not None:
            return self.w_kb_hnc[...], self.w_vb_hcv[...]
        w_kvb = self.kv_b_proj.weight[...]  # (c, H, n + v)
        n = self.cfg.qk_nope_head_dim
        return jnp.transpose(w_kvb[..., :n], (1, 2, 0)), jnp.transpose(w_kvb[..., n:], (1, 0, 2))

    def keep_absorbed(self) -> None:
        """Store the absorbed weights as state, for a decode loop: XLA:CPU does not hoist their slicing and
        transposing out of a compiled loop, so it would run on every decode step."""
        kb, vb = self.absorbed_weights()
        self.w_kb_hnc, self.w_vb_hcv = nnx.Variable(kb), nnx.Variable(vb)

    def _queries(self, x_btd, cos, sin):
        if self.cfg.q_lora_rank is None:
            q_bthk = self.q_proj(x_btd)
        else:
            q_bthk = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_btd)))
        q_nope, q_rope = jnp.split(q_bthk, [self.cfg.qk_nope_head_dim], axis=-1)
        return constrain(q_nope, ("batch", "seq", "act_heads", None)), apply_rope(q_rope, cos, sin)

    def _latents(self, x_btd, cos, sin):
        kv_btc = self.kv_a_proj(x_btd)
        c_kv, k_rope = jnp.split(kv_btc, [self.cfg.kv_lora_rank], axis=-1)
        return self.kv_a_norm(c_kv), apply_rope(k_rope, cos, sin)  # (B, T, c), (B, T, r)

    def __call__(self, x_btd: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids_bt: jax.Array,
                 positions_bt: jax.Array, cache: LatentCache | None = None):
        """Full causal attention within segments (cache None), or write the new tokens' latents into the cache
        at their positions and attend over the cache with the absorbed projections. Returns (out, cache)."""
        q_nope, q_rope = self._queries(x_btd, cos, sin)  # (B, T, H, n), (B, T, H, r)
        c_kv, k_rope = self._latents(x_btd, cos, sin)
        scale, pol, b, t = self.cfg.softmax_scale(), self.kv_b_proj.policy, x_btd.shape[0], x_btd.shape[1]
        fp32 = pol.compute_dtype == jnp.float32
        if cache is None:
            name = attention_ops.resolve(self.impl.attention, t, self_attention=True, fp32=fp32)

            def attend(q_nope, q_rope, c_kv, k_rope, w_kvb, seg_q, seg_k, pos_q, pos_k):
                kv_bshk = policy_einsum("bsc,chk->bshk", c_kv, w_kvb, pol)  # as kv_b_proj
                k_nope, v = jnp.split(kv_bshk, [self.cfg.qk_nope_head_dim], axis=-1)  # (B, S, H, n), (B, S, H, v)
                return attention_ops.attend(name, q_nope, q_rope, k_nope, k_rope, v, seg_q, seg_k, pos_q, pos_k,
                                            scale, pol, self.impl.attention_block_size)

            mesh = jax.sharding.get_abstract_mesh()
            if context_parallel.active(mesh):  # the sequence split over `context`: gather the latent, not K/V
                out_bthv = context_parallel.attend_split(attend, q_nope, q_rope, c_kv, k_rope, segment_ids_bt,
                                                         self.kv_b_proj.weight[...], mesh)
            else:
                idx_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # causal by index within segments
                out_bthv = attend(q_nope, q_rope, c_kv, k_rope, self.kv_b_proj.weight[...], segment_ids_bt,
                                  segment_ids_bt, idx_bt, idx_bt)
            return self.o_proj(out_bthv), None
        # Decode / prefill on the latent cache: scatter the new latents to their slots, then attend over the slots
        # with c_kv as the shared key (absorbed query) and the shared value (absorbed output); slot s is visible to
        # the query at position p iff s <= p. Long prefills take the blocked backend: no (T, S) scores.
        b_idx = jnp.arange(b)[:, None]  # positions are < slots (the caller sizes the cache): a plain scatter
        new = LatentCache(c_kv.astype(cache.c_kv.dtype), k_rope.astype(cache.k_rope.dtype))
        cache = LatentCache(*(o.at[b_idx, positions_bt].set(n, mode="promise_in_bounds") for o, n in zip(cache, new)))
        w_kb_hnc, w_vb_hcv = self.absorbed_weights()
        q_lat = policy_einsum("bthn,hnc->bthc", q_nope, w_kb_hnc, pol)  # absorbed query
        name = attention_ops.resolve(self.impl.attention, t, self_attention=False, fp32=fp32)
        if name == "dense" and t <= DECODE_MAX_QUERIES:
            out_lat = latent_attention(q_lat, q_rope, cache, positions_bt, scale, pol,
                                       self.impl.attention_block_size)
            return self.o_proj(policy_einsum("bthc,hcv->bthv", out_lat, w_vb_hcv, pol)), cache
        c_bsc, k_rope_bsr = cache.c_kv.astype(q_lat.dtype), cache.k_rope.astype(q_rope.dtype)
        slots = c_bsc.shape[1]
        slot_bs = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, slots))
        out_lat = attention_ops.attend(name, q_lat, q_rope, c_bsc, k_rope_bsr, c_bsc, jnp.ones((b, t), jnp.int32),
                                       jnp.ones((b, slots), jnp.int32), positions_bt, slot_bs, scale, pol,
                                       self.impl.attention_block_size)  # (B, T, H, c)
        out_bthv = policy_einsum("bthc,hcv->bthv", out_lat, w_vb_hcv, pol)  # absorbed output
        return self.o_proj(out_bthv), cache
