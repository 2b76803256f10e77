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

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv3_jax.errors import ConfigError

AXIS = "context"


def active(mesh) -> bool:
    """True when `mesh` splits the sequence over `context` and no enclosing shard_map has already made it manual."""
    return not mesh.empty and AXIS in mesh.shape and mesh.shape[AXIS] > 1 and AXIS not in mesh.manual_axes


def attend_split(attend_local: Callable, q_nope_bthn, q_rope_bthr, c_kv_btc, k_rope_btr, segment_ids_bt, w_kvb,
                 mesh):
    """(B, T, H, v) attention outputs with queries, latents and segment ids split over `context`.

    `attend_local(q_nope, q_rope, c_kv_all, k_rope_all, w_kvb, seg_q, seg_k, pos_q, pos_k)` runs on one device:
    t queries against the T gathered latents, which it expands with `w_kvb` (replicated over `context`; its
    gradient is summed over the chunks by the shard_map transpose). Positions are token indices in the whole
    sequence (causal by index within segments, as the unsplit path)."""
    chunks = mesh.shape[AXIS]
    t = q_nope_bthn.shape[1]
    if t % chunks:
        raise ConfigError(f"mesh.context ({chunks}) must divide the sequence length ({t})")

    def local(q_nope, q_rope, c_kv, k_rope, seg, w):
        b, t_loc = seg.shape
        gather = lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True)  # noqa: E731  (B, t, .) -> (B, T, .)
        c_all, r_all, seg_all = gather(c_kv), gather(k_rope), gather(seg)
        first = jax.lax.axis_index(AXIS) * t_loc
        pos_q = jnp.broadcast_to(first + jnp.arange(t_loc, dtype=jnp.int32), (b, t_loc))
        pos_k = jnp.broadcast_to(jnp.arange(t_loc * chunks, dtype=jnp.int32), (b, t_loc * chunks))
        return attend_local(q_nope, q_rope, c_all, r_all, w, seg, seg_all, pos_q, pos_k)

    split = P(None, AXIS)
    with jax.named_scope("context_parallel"):  # names its collectives in the compiled HLO (docs/long_context.md)
        return jax.shard_map(local, mesh=mesh, axis_names={AXIS}, in_specs=(split, split, split, split, split, P()),
                             out_specs=split)(q_nope_bthn, q_rope_bthr, c_kv_btc, k_rope_btr, segment_ids_bt, w_kvb)
