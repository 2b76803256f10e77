"""Router counts are counted once: their sum is (valid tokens) x K per MoE layer and (MTP targets) x K per MTP depth,
with gradient accumulation and on an 8-device mesh, and the bias moves by exactly those counts. The mesh run needs
its device count fixed at JAX start-up, so it runs in a subprocess."""

import subprocess
import sys
import textwrap

import pytest

from tests import xla_env

SCRIPT = textwrap.dedent("""
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding
    from dsv3_jax.train import losses, step, state
    from dsv3_jax.presets import load_config
    from dsv3_jax.model.routing import update_bias
    from dsv3_jax.parallel.sharding import logical_spec, make_mesh
    assert jax.device_count() == 8
    B, T = 8, 16
    cfg = load_config("tiny", [f"data.seq_len={T}", f"train.global_batch_size={B}", "train.micro_batches=2",
                               "train.bias_gamma=0.01", "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"])
    rng = np.random.default_rng(0)
    seg = np.ones((B, T + 1), np.int32)
    pos = np.tile(np.arange(T + 1, dtype=np.int32), (B, 1))
    for r in range(B):
        cut = 2 + r
        seg[r, cut:], pos[r, cut:] = 2, np.arange(T + 1 - cut)
    seg[1, -5:] = 0
    seg[6, -2:] = 0
    batch = {"tokens": rng.integers(2, cfg.model.vocab_size, (B, T + 1)).astype(np.int32), "segment_ids": seg,
             "positions": pos}
    mesh = make_mesh(cfg.mesh)
    state, graphdef, tx = state.init_state(cfg, mesh)
    sharding = NamedSharding(mesh, logical_spec(("batch",)))
    with jax.set_mesh(mesh):
        g = {k: jax.device_put(v, sharding) for k, v in batch.items()}
        new, m = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx, cfg=cfg))(state, g)
    k = cfg.model.num_experts_per_tok
    valid = int((seg[:, :-1] != 0).sum())
    targets = int(losses.same_document_mask(jnp.asarray(seg), 1).sum())
    np.testing.assert_array_equal(np.asarray(m["routed_tokens"]), [valid * k] * cfg.model.num_moe_layers)
    np.testing.assert_array_equal(np.asarray(m["mtp_routed_tokens"]), [targets * k])
    # the bias moved by the counts of one unsharded forward over the whole batch
    host = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), (state.params, state.bias))
    out = step.forward(graphdef, *host, {k_: jnp.asarray(v) for k_, v in batch.items()})
    want = jax.tree.map(lambda b, c: update_bias(b, c, 0.01), host[1], out.aux["router_counts"])
    for a, b in zip(jax.tree.leaves(new.bias), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-9)
    print("COUNTS_OK", valid, targets)
""")


@pytest.mark.slow
def test_counted_once_with_micro_batches_on_an_8_device_mesh():
    env = xla_env.env(8)
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0 and "COUNTS_OK" in r.stdout, r.stderr[-3000:]
