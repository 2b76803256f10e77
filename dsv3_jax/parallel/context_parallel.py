"""Context parallelism for MLA: the sequence split over the `context` mesh axis, attention over the whole of it.

Legend: B batch, T the whole sequence, t = T / C this device's chunk (C devices on `context`), H heads, n nope dim,
r rope dim, v value dim, c kv_lora_rank.

Outside attention every token is independent of the others, so the rest of the model runs on the sequence chunks
as GSPMD places them (`seq` maps to `context`; shifts such as the MTP targets are GSPMD's to move across chunk
borders, exactly). Attention is the one place a token needs the others: each device all-gathers the per-token
compressed latent (c_kv after its norm, k_rope after rotation: c + r values a token, 576 in DeepSeek-V3) over
`context`, expands it to per-head keys and values itself, and attends its t queries to all T keys, with query
positions offset by its chunk start and the segment ids gathered too (packed documents stay exact). The backward
of the all-gather is a reduce-scatter of the latent's gradient: the same bytes. Sending the latent instead of the
expanded keys and values (H x (n + v) + r values a token, 32,832 in DeepSeek-V3) is the whole point: 57x fewer
bytes than a ring or all-gather of K and V (docs/long_context.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv3_jax.errors import ConfigError
from dsv3_jax.parallel.sharding import mesh_axes

AXIS = "context"


def active(mesh) -> bool:
    """True when `mesh` splits the sequence over `context` and no enclosing shard_map has already made it manual."""
    return not mesh.empty and AXIS in mesh.shape and mesh.shape[AXIS] > 1 and AXIS not in mesh.manual_axes


def attend_split(attend_local: Callable, q_nope_bthn, q_rope_bthr, c_kv_btc, k_rope_btr, segment_ids_bt, w_kvb,
                 mesh):
    """(B, T, H, v) attention outputs with queries, latents and segment ids split over `context`.

    `attend_local(q_nope, q_rope, c_kv_all, k_rope_all, w_kvb, seg_q, seg_k, pos_q, pos_k)` runs on one device:
    t queries against the T gathered latents, which it expands with `w_kvb`. Positions are token indices in the
    whole sequence (causal by index within segments, as the unsplit path).

    The shard_map is manual over `context` and the batch axes, and no reduction runs inside it (`gather_chunks`'
    backward is an all-to-all and a local sum; `w_kvb` enters as one copy per device whose gradients GSPMD sums
    outside): the reducer of a collective lowered under a partly manual mesh carries a sharding annotation, which
    XLA:CPU's all-reduce promotion cannot clone for a 16-bit reduce-scatter ("Invalid binary instruction opcode
    copy")."""
    chunks = mesh.shape[AXIS]
    b, t = q_nope_bthn.shape[:2]
    if t % chunks:
        raise ConfigError(f"mesh.context ({chunks}) must divide the sequence length ({t})")
    rows = batch_axes(mesh, b)

    def local(q_nope, q_rope, c_kv, k_rope, seg, w_1chk):
        b_loc, t_loc = seg.shape
        c_all, r_all = gather_chunks(c_kv), gather_chunks(k_rope)  # (B, t, .) -> (B, T, .)
        seg_all = jax.lax.all_gather(seg, AXIS, axis=1, tiled=True)  # integers: no gradient, no reduction
        first = jax.lax.axis_index(AXIS) * t_loc
        pos_q = jnp.broadcast_to(first + jnp.arange(t_loc, dtype=jnp.int32), (b_loc, t_loc))
        pos_k = jnp.broadcast_to(jnp.arange(t_loc * chunks, dtype=jnp.int32), (b_loc, t_loc * chunks))
        return attend_local(q_nope, q_rope, c_all, r_all, w_1chk[0], seg, seg_all, pos_q, pos_k)

    split = P(rows or None, AXIS)  # rows over the batch axes as well: each device attends only its own rows
    copies = math.prod(mesh.shape[a] for a in (*rows, AXIS))
    w_nchk = jnp.broadcast_to(w_kvb[None], (copies, *w_kvb.shape))  # one copy a device: GSPMD sums the gradients
    with jax.named_scope("context_parallel"):  # names its collectives in the compiled HLO (docs/long_context.md)
        return jax.shard_map(local, mesh=mesh, axis_names={*rows, AXIS},
                             in_specs=(split, split, split, split, split, P((*rows, AXIS))),
                             out_specs=split)(q_nope_bthn, q_rope_bthr, c_kv_btc, k_rope_btr, segment_ids_bt, w_nchk)


def batch_axes(mesh, rows: int) -> tuple[str, ...]:
    """The mesh axes of the logical `batch` that split these `rows` (free, > 1, dividing them): the shard_map makes
    them manual too, else GSPMD may hand it whole rows and every device would attend all of them."""
    axes = tuple(a for a in mesh_axes("batch") if a in mesh.shape and a not in mesh.manual_axes and mesh.shape[a] > 1)
    return axes if axes and rows % math.prod(mesh.shape[a] for a in axes) == 0 else ()


@jax.custom_vjp
def gather_chunks(x_btc: jax.Array) -> jax.Array:
    """(B, t, c) chunk -> (B, T, c) whole sequence: an all-gather over `context` (inside its shard_map)."""
    return jax.lax.all_gather(x_btc, AXIS, axis=1, tiled=True)


def _gather_fwd(x_btc):
    return gather_chunks(x_btc), None


def _gather_bwd(_, ct_bTc):
    """The reduce-scatter of the gradient as an all-to-all (chunk j of every device's (B, T, c) to device j) and a
    float32 sum over the C senders: the same bytes, no reducer."""
    chunks = jax.lax.axis_size(AXIS)
    b, t_all, c = ct_bTc.shape
    parts = ct_bTc.reshape(b, chunks, t_all // chunks, c)  # (B, C, t, c): part j goes to device j
    got = jax.lax.all_to_all(parts, AXIS, 1, 1, tiled=True)  # (B, C, t, c): part from each device
    return (got.astype(jnp.float32).sum(1).astype(ct_bTc.dtype),)


gather_chunks.defvjp(_gather_fwd, _gather_bwd)
