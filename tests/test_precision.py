"""FP8 training (impl.precision=fp8): tile quantisation, the three FP8 GEMMs of a linear layer against float32, the
grouped (ragged) form, what the lowered train step runs in FP8 and what it must not, bf16 optimizer moments, and the
one-line config errors."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv3_jax.errors import ConfigError
from dsv3_jax.interop import fp8_blocks
from dsv3_jax.kernels import fp8 as fp8_lib
from dsv3_jax.parallel.sharding import make_mesh
from dsv3_jax.presets import load_config
from dsv3_jax.train import state as train_state
from dsv3_jax.train.step import BATCH_KEYS, train_step

HI = jax.lax.Precision.HIGHEST
E4M3_TINY = 2.0**-6  # smallest normal float8_e4m3fn


def e4m3_bound(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Round-to-nearest error bound of x / scale in E4M3, times scale: half an ulp is 2^-4 relative for normals and
    2^-10 absolute (half the subnormal spacing 2^-9) below the smallest normal."""
    return np.maximum(2.0**-4 * np.abs(x), 2.0**-10 * scale) * (1 + 1e-6)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def with_outliers(rng, shape, n=6, size=200.0) -> np.ndarray:
    """Standard normal values with a few large outliers (what per-tensor scaling handles badly)."""
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, n, replace=False)] *= size
    return x


# ----------------------------------------------------------------------------------------------------------------
# Quantisation.


@pytest.mark.parametrize("tile", [(1, 128), (128, 128), (128, 1)])
def test_quantize_error_is_within_e4m3_rounding_of_each_tile(tile):
    rng = np.random.default_rng(0)
    x = with_outliers(rng, (256, 384)) * np.exp(rng.uniform(-8, 8, (256, 1))).astype(np.float32)  # rows of all sizes
    q, scale = fp8_lib.quantize(jnp.asarray(x), tile)
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == (256 // tile[0], 384 // tile[1])
    s = np.asarray(fp8_lib.dequantize(jnp.ones_like(q), scale, tile))
    back = np.asarray(fp8_lib.dequantize(q, scale, tile))
    assert np.all(np.isfinite(back))
    assert np.all(np.abs(back - x) <= e4m3_bound(x, s))
    amax = np.abs(x.reshape(256 // tile[0], tile[0], 384 // tile[1], tile[1])).max(axis=(1, 3))
    np.testing.assert_allclose(np.asarray(scale), amax / 448, rtol=1e-6)  # scale = amax / 448 of its own tile
    q_tiles = np.abs(np.asarray(q, np.float32)).reshape(256 // tile[0], tile[0], 384 // tile[1], tile[1])
    assert np.all(q_tiles.max(axis=(1, 3)) == 448)  # every tile's largest value maps onto the E4M3 maximum


def test_quantize_edge_values_zero_tiles_and_extreme_magnitudes():
    """A tile holding 448 and values around the smallest normal (after scaling) keeps them; an all-zero tile
    stays zero with scale 1; tiles whose amax is near float32's smallest normal or its maximum give no NaN/inf."""
    rows = np.zeros((4, 128), np.float32)
    rows[0, :6] = [448.0, -448.0, E4M3_TINY, 1.5 * E4M3_TINY, 2.0**-9, 2.0**-11]  # scale exactly 1
    rows[1] = np.linspace(-1, 1, 128) * 1.2e-38
    rows[2] = np.linspace(-1, 1, 128) * 3.0e38
    # rows[3] stays zero
    q, scale = fp8_lib.quantize(jnp.asarray(rows), (1, 128))
    back = np.asarray(fp8_lib.dequantize(q, scale, (1, 128)))
    assert np.all(np.isfinite(np.asarray(q, np.float32))) and np.all(np.isfinite(back))
    assert float(scale[0, 0]) == 1.0
    np.testing.assert_array_equal(back[0, :5], rows[0, :5])  # 448, the smallest normal and a subnormal are exact
    assert back[0, 5] == 0  # below half the smallest subnormal: flushes to zero
    np.testing.assert_allclose(back[2], rows[2], rtol=2.0**-4, atol=0)
    assert float(scale[3, 0]) == 1.0 and not back[3].any()


def test_weight_scales_are_the_released_weight_scale_inv():
    """Training quantises an [in, out] weight in 128x128 blocks; transposed, those scales are exactly the
    `weight_scale_inv` [ceil(out/128), ceil(in/128)] that hf.save / released checkpoints carry (edge blocks cropped),
    and numpy's quantize_blocks is held to the same per-block error bound."""
    rng = np.random.default_rng(1)
    w_in_out = with_outliers(rng, (300, 200))
    padded = fp8_lib._pad(fp8_lib._pad(jnp.asarray(w_in_out), 0, 128), 1, 128)
    _, scale_train = fp8_lib.quantize(padded, (128, 128))
    q, scale_inv = fp8_blocks.quantize_blocks(w_in_out.T)
    assert scale_inv.shape == (2, 3)
    # equal up to one float32 ulp (XLA divides by 448 as a multiply by its reciprocal)
    np.testing.assert_allclose(np.asarray(scale_train).T, scale_inv, rtol=2.0**-23, atol=0)
    back = fp8_blocks.dequantize_blocks(q, scale_inv)
    s = np.repeat(np.repeat(scale_inv, 128, 0), 128, 1)[:200, :300]
    assert np.all(np.abs(back - w_in_out.T) <= e4m3_bound(w_in_out.T, s))
    tiny_block = np.full((130, 130), 1e-39, np.float32)  # amax / 448 is a float32 subnormal: still finite
    assert np.all(np.isfinite(fp8_blocks.dequantize_blocks(*fp8_blocks.quantize_blocks(tiny_block))))


# ----------------------------------------------------------------------------------------------------------------
# One FP8 linear layer: forward, activation gradient, weight gradient.

B, T, D, F = 2, 70, 200, 300  # dims not multiples of 128: padded contraction tiles and partial edge blocks
SPEC = "btd,df->btf"


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(2)
    x = jnp.asarray(with_outliers(rng, (B, T, D)))
    w = jnp.asarray(with_outliers(rng, (D, F)) * 0.05)
    dy = jnp.asarray(with_outliers(rng, (B, T, F)))

    def grads(fn):
        y, vjp = jax.vjp(fn, x, w)
        return (y, *vjp(dy))

    fp8 = grads(functools.partial(fp8_lib.fp8_einsum, SPEC))
    ref = grads(lambda a, b: jnp.einsum(SPEC, a, b, precision=HI))
    return x, w, dy, fp8, ref


def test_fp8_linear_and_both_gradient_gemms_within_5_percent_of_float32(layer):
    """Relative (Frobenius) error of y, dx and dW under 5% with outliers in x, W and dy: E4M3 rounds each operand
    to within 2^-4, which the tile scales keep local (per-tensor scaling would lose every small value)."""
    *_, fp8, ref = layer
    errors = [rel_err(a, b) for a, b in zip(fp8, ref, strict=True)]
    assert all(e < 0.05 for e in errors), errors
    assert all(e > 1e-3 for e in errors), errors  # the operands really went through FP8


def test_fp8_gemms_are_the_exact_products_of_the_tile_quantised_operands(layer):
    """y = Q(x; 1x128) Q(W; 128x128), dx = Q(dy; 1x128) Q(W^T; 128x128), dW = Q(x^T; 1x128 along tokens)
    Q(dy; 128x1 along tokens), each reproduced here with quantize/dequantize and a float32 matmul."""
    x, w, dy, fp8, _ = layer

    def qd(a, tile):  # dequantised tile quantisation of a 2-D array, padded to whole tiles and cropped back
        p = fp8_lib._pad(fp8_lib._pad(a, 0, tile[0]), 1, tile[1])
        return fp8_lib.dequantize(*fp8_lib.quantize(p, tile), tile)[: a.shape[0], : a.shape[1]]

    x2, dy2 = x.reshape(B * T, D), dy.reshape(B * T, F)
    y = qd(x2, (1, 128)) @ qd(w, (128, 128))
    dx = qd(dy2, (1, 128)) @ qd(w.T, (128, 128))
    dw = qd(x2.T, (1, 128)) @ qd(dy2, (128, 1))
    for got, want in zip(fp8, (y, dx, dw), strict=True):
        np.testing.assert_allclose(np.asarray(got).reshape(want.shape), np.asarray(want), rtol=2e-5,
                                   atol=2e-5 * float(jnp.abs(want).max()))


def test_fp8_gemms_looped_over_contraction_chunks_equal_one_pass(layer, monkeypatch):
    """With `PARTIAL_BYTES` below one chunk's partial products, each GEMM loops over its contraction chunks one at a
    time (bounded memory at 671B) and gives the one-pass result to float32 summation order."""
    x, w, dy, fp8, _ = layer
    monkeypatch.setattr(fp8_lib, "PARTIAL_BYTES", 1)
    fn = functools.partial(fp8_lib.fp8_einsum, SPEC)
    assert "while" in jax.jit(fn).lower(x, w).as_text()  # the chunks run in a loop
    y, vjp = jax.vjp(fn, x, w)
    for got, want in zip((y, *vjp(dy)), fp8, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                                   atol=1e-6 * float(jnp.abs(want).max()))


def test_fp8_ragged_dot_and_its_gradients_match_float32_and_spare_idle_experts():
    rng = np.random.default_rng(3)
    x = jnp.asarray(with_outliers(rng, (300, 160)))
    w = jnp.asarray(with_outliers(rng, (4, 160, 130)) * 0.05)
    dy = jnp.asarray(with_outliers(rng, (300, 130)))
    sizes = jnp.array([100, 0, 150, 40], jnp.int32)  # expert 1 idle; 10 rows past the last group

    def grads(fn):
        y, vjp = jax.vjp(fn, x, w)
        return (y, *vjp(dy))

    fp8 = grads(lambda a, b: fp8_lib.fp8_ragged_dot(a, b, sizes))
    ref = grads(lambda a, b: jax.lax.ragged_dot(a, b, sizes, precision=HI))
    errors = [rel_err(a, b) for a, b in zip(fp8, ref, strict=True)]
    assert all(1e-3 < e < 0.05 for e in errors), errors
    assert not np.asarray(fp8[2][1]).any()  # no gradient for the expert without tokens
    assert not np.asarray(fp8[0][290:]).any()  # rows outside every group stay zero


# ----------------------------------------------------------------------------------------------------------------
# The lowered train step.

SEQ = 24  # T: unique among the dims below, so the attention core's (T, S) dots are recognisable
FP8_TINY = ["impl.precision=fp8", "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=32",
            "model.v_head_dim=16", "model.moe_intermediate_size=32", "model.n_routed_experts=10", "model.n_group=2",
            "model.topk_group=1", "model.intermediate_size=200", f"data.seq_len={SEQ}",
            "train.global_batch_size=4"]
_DOT = re.compile(r"stablehlo\.dot_general.*?contracting_dims = \[([\d, ]*)\] x .*?"
                  r": \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)")


def _dims(t: str) -> list[int]:
    return [int(d) for d in t[len("tensor<"):-1].split("x")[:-1]]


@pytest.fixture(scope="module")
def lowered_dots():
    """(contracting dims, lhs, rhs, out) of every dot_general in the lowered fp8 train step (not compiled)."""
    cfg = load_config("tiny", FP8_TINY)
    graphdef, abs_params, _ = train_state.split_abstract(cfg)
    tx = train_state.make_optimizer(cfg.train, train_state.decay_mask(abs_params))
    state = train_state.abstract_state(cfg)[0]
    batch = {k: jax.ShapeDtypeStruct((4, SEQ + 1), jnp.int32) for k in BATCH_KEYS}
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, cfg=cfg))
    with jax.set_mesh(make_mesh(cfg.mesh)):
        text = step.lower(state, batch).as_text()
    dots = [(m[0], m[1], m[2], m[3]) for m in _DOT.findall(text)]
    assert len(dots) == text.count("stablehlo.dot_general")  # the pattern read every dot
    return cfg, dots


def test_lowered_step_runs_linear_layers_in_fp8_with_128_wide_chunks(lowered_dots):
    cfg, dots = lowered_dots
    f8 = [d for d in dots if "f8E4M3FN" in d[1]]
    assert len(f8) >= 30  # forward, dgrad and wgrad of every projection, dense and MoE (counted once per scan body)
    ks = []
    for contracting, lhs, rhs, out in f8:
        assert "f8E4M3FN" in rhs and out.endswith("xf32>")  # both operands E4M3, float32 accumulation
        ks.append(_dims(lhs)[int(contracting.split(",")[0])])
    # each dot covers one contraction chunk, partial sums promoted every <= 128 elements; the dense layer's
    # intermediate_size=200 contraction is cut into 128-wide chunks
    assert max(ks) == 128, sorted(set(ks))


def test_lowered_step_keeps_head_router_and_attention_core_out_of_fp8(lowered_dots):
    cfg, dots = lowered_dots
    m = cfg.model
    excluded = {
        "head": lambda shapes: any(m.vocab_size in s for s in shapes),
        "router": lambda shapes: any(m.n_routed_experts in s for s in shapes),
        "attention core": lambda shapes: any(s.count(SEQ) >= 2 for s in shapes),  # (B, H, T, S) scores / probs
    }
    for name, touches in excluded.items():
        mine = [d for d in dots if touches([_dims(t) for t in d[1:]])]
        assert mine, name  # the module is in the step ...
        assert not any("f8E4M3FN" in t for d in mine for t in d[1:]), name  # ... and none of its dots are FP8


# ----------------------------------------------------------------------------------------------------------------
# Optimizer moments and config errors.


def test_bfloat16_moments_are_stored_in_bfloat16_and_update_like_float32():
    params = {"w": jnp.asarray(np.random.default_rng(4).standard_normal((8, 8)), jnp.float32)}
    grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    mask = {"w": True}
    cfg = load_config("tiny")
    runs = {}
    for dt in ("float32", "bfloat16"):
        tx = train_state.make_optimizer(dataclasses.replace(cfg.train, moments_dtype=dt), mask)
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(grads, state, params)
        floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(d == jnp.dtype(dt) for d in floats), floats
        runs[dt] = optax.apply_updates(params, updates)["w"]
    assert runs["bfloat16"].dtype == jnp.float32  # master weights stay float32
    np.testing.assert_allclose(runs["bfloat16"], runs["float32"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides, names", [
    (["impl.precision=fp4"], "impl.precision"),
    (["impl.precision=fp8"], "model.kv_lora_rank"),  # tiny: kv_lora_rank 20 < 32
    (FP8_TINY[:-2] + ["model.moe_intermediate_size=24"], "model.moe_intermediate_size"),
    (["train.moments_dtype=float16"], "train.moments_dtype"),
])
def test_bad_precision_settings_are_one_line_errors(overrides, names):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert names in str(e.value) and "\n" not in str(e.value)
