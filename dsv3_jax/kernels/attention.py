"""Attention backends: one signature, one registry (`BACKENDS`), and the rule that picks one (`resolve`).

Legend: B batch, T queries, S keys, H heads, n nope (content) dim, r rope dim, v value dim; `i`/`j` index query and
key blocks, q/k the block lengths. Keys and values may be per head (B, S, H, .) or shared by all heads (B, S, .):
the full-sequence MLA path passes per-head k_nope and v with a shared k_rope; the absorbed cache path passes the
latent c_kv as shared k_nope AND v.

Every backend computes softmax(scale * (q_nope.k_nope + q_rope.k_rope) + mask) v in float32 scores, where key s is
visible to query t iff seg_q[t] == seg_k[s] and pos_k[s] <= pos_q[t]. The matmuls run under the precision policy
(float32 at HIGHEST precision: no TF32 on GPUs). `dense` materialises (B, H, T, S) scores and is the reference;
`blocked` is a flash-style online softmax in pure JAX whose forward and backward memory is O(T x block); `splash`
(TPU) and `cudnn` (GPU) are the platform kernels. Adding a backend: write its function and add one `Backend` entry.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dsv3_jax.errors import ConfigError
from dsv3_jax.kernels.platform import platform
from dsv3_jax.kernels.precision import Policy
from dsv3_jax.kernels.shapes import round_up
from dsv3_jax.kernels.varying import like

# `auto` switches from dense to blocked when the query length reaches this (dense is at least as fast below it on
# CPU, and its (B, H, T, S) float32 scores stay small).
AUTO_BLOCKED_MIN_LEN = 1024


_POS_PAD_Q = jnp.iinfo(jnp.int32).min  # padded queries see nothing


_POS_PAD_K = jnp.iinfo(jnp.int32).max  # padded keys are seen by nothing


def _k_spec(x: jax.Array, letter: str) -> str:
    """Einsum operand string of a key/value part: per head (bsh.) or shared by all heads (bs.)."""
    return f"bsh{letter}" if x.ndim == 4 else f"bs{letter}"


def matmul(spec: str, a: jax.Array, b: jax.Array, pol: Policy) -> jax.Array:
    """An attention-core matmul under the policy: compute-dtype operands, float32 result."""
    dt = pol.compute_dtype
    return jnp.einsum(spec, a.astype(dt), b.astype(dt), precision=pol.lax_precision,
                      preferred_element_type=jnp.float32)


def _scores(q_nope, q_rope, k_nope, k_rope, scale, pol) -> jax.Array:
    """(B, H, T, S) float32 scaled scores. With per-head keys the rope part joins the content part in one matmul:
    a separate matmul over r = 16 dims against the shared k_rope writes its (B, T, H, S) product in the wrong
    layout and XLA transposes the whole score tensor, forward and back."""
    if k_nope.ndim == 4 and k_rope.ndim == 3:
        q, k = _joint_qk(q_nope, q_rope, k_nope, k_rope)
        return matmul("bthn,bshn->bhts", q, k, pol) * scale
    s = (matmul(f"bthn,{_k_spec(k_nope, 'n')}->bhts", q_nope, k_nope, pol)
         + matmul(f"bthr,{_k_spec(k_rope, 'r')}->bhts", q_rope, k_rope, pol))
    return s * scale


def _mask(q_seg_bt, k_seg_bs, q_pos_bt, k_pos_bs) -> jax.Array:
    """(B, 1, T, S) visibility: same segment and key position <= query position."""
    m = (q_seg_bt[:, :, None] == k_seg_bs[:, None, :]) & (k_pos_bs[:, None, :] <= q_pos_bt[:, :, None])
    return m[:, None]


def dense(q_nope, q_rope, k_nope, k_rope, v, q_seg, k_seg, q_pos, k_pos, scale: float, pol: Policy,
          block: int = 0) -> jax.Array:
    """Materialised (B, H, T, S) scores and probabilities; rows with no visible key give 0."""
    del block
    mask = _mask(q_seg, k_seg, q_pos, k_pos)
    s = jnp.where(mask, _scores(q_nope, q_rope, k_nope, k_rope, scale, pol), -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    p = p / jnp.maximum(p.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    out = matmul(f"bhts,{_k_spec(v, 'v')}->bthv", p, v, pol)
    return out.astype(v.dtype)


@dataclasses.dataclass(frozen=True)
class _Blocking:
    """Static settings of one blocked call (hashable: it is a nondiff argument of the custom VJP)."""

    scale: float
    bq: int
    bk: int
    pol: Policy


def _slice(x, start, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _block_bounds(cfg, q_pos, k_pos):
    """Per query block the largest query position, per key block the smallest key position (over the batch; one
    reduction, outside the loops). Key block j can be visible to query block i only if kmin[j] <= qmax[i]: causal
    blocks above the diagonal are skipped, not computed then masked."""
    b = q_pos.shape[0]
    return q_pos.reshape(b, -1, cfg.bq).max((0, 2)), k_pos.reshape(b, -1, cfg.bk).min((0, 2))


def _block_scores(i, j, cfg, qn, qr, kn, kr, q_seg, k_seg, q_pos, k_pos):
    """Scaled scores of query block i against key block j, -inf where masked: (B, H, q, k) float32."""
    s = _scores(_slice(qn, i * cfg.bq, cfg.bq), _slice(qr, i * cfg.bq, cfg.bq), _slice(kn, j * cfg.bk, cfg.bk),
                _slice(kr, j * cfg.bk, cfg.bk), cfg.scale, cfg.pol)
    mask = _mask(_slice(q_seg, i * cfg.bq, cfg.bq), _slice(k_seg, j * cfg.bk, cfg.bk),
                 _slice(q_pos, i * cfg.bq, cfg.bq), _slice(k_pos, j * cfg.bk, cfg.bk))
    return jnp.where(mask, s, -jnp.inf)


def online_softmax_step(m, denom, acc, s, pv: Callable, to_acc: Callable = lambda x: x[..., None]):
    """One block of keys into the running softmax: the running max m and sum `denom` (s.shape[:-1]) and the running
    p @ v `acc` are rescaled to the new max, and the block's p (its scores s, -inf where masked, against that max)
    added; `pv(p)` is the block's p @ v in acc's layout, `to_acc` puts a per-row statistic in acc's layout. A row
    that has seen no visible key (max -inf) takes 0 as its reference, so its p is 0 and its rescale 1, never NaN."""
    m_new = jnp.maximum(m, s.max(-1))
    ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - ref[..., None])  # masked entries are exp(-inf) = 0
    corr = jnp.exp(jnp.where(jnp.isfinite(m), m, ref) - ref)
    return m_new, denom * corr + p.sum(-1), acc * to_acc(corr) + pv(p)


def _entangled(*xs):
    """`xs` through one optimization barrier, so that no partial evaluation can tell the masks (from segment ids
    and positions alone) apart from the scores (from q and k). A layer scan under autodiff traces its forward with
    the layer-invariant inputs known and the rest unknown, to hoist loop-invariant residuals
    (`jax._src.lax.control_flow.loops._scan_known_hoisting`): the block loops below would be split, their mask
    halves run ahead for every (query block, key block) pair at once, (nq, nk, B, H, q, k) booleans and float32
    -inf fills, O(T^2) memory. Through the barrier every output is unknown as soon as one input is."""
    return jax.lax.optimization_barrier(xs)


def _flash_fwd_impl(cfg: _Blocking, qn, qr, kn, kr, v, q_seg, k_seg, q_pos, k_pos):
    """Output (B, T, H, v) and the log-sum-exp (B, H, T) of every query row (-inf where nothing is visible)."""
    qn, qr, kn, kr, v, q_seg, k_seg, q_pos, k_pos = _entangled(qn, qr, kn, kr, v, q_seg, k_seg, q_pos, k_pos)
    b, t, h, _ = qn.shape
    dv = v.shape[-1]
    nk = kn.shape[1] // cfg.bk
    pv_spec = f"bhqk,{_k_spec(v, 'v').replace('s', 'k')}->bqhv"
    qmax, kmin = _block_bounds(cfg, q_pos, k_pos)

    def query_block(i):
        def step(j, carry):
            def compute(carry):  # m, denom (B, H, q); acc (B, q, H, v)
                s = _block_scores(i, j, cfg, qn, qr, kn, kr, q_seg, k_seg, q_pos, k_pos)
                pv = functools.partial(matmul, pv_spec, b=_slice(v, j * cfg.bk, cfg.bk), pol=cfg.pol)
                return online_softmax_step(*carry, s, pv, lambda x: jnp.moveaxis(x, 1, 2)[..., None])

            return jax.lax.cond(kmin[j] <= qmax[i], compute, lambda c: c, carry)

        init = like((jnp.full((b, h, cfg.bq), -jnp.inf, jnp.float32), jnp.zeros((b, h, cfg.bq), jnp.float32),
                     jnp.zeros((b, cfg.bq, h, dv), jnp.float32)), qn, kn, v)
        m, denom, acc = jax.lax.fori_loop(0, nk, step, init)
        tiny = jnp.finfo(jnp.float32).tiny
        out = acc / jnp.maximum(jnp.moveaxis(denom, 1, 2), tiny)[..., None]
        lse = jnp.where(denom > 0, m + jnp.log(jnp.maximum(denom, tiny)), -jnp.inf)
        return out.astype(v.dtype), lse

    out_i, lse_i = jax.lax.map(query_block, jnp.arange(t // cfg.bq))  # (nq, B, q, H, v), (nq, B, H, q)
    out = jnp.moveaxis(out_i, 0, 1).reshape(b, t, h, dv)
    lse = jnp.moveaxis(lse_i, 0, 2).reshape(b, h, t)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Blocking, qn, qr, kn, kr, v, q_seg, k_seg, q_pos, k_pos):
    return _flash_fwd_impl(cfg, qn, qr, kn, kr, v, q_seg, k_seg, q_pos, k_pos)[0]


def _flash_fwd(cfg, qn, qr, kn, kr, v, q_seg, k_seg, q_pos, k_pos):
    out, lse = _flash_fwd_impl(cfg, qn, qr, kn, kr, v, q_seg, k_seg, q_pos, k_pos)
    return out, (qn, qr, kn, kr, v, q_seg, k_seg, q_pos, k_pos, out, lse)


def _flash_bwd(cfg, res, dout):
    """Recompute each needed (query block, key block) pair: key blocks outer (their dk, dv are scan outputs), query
    blocks inner; dq accumulates in the carry. Residuals are O(T): inputs, output and log-sum-exp."""
    qn, qr, kn, kr, v, q_seg, k_seg, q_pos, k_pos, out, lse, dout = _entangled(*res, dout)
    nq, nk = qn.shape[1] // cfg.bq, kn.shape[1] // cfg.bk
    delta_bht = jnp.moveaxis(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1), 1, 2)  # rowsum(dO*O)
    lse_ref = jnp.where(jnp.isfinite(lse), lse, 0.0)
    kn_spec, kr_spec, v_spec = (_k_spec(x, c).replace("s", "k") for x, c in ((kn, "n"), (kr, "r"), (v, "v")))
    def f32(shape):  # a float32 accumulator, varying where the inputs are (kernels/varying.py)
        return like(jnp.zeros(shape, jnp.float32), qn, kn, v, dout)
    qmax, kmin = _block_bounds(cfg, q_pos, k_pos)

    def key_block(dq, j):
        kn_j, kr_j, v_j = (_slice(x, j * cfg.bk, cfg.bk) for x in (kn, kr, v))

        def step(i, carry):
            def compute(carry):
                dqn, dqr, dkn, dkr, dv = carry
                sl = functools.partial(_slice, start=i * cfg.bq, size=cfg.bq)
                s = _block_scores(i, j, cfg, qn, qr, kn, kr, q_seg, k_seg, q_pos, k_pos)
                p = jnp.exp(s - sl(lse_ref, axis=2)[..., None])  # (B, H, q, k); masked entries 0
                do_i = sl(dout)
                dv = dv + matmul(f"bhqk,bqhv->{v_spec}", p, do_i, cfg.pol)
                dp = matmul(f"bqhv,{v_spec}->bhqk", do_i, v_j, cfg.pol)
                ds = p * (dp - sl(delta_bht, axis=2)[..., None]) * cfg.scale
                dkn = dkn + matmul(f"bhqk,bqhn->{kn_spec}", ds, sl(qn), cfg.pol)
                dkr = dkr + matmul(f"bhqk,bqhr->{kr_spec}", ds, sl(qr), cfg.pol)
                dqn = jax.lax.dynamic_update_slice_in_dim(
                    dqn, sl(dqn) + matmul(f"bhqk,{kn_spec}->bqhn", ds, kn_j, cfg.pol), i * cfg.bq, 1)
                dqr = jax.lax.dynamic_update_slice_in_dim(
                    dqr, sl(dqr) + matmul(f"bhqk,{kr_spec}->bqhr", ds, kr_j, cfg.pol), i * cfg.bq, 1)
                return dqn, dqr, dkn, dkr, dv

            return jax.lax.cond(kmin[j] <= qmax[i], compute, lambda c: c, carry)

        dqn, dqr, dkn, dkr, dv = jax.lax.fori_loop(0, nq, step, (*dq, f32(kn_j.shape), f32(kr_j.shape),
                                                                 f32(v_j.shape)))
        return (dqn, dqr), (dkn, dkr, dv)

    (dqn, dqr), (dkn, dkr, dv) = jax.lax.scan(key_block, (f32(qn.shape), f32(qr.shape)), jnp.arange(nk))

    def unblock(x_j, like):  # (nk, B, k, ...) -> (B, S, ...)
        return jnp.moveaxis(x_j, 0, 1).reshape(like.shape).astype(like.dtype)

    return (dqn.astype(qn.dtype), dqr.astype(qr.dtype), unblock(dkn, kn), unblock(dkr, kr), unblock(dv, v),
            None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x, length, value=0):
    pad = length - x.shape[1]
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def blocked(q_nope, q_rope, k_nope, k_rope, v, q_seg, k_seg, q_pos, k_pos, scale: float, pol: Policy,
            block: int = 512) -> jax.Array:
    """Flash-style attention in pure JAX: blocks of `block` queries against blocks of `block` keys (shorter
    sequences use one block; others are padded to a multiple, the padding masked out by position)."""
    t, s = q_nope.shape[1], k_nope.shape[1]
    bq, bk = min(block, t), min(block, s)
    tp, sp = round_up(t, bq), round_up(s, bk)
    cfg = _Blocking(float(scale), bq, bk, pol)
    out = _flash(cfg, _pad_to(q_nope, tp), _pad_to(q_rope, tp), _pad_to(k_nope, sp), _pad_to(k_rope, sp),
                 _pad_to(v, sp), _pad_to(q_seg, tp), _pad_to(k_seg, sp),
                 _pad_to(q_pos.astype(jnp.int32), tp, _POS_PAD_Q), _pad_to(k_pos.astype(jnp.int32), sp, _POS_PAD_K))
    return out[:, :t]


def _joint_qk(q_nope, q_rope, k_nope, k_rope):
    """Queries and keys with the rope part concatenated: (B, T, H, n + r) each (the shared k_rope broadcast)."""
    k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + k_rope.shape[-1:])
    return jnp.concatenate([q_nope, q_rope], -1), jnp.concatenate([k_nope, k_rope], -1)


def splash(q_nope, q_rope, k_nope, k_rope, v, q_seg, k_seg, q_pos, k_pos, scale: float, pol: Policy,
           block: int = 512, interpret: bool = False) -> jax.Array:
    """TPU splash attention (causal mask + segment ids); the sequence is padded to a multiple of the kernel block
    with its own segment (-1), which no real token sees."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # noqa: PLC0415

    del q_pos, k_pos  # causal by index (self-attention only, see `accepts`)
    b, t, h, _ = q_nope.shape
    q, k = _joint_qk(q_nope, q_rope, k_nope, k_rope)
    blk = min(block, round_up(t, 128))
    tp = round_up(t, blk)
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    mask = sa.MultiHeadMask([sa.CausalMask((tp, tp)) for _ in range(h)])
    kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    dt = pol.compute_dtype
    q, k, vv = ((_pad_to(x, tp) * f).astype(dt).transpose(0, 2, 1, 3) for x, f in ((q, scale), (k, 1.0), (v, 1.0)))
    seg = sa.SegmentIds(_pad_to(q_seg, tp, -1), _pad_to(k_seg, tp, -1))
    out = jax.vmap(kernel)(q, k, vv, seg)  # (B, H, T, v)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(v.dtype)


def cudnn(q_nope, q_rope, k_nope, k_rope, v, q_seg, k_seg, q_pos, k_pos, scale: float, pol: Policy,
          block: int = 512, implementation: str | None = "cudnn") -> jax.Array:
    """GPU cuDNN flash attention through jax.nn.dot_product_attention. It needs v's head dim equal to q/k's, so v
    is zero-padded and the output sliced; packed documents go in as a (B, 1, T, S) boolean mask (one byte per
    token pair, no head axis)."""
    del q_pos, k_pos, block
    q, k = _joint_qk(q_nope, q_rope, k_nope, k_rope)
    dv = v.shape[-1]
    vv = jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - dv)])
    dt = pol.compute_dtype
    mask = (q_seg[:, :, None] == k_seg[:, None, :])[:, None]
    out = jax.nn.dot_product_attention(q.astype(dt), k.astype(dt), vv.astype(dt), mask=mask, scale=scale,
                                       is_causal=True, implementation=implementation)
    return out[..., :dv].astype(v.dtype)


@dataclasses.dataclass(frozen=True)
class Backend:
    """An attention backend: its function, the platforms it runs on (None: all), whether it takes only
    self-attention (not attention over the latent cache) and whether it can compute in float32. A platform kernel
    (platforms set) is what `auto` takes on its platform when it accepts the call."""

    fn: Callable
    platforms: tuple[str, ...] | None = None
    self_attention_only: bool = False
    float32: bool = True

    def accepts(self, self_attention: bool, fp32: bool) -> bool:
        return (self_attention or not self.self_attention_only) and (self.float32 or not fp32)


BACKENDS: dict[str, Backend] = {
    "dense": Backend(dense),
    "blocked": Backend(blocked),
    "splash": Backend(splash, platforms=("tpu",), self_attention_only=True),
    "cudnn": Backend(cudnn, platforms=("gpu", "cuda"), self_attention_only=True, float32=False),
}


NAMES = ("auto", *BACKENDS)


def check_available(name: str, plat: str | None = None) -> None:
    """One-line ConfigError when impl.attention names a backend this platform lacks."""
    plat = plat or platform()
    if name == "auto":
        return
    if name not in BACKENDS:
        raise ConfigError(f"impl.attention must be one of {list(NAMES)}, got {name!r}")
    platforms = BACKENDS[name].platforms
    if platforms is not None and plat not in platforms:
        raise ConfigError(f"impl.attention={name!r} runs on {'/'.join(platforms)} only; this platform is {plat!r}")


def resolve(name: str, queries: int, self_attention: bool, fp32: bool, plat: str | None = None) -> str:
    """The backend for one call. A kernel named by the user that cannot take the call (attention over the latent
    cache) falls back as `auto` would. `auto`: this platform's kernel when it accepts the call (cuDNN only below
    float32 precision, which it cannot honour), else `blocked` from AUTO_BLOCKED_MIN_LEN queries, else `dense`."""
    plat = plat or platform()
    check_available(name, plat)
    if name != "auto":
        if not BACKENDS[name].float32 and fp32:
            raise ConfigError(f"impl.attention={name!r} needs impl.precision bf16 or fp8: it has no float32 "
                              "(use blocked for float32 runs)")
        if BACKENDS[name].accepts(self_attention, fp32):
            return name
    for kernel, backend in BACKENDS.items():
        if backend.platforms is not None and plat in backend.platforms and backend.accepts(self_attention, fp32):
            return kernel
    return "blocked" if queries >= AUTO_BLOCKED_MIN_LEN else "dense"


def attend(name: str, q_nope, q_rope, k_nope, k_rope, v, q_seg, k_seg, q_pos, k_pos, scale: float, pol: Policy,
           block: int) -> jax.Array:
    """Run backend `name` (already resolved) -> (B, T, H, v)."""
    return BACKENDS[name].fn(q_nope, q_rope, k_nope, k_rope, v, q_seg, k_seg, q_pos, k_pos, scale, pol, block)
