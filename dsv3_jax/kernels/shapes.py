"""Integer shape arithmetic: how many blocks cover a length, the length they cover, and which group a row of a
grouped layout falls in.

`cdiv` and `round_up` take Python ints (static shapes) and integer jax arrays (traced counts) alike: no float
division, so the result is exact and keeps the operands' integer dtype.
"""

from __future__ import annotations

import jax.numpy as jnp


def cdiv(a, b):
    """ceil(a / b) for a >= 0, b > 0: how many blocks of b cover a."""
    return -(-a // b)


def round_up(a, m):
    """a rounded up to a multiple of m (m > 0): the length whole blocks of m cover."""
    return cdiv(a, m) * m


def group_of_rows(sizes_e, rows: int):
    """(R,) the group of each of `rows` rows laid out group after group (sizes (E,)); E for rows past the last group.
    A scatter of the E group ends and a cumsum: O(R + E), and no `jnp.searchsorted`, whose jax 0.10 form cannot be
    traced inside a shard_map under `jax.eval_shape`."""
    ends = jnp.minimum(jnp.cumsum(sizes_e), rows)
    return jnp.cumsum(jnp.zeros((rows + 1,), jnp.int32).at[ends].add(1))[:rows]
