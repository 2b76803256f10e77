"""An embedding lookup into a table sharded on its D dimension, without gathering the table (inside shard_map).

Each of the S devices over `axes` holds all V rows and D/S columns. The devices' token ids are all-gathered (S x the
ids, a few KiB), every id is looked up in the local columns, and an all-to-all returns to each device its own
tokens' rows with all D columns: (S x B, T, D/S) -> (B, T, D). Autodiff's transposes run it backwards: the
all-to-all sends each device the cotangent columns of its shard, and the lookup's transpose scatter-adds them into
the local (V, D/S) block, so the table's gradient never exists whole either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lookup_d_sharded(table_local_vd: jax.Array, ids_bt: jax.Array, axes: tuple[str, ...], dtype) -> jax.Array:
    """(B, T, D) rows of the whole table for this device's ids (B, T); table_local_vd (V, D/S) is this device's
    column block over the mesh `axes` (in their tiled order). Rows come back in `dtype`."""
    axes = tuple(axes)
    ids_all = jax.lax.all_gather(ids_bt, axes, axis=0, tiled=True)  # (S B, T): every device's ids
    rows = jnp.take(table_local_vd, ids_all, axis=0).astype(dtype)  # (S B, T, D/S): their rows, my columns
    return jax.lax.all_to_all(rows, axes, split_axis=0, concat_axis=2, tiled=True)  # (B, T, D)
