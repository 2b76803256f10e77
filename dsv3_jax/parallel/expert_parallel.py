"""The expert-parallel token exchange: routed rows go to the device holding their expert and come back.

Inside shard_map each device sorts its own routed rows by expert (hence by destination shard), sends chunk j to
shard j, and later receives the results in the same layout. Both exchanges have the semantics of
`jax.lax.ragged_all_to_all` and take the same offsets from `exchange_plans`: `ragged_exchange` is that collective
(TPU/GPU), `all_to_all_exchange` reproduces it with a dense all_to_all of fixed capacity (runs everywhere,
including XLA:CPU, which lacks the ragged collective), dropless and exact but moving S times the routed rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Expert parallelism. Inside shard_map each device sorts its own routed rows by expert (hence by destination
# shard), sends chunk j to shard j, runs its E_l experts on what it received and sends the results back to where
# they came from. Both exchanges have the semantics of `jax.lax.ragged_all_to_all` and take the same offsets from
# `exchange_plans`; `ragged_exchange` is that collective (TPU/GPU), `all_to_all_exchange` reproduces it with a
# dense all_to_all of fixed capacity (runs everywhere, including XLA:CPU, which lacks the ragged collective).


class ExchangePlan(NamedTuple):
    input_offsets: jax.Array  # (S,) where chunk j starts in the operand
    send_sizes: jax.Array  # (S,) rows of chunk j
    output_offsets: jax.Array  # (S,) where chunk j lands in device j's output
    recv_sizes: jax.Array  # (S,) rows received from device s


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def exchange_plans(sizes_sj: jax.Array, me: jax.Array, cap: int | None = None) -> tuple[ExchangePlan, ExchangePlan]:
    """Offsets of the dispatch and the return exchange for device `me`, from sizes_sj[s, j] = rows device s sends
    to device j (every device's send sizes). Received rows are packed in sender order from row 0. With `cap`, only
    the first `cap` rows of each chunk travel (the rest are dropped; every device derives the same plan from the
    same matrix); the senders' layout, and where results land back in it, stay those of the full chunks."""
    kept_sj = sizes_sj if cap is None else jnp.minimum(sizes_sj, cap)
    send, recv = kept_sj[me], kept_sj[:, me]
    forward = ExchangePlan(_exclusive_cumsum(sizes_sj[me]), send, _exclusive_cumsum(kept_sj, 0)[me], recv)
    back = ExchangePlan(_exclusive_cumsum(recv), recv, _exclusive_cumsum(sizes_sj, 1)[:, me], send)
    return forward, back


DENSE_EXCHANGE = "ep_dense_exchange"


def expected_fill(shards: int, factor: float | None) -> float:
    """The fraction of a dense exchange buffer (`shards` x `pair_capacity` rows) that balanced routing fills: each
    peer gets rows / shards, out of `pair_capacity` slots. Dropless: 1 / shards; capacity factor f: 1 / f (a
    buffer is full when f <= 1)."""
    return 1 / shards if factor is None else 1 / min(max(factor, 1.0), shards)


def pair_capacity(rows: int, shards: int, factor: float | None) -> int:
    """Rows one device may send one peer per exchange: `rows` (all of them: dropless) or `factor` times the
    balanced share rows / shards, rounded up."""
    return rows if factor is None else min(rows, max(1, math.ceil(factor * rows / shards)))


def ragged_exchange(operand, output, plan: ExchangePlan, axes: tuple[str, ...], capacity: int):
    """The plan as one `jax.lax.ragged_all_to_all` (moves only the routed rows)."""
    del capacity
    return jax.lax.ragged_all_to_all(operand, output, plan.input_offsets, plan.send_sizes, plan.output_offsets,
                                     plan.recv_sizes, axis_name=axes)


def all_to_all_exchange(operand, output, plan: ExchangePlan, axes: tuple[str, ...], capacity: int):
    """`ragged_exchange`'s result from a dense `jax.lax.all_to_all` of `capacity` rows per peer: each chunk is
    padded to capacity, exchanged, and written at the offset its sender chose. Exact for chunks <= capacity.
    Named `DENSE_EXCHANGE` in the HLO: the planner counts these collectives at the ragged exchange's bytes."""
    with jax.named_scope(DENSE_EXCHANGE):
        return _dense_exchange(operand, output, plan, axes, capacity)


def _dense_exchange(operand, output, plan: ExchangePlan, axes: tuple[str, ...], capacity: int):
    s, c = plan.send_sizes.shape[0], jnp.arange(capacity)
    tail = (1,) * (operand.ndim - 1)
    rows = plan.input_offsets[:, None] + c  # (S, C)
    keep = (c < plan.send_sizes[:, None]).reshape(s, capacity, *tail)
    buf = jnp.where(keep, operand.at[rows].get(mode="fill", fill_value=0), 0)  # (S, C, ...)
    recv = jax.lax.all_to_all(buf, axes, 0, 0, tiled=True)  # recv[s]: what device s sent here
    at = jax.lax.all_to_all(plan.output_offsets, axes, 0, 0, tiled=True)  # (S,) where device s writes here
    dest = jnp.where(c < plan.recv_sizes[:, None], at[:, None] + c, output.shape[0] + jnp.arange(s * capacity)
                     .reshape(s, capacity))
    return output.at[dest.reshape(-1)].set(recv.reshape(s * capacity, *operand.shape[1:]), mode="drop",
                                           unique_indices=True)
