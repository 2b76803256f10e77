"""Attention backends (attention_ops.py) against the dense reference, through MLA and the latent cache; the blocked
backend's memory; backend selection and its errors; the attention core under the precision policy."""

import dataclasses
import functools
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import ImplConfig
from dsv3_jax.errors import ConfigError
from dsv3_jax.kernels import attention as ops
from dsv3_jax.kernels.precision import Policy
from dsv3_jax.model.mla import MLA
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.model.transformer import create
from dsv3_jax.presets import load_config
from tests import xla_env

REPO = pathlib.Path(__file__).resolve().parent.parent
FP32 = Policy()


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float32)


def _op_inputs(b=2, t=37, s=None, h=3, n=6, r=4, v=5, shared=False, seed=0):
    """Random q/k/v with MLA's unequal dims (q/k n + r, v); keys per head, or shared like the latent cache."""
    s = t if s is None else s
    ks = jax.random.split(jax.random.key(seed), 5)
    kv_lead = (b, s) if shared else (b, s, h)
    return (_normal(ks[0], (b, t, h, n)), _normal(ks[1], (b, t, h, r)), _normal(ks[2], kv_lead + (n,)),
            _normal(ks[3], (b, s, r)), _normal(ks[4], kv_lead + (v,)))


def _value_and_grads(fn, arrays, *rest):
    """Output and the gradients of a nonlinear function of it w.r.t. every float input."""

    def loss(*a):
        out = fn(*a, *rest)
        return jnp.sum(out * jnp.sin(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(arrays))), has_aux=True))(*arrays)
    return out, grads


def _assert_equals_dense_on_packed_documents(fn):
    """`fn` (an attention backend) equals dense in values and in the gradients of every input, float32, on two rows
    of packed documents, 37 tokens."""
    arrays = _op_inputs(t=37)
    idx = jnp.broadcast_to(jnp.arange(37), (2, 37))
    rest = (PACKED, PACKED, idx, idx, 0.3, FP32)
    ref_out, ref_grads = _value_and_grads(ops.dense, arrays, *rest)
    out, grads = _value_and_grads(fn, arrays, *rest)
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Backend functions against dense.


PACKED = jnp.array([[1] * 10 + [2] * 20 + [3] * 7, [1] * 37])  # three documents in row 0, one in row 1


@pytest.mark.parametrize("block", [8, 16])
def test_blocked_equals_dense_with_packed_documents_and_ragged_blocks(block):
    _assert_equals_dense_on_packed_documents(functools.partial(ops.blocked, block=block))


def test_blocked_runs_inside_shard_map_where_its_loop_carries_vary_per_device():
    """Under the train step's data-parallel region the kernel's inputs are per-device (varying) values; its loop
    accumulators must be typed so too (kernels/varying.py), else lax.cond rejects the carry. One device is enough:
    the types are the same at any size."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))

    def in_region(*args):
        arrays, scale, pol = args[:9], args[9], args[10]
        return jax.shard_map(lambda *a: ops.blocked(*a, scale, pol, block=8), mesh=mesh,
                             in_specs=jax.sharding.PartitionSpec("data"),
                             out_specs=jax.sharding.PartitionSpec("data"))(*arrays)

    _assert_equals_dense_on_packed_documents(in_region)


def test_blocked_equals_dense_on_shared_latent_keys_at_arbitrary_positions():
    """The absorbed cache form: keys and values shared by all heads, queries at their own positions per row (one
    row's first query sees nothing at all: its output and gradients are 0, not NaN). The query at position 24 sees
    exactly one slot of the last key block, which starts at 24: the block-skipping bound is inclusive."""
    arrays = _op_inputs(t=5, s=29, shared=True, seed=1)
    q_pos = jnp.array([[3, 17, 9, 24, 0], [-1, 4, 22, 11, 6]])
    ones_q, ones_k = jnp.ones((2, 5), jnp.int32), jnp.ones((2, 29), jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(29), (2, 29))
    rest = (ones_q, ones_k, q_pos, slots, 0.4, FP32)
    ref_out, ref_grads = _value_and_grads(ops.dense, arrays, *rest)
    out, grads = _value_and_grads(functools.partial(ops.blocked, block=8), arrays, *rest)
    chex.assert_tree_all_finite((out, grads))
    np.testing.assert_array_equal(out[1, 0], 0.0)
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-5)


def test_blocked_never_computes_key_blocks_past_the_last_query_position():
    """Cache slots past every query's position hold NaN (as an unwritten cache might): the dense reference computes
    then masks them (NaN * 0 leaks), the blocked backend skips those blocks and stays exact."""
    q_nope, q_rope, c_kv, k_rope, _ = _op_inputs(t=6, s=64, shared=True, seed=2)
    unwritten = jnp.arange(64) >= 16
    c_kv = jnp.where(unwritten[None, :, None], jnp.nan, c_kv)
    k_rope = jnp.where(unwritten[None, :, None], jnp.nan, k_rope)
    q_pos = jnp.broadcast_to(jnp.arange(10, 16), (2, 6))
    slots = jnp.broadcast_to(jnp.arange(64), (2, 64))
    ones_q, ones_k = jnp.ones((2, 6), jnp.int32), jnp.ones((2, 64), jnp.int32)
    args = (ones_q, ones_k, q_pos, slots, 0.4, FP32)
    out = jax.jit(functools.partial(ops.blocked, block=16), static_argnums=(9, 10))(q_nope, q_rope, c_kv, k_rope,
                                                                                     c_kv, *args)
    ref = ops.dense(q_nope, q_rope, c_kv[:, :16], k_rope[:, :16], c_kv[:, :16], ones_q, ones_k[:, :16], q_pos,
                    slots[:, :16], 0.4, FP32)
    assert bool(jnp.isnan(ops.dense(q_nope, q_rope, c_kv, k_rope, c_kv, *args)).any())
    chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)


def test_splash_in_interpret_mode_equals_dense():
    _assert_equals_dense_on_packed_documents(functools.partial(ops.splash, interpret=True))


def test_cudnn_layout_equals_dense_through_the_xla_implementation():
    """The cuDNN backend's own work (rope concatenated, v zero-padded to the q/k dim and sliced back, the segment
    mask) checked with jax.nn.dot_product_attention's XLA implementation, which takes the same arguments."""
    _assert_equals_dense_on_packed_documents(functools.partial(ops.cudnn, implementation="xla"))


# ----------------------------------------------------------------------------------------------------------------
# Through MLA and the model.


def _randomised(module, seed=0, scale=0.3):
    """Every parameter random (the default init is so small that attention would be nearly uniform)."""
    graphdef, state = nnx.split(module)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [_normal(k, x.shape, scale) + (1.0 if x.ndim == 1 else 0.0) for k, x in zip(keys, leaves, strict=True)]
    return graphdef, jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("block", [8, 16])
def test_mla_blocked_equals_dense_in_values_and_gradients(block):
    """Packed documents with per-document YaRN positions past the original context, 37 tokens (not a multiple of
    the block), the tiny preset's unequal head dims (q/k 12 + 6, v 10)."""
    cfg = load_config("tiny").model
    assert cfg.rope_scaling is not None and cfg.qk_head_dim != cfg.v_head_dim
    graphdef, state = _randomised(MLA(cfg, ImplConfig(attention="dense"), nnx.Rngs(0)))
    x = _normal(jax.random.key(5), (2, 37, cfg.hidden_size))
    pos = jnp.array([list(range(200, 210)) + list(range(300, 320)) + list(range(7)), list(range(150, 187))])
    cos, sin = rope_cos_sin(pos, cfg)

    def run(impl, state, x):
        mla = nnx.merge(graphdef, state)
        mla.impl = impl
        out, _ = mla(x, cos, sin, PACKED, pos)
        return jnp.mean(out * jnp.sin(out)), out  # mean: gradients O(1), as the outputs are

    grad = jax.jit(jax.value_and_grad(run, argnums=(1, 2), has_aux=True), static_argnums=0)
    (_, ref_out), ref_grads = grad(ImplConfig(attention="dense"), state, x)
    (_, out), grads = grad(ImplConfig(attention="blocked", attention_block_size=block), state, x)
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-5)


def _jitted(model):
    """The model's forward as one compiled function of (ids, positions, cache) -> (logits, cache)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(ids, positions, cache):
        out = nnx.merge(graphdef, state)(ids, positions=positions, cache=cache, mtp=False)
        return out.logits, out.cache

    return forward


def _naive_latent_attention(q_lat, q_rope, c_kv, k_rope, pos, scale):
    """Per (row, query, head): softmax over the slots s <= pos of (c_kv . q_lat + k_rope . q_rope) * scale, the
    weighted sum of c_kv; float64 loops."""
    q_lat, q_rope, c_kv, k_rope = (np.asarray(a, np.float64) for a in (q_lat, q_rope, c_kv, k_rope))
    b, t, h, c = q_lat.shape
    out = np.zeros((b, t, h, c))
    for i in range(b):
        for j in range(t):
            seen = slice(0, int(pos[i, j]) + 1)
            for k in range(h):
                s = (c_kv[i, seen] @ q_lat[i, j, k] + k_rope[i, seen] @ q_rope[i, j, k]) * scale
                p = np.exp(s - s.max())
                out[i, j, k] = (p / p.sum()) @ c_kv[i, seen]
    return out


@pytest.mark.parametrize("positions", [[[5, 6], [20, 21], [37, 38]], [[0, 1], [9, 10], [19, 20]]])
@pytest.mark.parametrize("block", [16, 64])
def test_latent_attention_reads_the_filled_blocks_and_matches_a_naive_loop(positions, block):
    """The decode attention on the latent cache (40 slots; rows at different positions, 2 consecutive queries
    each) against a naive loop, read whole (block 64) and in blocks of 16 (40 is no multiple: the last block
    overlaps the one before it). Slots in blocks past the largest position hold NaN, as an unwritten cache may:
    they are never read (NaN * 0 would leak through a masked read)."""
    from dsv3_jax.kernels.latent_attention import LatentCache, latent_attention
    ks = jax.random.split(jax.random.key(7), 4)
    q_lat, q_rope = _normal(ks[0], (3, 2, 4, 8)), _normal(ks[1], (3, 2, 4, 5))
    c_kv, k_rope = _normal(ks[2], (3, 40, 8)), _normal(ks[3], (3, 40, 5))
    pos = jnp.asarray(positions, jnp.int32)
    ref = _naive_latent_attention(q_lat, q_rope, c_kv, k_rope, pos, 0.3)
    past = jnp.arange(40) >= -(-(int(pos.max()) + 1) // block) * block  # blocks past the filled part
    cache = LatentCache(*(jnp.where(past[None, :, None], jnp.nan, a) for a in (c_kv, k_rope)))
    fn = jax.jit(functools.partial(latent_attention, scale=0.3, pol=FP32, block=block))
    np.testing.assert_allclose(fn(q_lat, q_rope, cache, pos), ref, atol=1e-5, rtol=1e-5)


def test_blocked_prefill_and_decode_on_the_cache_equal_the_dense_forward_without_cache():
    """Two scanned attention layers (a per-layer cache mix-up shows); no MoE layer or MTP module, which the attention
    backend does not touch and which would only add compile time."""
    cfg = dataclasses.replace(load_config("tiny").model, num_hidden_layers=2, first_k_dense_replace=2,
                              num_nextn_predict_layers=0)
    dense_model = _jitted(create(cfg, 0, impl=ImplConfig(attention="dense")))
    blocked_model = create(cfg, 0, impl=ImplConfig(attention="blocked", attention_block_size=8))
    cache = blocked_model.init_cache(2, 40)
    blocked_model = _jitted(blocked_model)
    ids = jax.random.randint(jax.random.key(3), (2, 24), 0, cfg.vocab_size)
    full, _ = dense_model(ids, jnp.broadcast_to(jnp.arange(24), (2, 24)), None)
    logits, cache = blocked_model(ids[:, :21], jnp.broadcast_to(jnp.arange(21), (2, 21)), cache)  # 21 of 40 slots
    np.testing.assert_allclose(logits, full[:, :21], atol=1e-5)
    for t in range(21, 24):
        logits, cache = blocked_model(ids[:, t:t + 1], jnp.full((2, 1), t), cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Memory: compiled, never run.


def _fwd_bwd_temp_bytes(backend, t, block=512):
    """XLA's temp allocation for forward + backward of one attention call at length t (1 head, tiny dims)."""
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, t, 1, 8), (1, t, 1, 4), (1, t, 1, 8), (1, t, 4),
                                                             (1, t, 1, 8))]
    idx = jnp.zeros((1, t), jnp.int32)

    def loss(*a):
        seg, pos = jnp.zeros_like(idx), jnp.broadcast_to(jnp.arange(t), (1, t))
        return jnp.sum(backend(*a, seg, seg, pos, pos, 0.3, FP32, block))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blocked_forward_backward_memory_grows_linearly_with_length():
    temp = {t: _fwd_bwd_temp_bytes(ops.blocked, t) for t in (2048, 8192, 32768)}
    # linear: x4 length -> about x4 bytes (quadratic would be x16); the dense reference shows the contrast
    assert temp[32768] < 5 * temp[8192], temp
    assert temp[8192] < 5 * temp[2048], temp
    dense = {t: _fwd_bwd_temp_bytes(ops.dense, t) for t in (2048, 8192)}
    assert dense[8192] > 12 * dense[2048], dense
    assert temp[8192] < dense[8192] / 20, (temp, dense)


# ----------------------------------------------------------------------------------------------------------------
# Selection, errors, precision.


def test_auto_picks_the_platform_kernel_else_blocked_for_long_else_dense():
    long, short = ops.AUTO_BLOCKED_MIN_LEN, ops.AUTO_BLOCKED_MIN_LEN - 1
    assert ops.resolve("auto", long, True, True, "tpu") == "splash"
    assert ops.resolve("auto", long, True, False, "gpu") == "cudnn"
    assert ops.resolve("auto", long, True, True, "gpu") == "blocked"  # cuDNN has no float32
    assert ops.resolve("auto", long, True, True, "cpu") == "blocked"
    assert ops.resolve("auto", short, True, True, "cpu") == "dense"
    assert ops.resolve("auto", long, False, False, "tpu") == "blocked"  # kernels do not take the latent cache
    assert ops.resolve("splash", 1, False, True, "tpu") == "dense"  # a 1-token decode on the cache
    assert ops.resolve("blocked", 1, True, True, "cpu") == "blocked"


@pytest.mark.parametrize("name,plat", [("splash", "cpu"), ("cudnn", "cpu"), ("splash", "gpu"), ("cudnn", "tpu")])
def test_backend_missing_on_this_platform_is_a_one_line_config_error(name, plat):
    with pytest.raises(ConfigError) as e:
        ops.resolve(name, 64, True, False, plat)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and repr(plat) in msg, msg


def test_bad_backend_names_the_field():
    with pytest.raises(ConfigError, match="impl.attention"):
        load_config("tiny", ["impl.attention=flash"])
    with pytest.raises(ConfigError, match="impl.attention_block_size"):
        load_config("tiny", ["impl.attention_block_size=0"])
    with pytest.raises(ConfigError, match="cudnn.*precision bf16"):
        ops.resolve("cudnn", 64, True, True, "gpu")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="names the CPU platform")
def test_train_cli_with_a_kernel_this_platform_lacks_prints_one_line(tmp_path):
    env = xla_env.env()
    r = subprocess.run([sys.executable, "train.py", "--config", "tiny", "impl.attention=splash", "train.steps=1",
                        f"train.run_dir={tmp_path / 'run'}", "data.max_documents=20"], cwd=REPO, env=env,
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "splash" in errors[0] and "'cpu'" in errors[0], errors[0]


def _dot_precisions(jaxpr) -> list:
    """The `precision` of every dot_general in a jaxpr and in all jaxprs nested in its equations."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _dot_precisions(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _dot_precisions(sub)
    return found


@pytest.mark.parametrize("attention", ["dense", "blocked"])
def test_float32_attention_runs_every_matmul_at_highest_precision(attention):
    """Forward and backward of MLA without the cache, forward with it (16 slots in blocks of 8; decoding is not
    differentiated, its loop over the filled blocks has a dynamic length): no matmul left at default precision
    (TF32 on GPUs)."""
    cfg = load_config("tiny").model
    impl = ImplConfig(attention=attention, attention_block_size=8)
    graphdef, state = nnx.split(MLA(cfg, impl, nnx.Rngs(0)))
    x = jnp.ones((1, 12, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(12), (1, 12))
    cos, sin = rope_cos_sin(pos, cfg)
    seg = jnp.ones((1, 12), jnp.int32)

    def loss(state, cached):
        cache = None
        if cached:
            from dsv3_jax.kernels.latent_attention import LatentCache

            cache = LatentCache.zeros(cfg, 1, 16, None, jnp.float32)
        return jnp.sum(nnx.merge(graphdef, state)(x, cos, sin, seg, pos, cache)[0])

    for cached in (False, True):
        fn = loss if cached else jax.grad(loss)
        precisions = _dot_precisions(jax.make_jaxpr(fn, static_argnums=1)(state, cached).jaxpr)
        assert len(precisions) > 8
        highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
        assert all(p == highest for p in precisions), precisions


def test_impl_fields_round_trip_through_overrides():
    cfg = load_config("tiny", ["impl.attention=blocked", "impl.attention_block_size=64"])
    assert (cfg.impl.attention, cfg.impl.attention_block_size) == ("blocked", 64)
