"""The vocabulary without its memory: the head's cross-entropy over vocabulary chunks (kernels/chunked_ce.py) equals
the whole-logits cross-entropy, values and gradients; the embedding lookup into a D-sharded table
(parallel/embedding.py) equals the whole-table lookup on 8 fake devices; a compiled train step with
`impl.vocab_chunk` holds no (.., V) activation and needs less temporary memory.

The 8-device checks run in one subprocess (SHARDED_SCRIPT) that prints one JSON line, "ok" or the failure per check.
"""

import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.errors import ConfigError
from dsv3_jax.kernels.chunked_ce import chunked_cross_entropy, chunked_token_losses
from dsv3_jax.kernels.precision import Policy
from dsv3_jax.presets import load_config
from dsv3_jax.train import losses
from tests import xla_env

N, D, V = 29, 16, 37
FP32 = Policy()


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w = jnp.asarray(0.3 * rng.normal(size=(D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    mask = jnp.asarray(rng.random(N) > 0.3)
    return h, w, targets, mask


def _whole(h, w, targets, mask):
    z = jnp.einsum("nd,dv->nv", h, w, precision=jax.lax.Precision.HIGHEST)
    return losses.cross_entropy_sum(z, targets, mask)[0]


@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 64])  # 8 and 10 leave a last partial chunk; 64 > V
def test_chunked_cross_entropy_equals_the_whole_logits_values_and_gradients(chunk):
    h, w, targets, mask = _problem()
    want, (want_dh, want_dw) = jax.value_and_grad(_whole, (0, 1))(h, w, targets, mask)
    chunked = jax.jit(jax.value_and_grad(
        lambda h, w: chunked_cross_entropy(h, w, targets, mask, chunk, FP32), (0, 1)))
    got, (dh, dw) = chunked(h, w)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(dh, want_dh, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-6, atol=1e-6)


def test_chunked_token_losses_take_a_weight_per_row():
    """The per-row form (main and MTP rows in one pass, each loss summed on its own): values per row, and the
    gradients under a different weight per row (a cotangent vector), equal the whole logits' within 1e-6."""
    h, w, targets, mask = _problem(3)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=N), jnp.float32)

    def whole_rows(h, w):
        logp = jax.nn.log_softmax(jnp.einsum("nd,dv->nv", h, w, precision=jax.lax.Precision.HIGHEST), axis=-1)
        return -jnp.take_along_axis(logp, targets[:, None], axis=1)[:, 0] * mask

    rows, vjp = jax.vjp(lambda h, w: chunked_token_losses(h, w, targets, mask, 10, FP32), h, w)
    want_rows, want_vjp = jax.vjp(whole_rows, h, w)
    np.testing.assert_allclose(rows, want_rows, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(weights), want_vjp(weights)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_chunked_cross_entropy_with_logits_far_apart_across_chunks():
    """The first chunk's max is far below a later one's: the running sum must be rescaled to the new max."""
    h, w, targets, mask = _problem(1)
    w = w.at[:, 30:].multiply(40.0)  # the last chunks' logits dominate
    want = _whole(h, w, targets, mask)
    got = chunked_cross_entropy(h, w, targets, mask, 8, FP32)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_chunked_cross_entropy_under_bf16_matches_the_whole_bf16_head():
    """bf16 operands, float32 accumulation, logits rounded to bf16 before the float32 loss, as the head does."""
    pol = Policy(precision="bf16", dtype="bfloat16")
    h, w, targets, mask = _problem(2)
    h = h.astype(jnp.bfloat16)

    def whole(h, w):
        z = jnp.einsum("nd,dv->nv", h, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return losses.cross_entropy_sum(z.astype(jnp.bfloat16), targets, mask)[0]

    want, (want_dh, want_dw) = jax.value_and_grad(whole, (0, 1))(h, w)
    got, (dh, dw) = jax.value_and_grad(lambda h, w: chunked_cross_entropy(h, w, targets, mask, 10, pol), (0, 1))(h, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # bf16 gradients: the whole path rounds dh once; so does the chunked one (float32 sum over the chunks)
    np.testing.assert_allclose(dh.astype(np.float32), want_dh.astype(np.float32), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-2, atol=1e-3)


@pytest.mark.slow
def test_model_head_cross_entropy_equals_the_logits_losses_main_and_mtp():
    """The tiny model (V = 258) with impl.vocab_chunk=100: `head_cross_entropy` on the normed outputs gives the
    main and MTP losses of the logits, and the same gradients wrt every parameter (float32, within 1e-6)."""
    from flax import nnx

    from dsv3_jax.model.transformer import create

    cfg = load_config("tiny", ["impl.vocab_chunk=100"])
    model = create(cfg.model, 0, impl=cfg.impl)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.model.vocab_size, (2, 13)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 7 + [2] * 5 + [0]], 2, 0), jnp.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, chunked):
        m = nnx.merge(graphdef, params, rest)
        out = m(tokens[:, :-1], segment_ids=seg[:, :-1], return_logits=not chunked)
        x, mtp_x, ce = ((out.normed, out.mtp_normed, m.head_cross_entropy) if chunked
                        else (out.logits, out.mtp_logits, losses.cross_entropy_sum))
        main, n = losses.next_token_loss(x, tokens, seg, ce)
        mtp, mtp_n = losses.mtp_losses(mtp_x, tokens, seg, ce)
        return main + mtp.sum(), (main, mtp, n, mtp_n)

    (_, want), want_g = jax.value_and_grad(loss, has_aux=True)(params, False)
    (_, got), got_g = jax.value_and_grad(loss, has_aux=True)(params, True)
    assert float(got[2]) == 20 and float(got[3][0]) == 16  # per row: documents of 7 and 5 tokens, 6 + 4 and 5 + 3
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_vocab_chunk_must_not_be_negative():
    assert load_config("tiny", ["impl.vocab_chunk=100"]).impl.vocab_chunk == 100
    with pytest.raises(ConfigError, match="impl.vocab_chunk must be >= 0, got -1"):
        load_config("tiny", ["impl.vocab_chunk=-1"])


SHARDED_SCRIPT = textwrap.dedent(r"""
    import json
    from functools import partial
    from tests.checks import outcome
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dsv3_jax.kernels.chunked_ce import chunked_cross_entropy, chunked_token_losses
    from dsv3_jax.kernels.precision import Policy
    from dsv3_jax.parallel.embedding import lookup_d_sharded

    mesh = jax.make_mesh((2, 4), ("fsdp", "expert"))
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    rng = np.random.default_rng(0)
    V, D, B, T = 37, 16, 8, 5
    table = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    cot = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)  # a cotangent for the rows

    def check_lookup(axes):
        # the table's D columns over `axes`, the rows over both mesh axes (each device its own tokens)
        def sharded(table, ids, cot):
            rows = lookup_d_sharded(table, ids, axes, jnp.float32)
            return jax.lax.psum((rows * cot).sum(), ("fsdp", "expert")), rows

        def loss(table):
            out, rows = jax.shard_map(sharded, mesh=mesh, in_specs=(P(None, axes), P(("fsdp", "expert")),
                                      P(("fsdp", "expert"))), out_specs=(P(), P(("fsdp", "expert"))))(
                table, put(ids, *rows_spec), put(cot, *rows_spec))
            return out, rows

        rows_spec = (("fsdp", "expert"),)
        (val, rows), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(put(table, None, axes))
        want_rows = jnp.take(table, ids, axis=0)
        want_grad = jax.grad(lambda t: (jnp.take(t, ids, axis=0) * cot).sum())(table)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6)

    N = 24
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w = jnp.asarray(0.3 * rng.normal(size=(D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    mask = jnp.asarray(rng.random(N) > 0.3)

    def check_ce(chunk):
        pol = Policy()
        # h and targets over both axes (rows), the head's D rows over `expert` (gathered per chunk)
        def sharded(h, w, t, m):
            return jax.lax.psum(chunked_cross_entropy(h, w, t, m, chunk, pol, ("expert",)), ("fsdp", "expert"))

        rows = P(("fsdp", "expert"))
        f = jax.shard_map(sharded, mesh=mesh, in_specs=(rows, P("expert", None), rows, rows), out_specs=P())
        r = ("fsdp", "expert")
        got, (dh, dw) = jax.jit(jax.value_and_grad(lambda h, w: f(h, w, put(targets, r), put(mask, r)), (0, 1)))(
            put(h, r, None), put(w, "expert", None))
        want, (want_dh, want_dw) = jax.value_and_grad(
            lambda h, w: chunked_cross_entropy(h, w, targets, mask, V, pol), (0, 1))(h, w)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(dh, want_dh, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dw, want_dw, rtol=1e-6, atol=1e-6)

    results = {"lookup-expert": outcome(check_lookup, ("expert",)),
               "lookup-two-axes": outcome(check_lookup, ("expert", "fsdp")),
               "ce-sharded": outcome(check_ce, 10)}
    print("VOCAB_RESULTS", json.dumps(results))
""")


@pytest.fixture(scope="module")
def sharded_checks() -> dict[str, str]:
    return xla_env.script_results(SHARDED_SCRIPT, "VOCAB_RESULTS", timeout=600)


@pytest.mark.parametrize("check", ["lookup-expert", "lookup-two-axes"])
def test_d_sharded_embedding_lookup_equals_the_whole_table(sharded_checks, check):
    """8 fake devices, the table's D columns over `expert` (4) or expert x fsdp (8), each device its own tokens:
    the rows equal the whole-table lookup exactly, the table's gradient (scatter-add into the shards) within 1e-6."""
    assert sharded_checks[check] == "ok", sharded_checks[check]


def test_chunked_cross_entropy_on_a_d_sharded_head(sharded_checks):
    """The head's D rows over `expert`, its columns gathered chunk by chunk (10 of V = 37): loss, dh and the
    reduce-scattered dW equal one device within 1e-6."""
    assert sharded_checks["ce-sharded"] == "ok", sharded_checks["ce-sharded"]


MEM_V, MEM_CHUNK = 3001, 1024  # a vocabulary no other dimension of the tiny model shares; 2 full chunks + 953


def _compiled_step(chunk: int):
    from jax.sharding import NamedSharding

    from dsv3_jax.parallel.sharding import logical_spec, make_mesh, rules_for, use_rules
    from dsv3_jax.train.state import init_state
    from dsv3_jax.train.step import jit_train_step

    cfg = load_config("tiny", [f"model.vocab_size={MEM_V}", "data.seq_len=64", "train.global_batch_size=8",
                               "train.micro_batches=2", "mesh.data=1", f"impl.vocab_chunk={chunk}"])
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
    with use_rules(rules_for(cfg.mesh)):
        state, graphdef, tx = init_state(cfg, mesh)
        rows = NamedSharding(mesh, logical_spec(("batch",)))
    batch = {k: jax.ShapeDtypeStruct((8, 65), jnp.int32, sharding=rows) for k in ("tokens", "segment_ids",
                                                                                 "positions")}
    step = jit_train_step(cfg, graphdef, tx, mesh, state, donate=False)
    with jax.set_mesh(mesh), use_rules(rules_for(cfg.mesh)):
        return step.lower(state, batch).compile(), cfg.model.hidden_size


def _vocab_activations(text: str, d: int) -> set[tuple[int, ...]]:
    """Shapes in the HLO with a dimension V, other than the head's and the embedding's own (D, V) and (V, D)."""
    shapes = {tuple(int(x) for x in dims.split(",")) for dims in re.findall(r"\w+\[([\d,]+)\]", text)}
    return {s for s in shapes if MEM_V in s and sorted(s) != sorted((d, MEM_V))}


@pytest.mark.slow
def test_chunked_train_step_holds_no_vocab_activation_and_less_temporary_memory():
    """The tiny model at V = 3001, 2 micro-batches of 4 x 64 tokens, compiled on one device: whole logits put
    (.., V) arrays in the program (the measurement sees them); vocab_chunk=1024 leaves none, and XLA's temporary
    buffers shrink by more than one micro-batch's float32 logits."""
    whole, d = _compiled_step(0)
    chunked, _ = _compiled_step(MEM_CHUNK)
    assert _vocab_activations(whole.as_text(), d), "the measurement finds no logits in the whole-logits step"
    assert not _vocab_activations(chunked.as_text(), d), sorted(_vocab_activations(chunked.as_text(), d))
    logits_bytes = 4 * 64 * MEM_V * 4
    saved = whole.memory_analysis().temp_size_in_bytes - chunked.memory_analysis().temp_size_in_bytes
    assert saved > logits_bytes, (saved, logits_bytes)
