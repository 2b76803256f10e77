"""What the benchmarks (tools/bench.py, tools/bench_accelerator.py) share: one blocking call of the trainer's
jitted train step on one device on a synthetic batch, and whether the torch references can run."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import Config


def synthetic_batch(cfg: Config, seed: int = 0) -> dict:
    """A (B, T+1) packed batch of random bytes, one document per row (what both trainers see)."""
    b, t = cfg.train.global_batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, cfg.model.vocab_size, (b, t + 1), dtype=np.int32)
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(t + 1, dtype=np.int32), (b, t + 1)).copy()}


def our_train(cfg: Config):
    """(a blocking call of the trainer's jitted train step on one device, the initial model)."""
    from flax import nnx

    from dsv3_jax.parallel.sharding import make_mesh, rules_for, use_rules
    from dsv3_jax.train import state as train_state
    from dsv3_jax.train.step import jit_train_step

    rules = rules_for(cfg.mesh)
    with use_rules(rules):
        mesh = make_mesh(cfg.mesh, jax.devices()[:1])
        state, graphdef, tx = train_state.init_state(cfg, mesh)
        model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.bias))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        step = jit_train_step(cfg, graphdef, tx, mesh, abstract, donate=False)
    batch = jax.device_put({k: jnp.asarray(v) for k, v in synthetic_batch(cfg).items()})
    holder = [state]

    def one():
        with use_rules(rules), jax.set_mesh(mesh):
            holder[0], m = step(holder[0], batch)
            jax.block_until_ready(m)

    return one, model


def missing_reference() -> str | None:
    """Why the reference columns (torch.mm, transformers) cannot run here, or None when they can."""
    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ImportError:  # a finder that refuses the module outright
            return True

    missing = [m for m in ("torch", "transformers") if absent(m)]
    if not missing:
        return None
    return (f"{' and '.join(missing)} not installed (the [bench] extra: pip install -e '.[bench]' from a "
            "checkout)")
