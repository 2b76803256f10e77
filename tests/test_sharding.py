"""Sharding on 8 fake CPU devices: parameters are created (or loaded from HF files) in their logical-axis shardings
and the sharded forward equals the single-device forward. Runs in a subprocess because the device count is fixed
at JAX start-up."""

import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec

from dsv3_jax.config import ConfigError, MeshConfig
from dsv3_jax.sharding import RULES, logical_spec, make_mesh

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec
    from flax import nnx
    from dsv3_jax.config import load_config, MeshConfig
    from dsv3_jax.model import create
    from dsv3_jax.sharding import make_mesh
    assert jax.device_count() == 8
    cfg = load_config("tiny").model
    ref_model = create(cfg, 0)
    ids = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    ref = ref_model(ids)
    for shape in [dict(data=2, fsdp=2, expert=2, tensor=1), dict(data=1, fsdp=2, expert=2, tensor=2)]:
        mesh = make_mesh(MeshConfig(**shape))
        with jax.sharding.set_mesh(mesh):
            graphdef, state = nnx.split(create(cfg, 0, mesh))
            w = state["moe_layers"]["mlp"]["w_gate"][...]
            assert w.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor"), w.sharding.spec
            assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape[1] == cfg.n_routed_experts // 2
            fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
            xs = jax.device_put(ids, jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert"))))
            out = fwd(state, xs)
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=2e-5)
        np.testing.assert_allclose(np.asarray(out.mtp_logits), np.asarray(ref.mtp_logits), atol=2e-5)
        np.testing.assert_array_equal(np.asarray(out.aux["expert_counts"]), np.asarray(ref.aux["expert_counts"]))
    # an HF-format directory loads straight into the shardings: each device holds only its shard
    import sys, tempfile
    from dsv3_jax import hf
    with tempfile.TemporaryDirectory() as d:
        hf.save(ref_model, d)
        mesh = make_mesh(MeshConfig(data=2, fsdp=2, expert=2, tensor=1))
        with jax.sharding.set_mesh(mesh):
            loaded = hf.load(d, mesh=mesh)
            w = loaded.moe_layers.mlp.w_gate[...]
            assert w.sharding.spec == PartitionSpec(None, "expert", "fsdp", "tensor"), w.sharding.spec
            assert w.addressable_shards[0].data.shape == (2, 4, 24, 24), w.addressable_shards[0].data.shape
            graphdef, state = nnx.split(loaded)
            out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=2e-5)
    print("SHARDING_OK")
""")


@pytest.mark.slow
def test_sharded_init_and_forward_on_8_cpu_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0 and "SHARDING_OK" in r.stdout, r.stderr[-3000:]


def test_rules_table_maps_logical_axes():
    assert logical_spec(("experts", "embed", "expert_mlp")) == PartitionSpec("expert", "fsdp", "tensor")
    assert logical_spec(("batch", "seq", None)) == PartitionSpec(("data", "fsdp", "expert"), None, None)
    used = [a for v in RULES.values() if v for a in ((v,) if isinstance(v, str) else v)]
    assert set(used) <= {"data", "fsdp", "expert", "tensor"}


def test_bad_mesh_shape_is_one_line_error():
    with pytest.raises(ConfigError, match="needs 16 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2, expert=2, tensor=2), devices=[object()] * 8)
    with pytest.raises(ConfigError, match="not divisible"):
        make_mesh(MeshConfig(data=-1, fsdp=3), devices=[object()] * 8)
