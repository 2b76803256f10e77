"""Expert parallelism: the backend registry against a naive loop, the exchange offsets against a simulation of
ragged_all_to_all, the platform/mesh choice, and on 8 CPU devices (subprocesses: the device count is fixed at JAX
start-up) the sharded train step against the single-device one, the collectives of the compiled step, and the
ragged_all_to_all path cross-lowered for TPU."""

import functools
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from dsv3_jax.errors import ConfigError
from dsv3_jax.kernels.precision import Policy
from dsv3_jax.model import moe, moe_backends, routing
from dsv3_jax.parallel import expert_parallel
from dsv3_jax.parallel.sharding import MESH_AXES, RULES
from dsv3_jax.presets import load_config
from dsv3_jax.train import loop
from tests import xla_env
from tests.test_moe import _naive

ENV = xla_env.env(8)

# The train step on each mesh of MESHES vs on one device, in one process: the single-device reference is built
# once per config, each mesh's step is compiled once, and the (data=2, expert=4) step's compiled program also gives
# the collectives check. The optimizer is replaced by one that stores the gradients as its state, so the
# (micro-batch accumulated) gradients come out of the real train_step. Prints one JSON line: "ok" or the failure,
# per case, so that each parametrized test names its own mesh.
MESHES = {"data=8": ("data=8", ()), "data=2,expert=4": ("data=2,expert=4", ()), "expert=8": ("expert=8", ()),
          "fsdp=2,expert=2,tensor=2": ("fsdp=2,expert=2,tensor=2", ()),
          "ep-chunks": ("data=2,expert=4", ("impl.moe_ep_chunk_tokens=6",))}
HLO_MESH = "data=2,expert=4"

STEP_SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    from tests.checks import outcome
    import jax, jax.numpy as jnp, numpy as np, optax
    from dsv3_jax.train import loop
    from dsv3_jax.train.state import init_state
    from dsv3_jax.train.step import forward, train_step
    from dsv3_jax.config import MeshConfig
    from dsv3_jax.presets import load_config
    from dsv3_jax.parallel.sharding import make_mesh
    SEQ, B, M = 16, 16, 2
    cases, hlo_mesh = json.loads(sys.argv[1]), sys.argv[2]

    def config(overrides):
        return load_config("tiny", [f"data.seq_len={SEQ}", f"train.global_batch_size={B}", f"train.micro_batches={M}",
                                    "train.bias_gamma=0.01", "train.balance_alpha=0.01", *overrides])

    rng = np.random.default_rng(0)
    tokens = rng.integers(2, config(()).model.vocab_size, size=(B, SEQ + 1)).astype(np.int32)
    seg = np.ones((B, SEQ + 1), np.int32); seg[:, 9:] = 2; seg[-1, -3:] = 0
    pos = np.tile(np.arange(SEQ + 1, dtype=np.int32), (B, 1)); pos[:, 9:] -= 9
    batch = {"tokens": tokens, "segment_ids": seg, "positions": pos}
    keep_grads = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                              lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))

    def compile_step(cfg, mesh):
        state, graphdef, _ = init_state(cfg, mesh)
        state = state._replace(opt_state=keep_grads.init(state.params))

        def f(state, batch):
            new, metrics = train_step(state, batch, graphdef, keep_grads, cfg)
            out = forward(graphdef, state.params, state.bias, batch)
            return dict(metrics=metrics, grads=new.opt_state, bias=new.bias, logits=out.logits,
                        mtp_logits=out.mtp_logits, counts=out.aux["expert_counts"],
                        mtp_counts=out.aux["mtp_expert_counts"])

        with jax.set_mesh(mesh):
            return jax.jit(f).lower(state, batch).compile(), state

    def check_step(cfg, step, state, ref):
        got = jax.device_get(step(state, batch))
        for (path, r), g in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(got)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5,
                                       err_msg=jax.tree_util.keystr(path))
        np.testing.assert_array_equal(got["counts"], ref["counts"])
        assert got["counts"].sum() == (seg[:, :-1] != 0).sum() * cfg.model.num_experts_per_tok * 2

    def check_hlo(cfg, mesh, step, state):
        hlo = step.as_text()
        k, d, e, f = (cfg.model.num_experts_per_tok, cfg.model.hidden_size, cfg.model.n_routed_experts,
                      cfg.model.moe_intermediate_size)
        dp, ep = 8, mesh.shape["expert"]
        rows = B // M // dp * SEQ * k  # routed rows one device sends per micro-batch
        ops = re.findall(r"= (\(?[^=]*?\)?) (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)"
                         r"(?:-start)?\(", hlo)
        assert ops, "no collectives parsed"
        batch_dims = {B * SEQ, B // M * SEQ, B * SEQ * k, B // M * SEQ * k}
        for t, op in ops:
            for shp in re.findall(r"\[([0-9,]*)\]", t):
                dims = [int(x) for x in shp.split(",") if x]
                assert not batch_dims & set(dims), f"{op} of {t}: a whole-batch routing/activation tensor"
                assert dims[:2] not in ([B, SEQ], [B // M, SEQ]), f"{op} of {t}: the whole batch's activations"
                assert not (op != "all-reduce" and dims[-3:] in ([e, d, f], [e, f, d])), f"{op} of {t}: all experts"
        moved = [t for t, op in ops if op == "all-to-all" and f"f32[1,{rows},{d}]" in t]
        assert len(moved) >= 4, ("token rows do not move by all-to-all", [t for t, op in ops if op == "all-to-all"])
        w = state.params["moe_layers"]["mlp"]["w_gate"]
        assert w.sharding.shard_shape(w.shape)[1] == e // ep, w.sharding

    refs, results = {}, {}
    for name, (shape_text, overrides) in cases.items():
        cfg = config(overrides)
        if tuple(overrides) not in refs:
            ref_step, ref_state = compile_step(cfg, make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
            refs[tuple(overrides)] = jax.device_get(ref_step(ref_state, batch))
        shape = {k: int(v) for k, v in (kv.split("=") for kv in shape_text.split(","))}
        mesh = make_mesh(MeshConfig(**{"data": 1, **shape}))
        step, state = compile_step(cfg, mesh)
        results[name] = outcome(check_step, cfg, step, state, refs[tuple(overrides)])
        if shape_text == hlo_mesh and not overrides:
            results["hlo"] = outcome(check_hlo, cfg, mesh, step, state)
    print("EP_RESULTS", json.dumps(results))
""")

# The dense exchange against ragged_all_to_all's semantics on 4 devices (arrays saved for the parent), and the
# ragged backend (forward and gradient) exported for TPU and CUDA.
EXCHANGE_SCRIPT = textwrap.dedent("""
    import functools, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from dsv3_jax.parallel import expert_parallel
    from dsv3_jax.model import moe_backends, routing, moe
    from dsv3_jax.kernels.precision import Policy
    S, R, D = 4, 6, 3
    mesh = Mesh(np.array(jax.devices()[:S]), ("expert",))
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.multinomial(int(rng.integers(0, R + 1)), [1 / S] * S) for _ in range(S)]).astype(np.int32)
    operand = rng.normal(size=(S * R, D)).astype(np.float32)

    def both_ways(op, sizes):
        fwd, back = expert_parallel.exchange_plans(sizes, jax.lax.axis_index("expert"))
        there = expert_parallel.all_to_all_exchange(op, jnp.full((S * R, D), -1.0), fwd, ("expert",), R)
        return there, expert_parallel.all_to_all_exchange(there, jnp.full((R, D), -1.0), back, ("expert",), R)

    there, back = jax.jit(jax.shard_map(both_ways, mesh=mesh, in_specs=(P("expert"), P()), out_specs=P("expert"),
                                        check_vma=False))(operand, sizes)
    np.savez(sys.argv[1], sizes=sizes, operand=operand, there=there, back=back)
    print("EXCHANGE_OK")

    N, K, E, F = 8, 2, 8, 5
    ctx = moe_backends.MoeContext(Policy(), 4, "ragged_dot", ("expert",))
    w_spec = moe_backends.ExpertWeights(P("expert"), P("expert"), P("expert"))

    def loss(x, idx, gates, w):
        y, _ = moe_backends.BACKENDS["ep_ragged"].fn(x, routing.Routing(idx, gates), w, ctx)
        return jax.lax.psum((y * y).sum(), "expert")

    f = jax.shard_map(jax.value_and_grad(loss, argnums=(0, 3)), mesh=mesh,
                      in_specs=(P("expert"), P("expert"), P("expert"), w_spec),
                      out_specs=(P(), (P("expert"), w_spec)), check_vma=False)
    args = (jax.ShapeDtypeStruct((S * N, D), jnp.float32), jax.ShapeDtypeStruct((S * N, K), jnp.int32),
            jax.ShapeDtypeStruct((S * N, K), jnp.float32),
            moe_backends.ExpertWeights(*(jax.ShapeDtypeStruct(s, jnp.float32)
                                         for s in [(E, D, F), (E, D, F), (E, F, D)])))
    for platform in ("tpu", "cuda"):
        exp = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")])(*args)
        text = exp.mlir_module()
        n = text.count("ragged_all_to_all")
        assert n >= 4, (platform, n)  # dispatch rows + ids, return rows, and the transposes in the gradient
        print("EXPORT_OK", platform, n)
""")


# Token chunks of the expert-parallel exchange (impl.moe_ep_chunk_tokens) against the one-shot exchange on a
# (data=2, expert=4) mesh: outputs and gradients (tokens, gates, expert weights), and the compiled all-to-alls carry
# only one chunk's rows. 14 tokens per device in chunks of <= 4: 4 chunks, the last padded by 2 tokens.
CHUNK_SCRIPT = textwrap.dedent(r"""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from dsv3_jax.tools import hlo
    from dsv3_jax.parallel import expert_parallel
    from dsv3_jax.model import moe_backends, routing, moe
    from dsv3_jax.kernels.precision import Policy
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "expert"))
    N, K, E, D, F, CHUNK = 14, 2, 8, 6, 5, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8 * N, D)).astype(np.float32)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(8 * N)]).astype(np.int32)
    idx[:N] = [0, 1]  # device 0 sends every row to shard 0
    gates = rng.uniform(size=(8 * N, K)).astype(np.float32)
    cot = rng.normal(size=(8 * N, D)).astype(np.float32)
    w = moe_backends.ExpertWeights(*(rng.normal(size=s).astype(np.float32) * 0.3
                                     for s in [(E, D, F), (E, D, F), (E, F, D)]))
    tok, w_spec = P(("data", "expert")), moe_backends.ExpertWeights(P("expert"), P("expert"), P("expert"))

    def run(chunk):  # (loss, grads) and the compiled program's text
        ctx = moe_backends.MoeContext(Policy(), 4, "blocked", ("expert",), chunk_tokens=chunk,
                                      blocks_per_step=2 if chunk else 0)  # the loop over used blocks, inside shard_map
        y = jax.shard_map(lambda x, i, g, w: moe_backends.BACKENDS["ep_a2a"].fn(x, routing.Routing(i, g), w, ctx)[0],
                          mesh=mesh,
                          in_specs=(tok, tok, tok, w_spec), out_specs=tok)
        f = jax.jit(jax.value_and_grad(lambda x, g, w: (y(x, idx, g, w) * cot).sum(), argnums=(0, 1, 2)))
        compiled = f.lower(x, gates, w).compile()
        return compiled(x, gates, w), compiled.as_text()

    (ref, ref_hlo), (got, got_hlo) = run(0), run(CHUNK)
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    for text, rows in ((ref_hlo, N * K), (got_hlo, CHUNK * K)):  # rows per peer of every exchanged activation
        shapes = re.findall(r"= \(?([^=]*?)\)? all-to-all", text)
        dims = {int(m) for t in shapes for m in re.findall(r"f32\[\d+,(\d+),%d\]" % D, t)}
        assert dims == {rows}, (rows, dims, shapes)
    # the weights' gradient is psum'd over `data` once, after the loop over chunks, as in the one-shot program
    reduces = [hlo.analyze(t, 8)["collectives"]["all-reduce"]["count"] for t in (ref_hlo, got_hlo)]
    assert reduces[0] == reduces[1], reduces
    print("CHUNKS_OK", reduces)
""")


def _run(script: str, *args: str, timeout: int = 1500) -> str:
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV,
                       timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r.stdout


def test_ep_token_chunks_equal_the_one_shot_exchange_and_move_one_chunk_at_a_time():
    assert "CHUNKS_OK" in _run(CHUNK_SCRIPT, timeout=600)


@pytest.mark.parametrize("name", sorted(moe_backends.BACKENDS))
def test_every_backend_matches_a_naive_loop(name):
    """Each registry entry on one device (expert-parallel ones inside shard_map over a 1-device mesh)."""
    if name == "ep_ragged" and jax.default_backend() == "cpu":
        pytest.skip("XLA:CPU has no ragged-all-to-all; test_ragged_path_cross_lowers_for_tpu compiles it")
    n, d, f, e, k = 24, 12, 10, 6, 2
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (n, d))
    rng = np.random.default_rng(0)
    idx = jnp.asarray(np.stack([rng.choice([0, 1, 2, 3, 5], k, replace=False) for _ in range(n)]), jnp.int32)
    gates = jax.random.uniform(keys[1], (n, k))
    w = moe_backends.ExpertWeights(*(jax.random.normal(kk, s) * 0.3 for kk, s in
                                     zip(keys[2:], [(e, d, f), (e, d, f), (e, f, d)])))
    ep = moe_backends.BACKENDS[name].expert_parallel
    ctx = moe_backends.MoeContext(Policy(), 4, "blocked", ("expert",) if ep else (), blocks_per_step=2)
    fn = functools.partial(moe_backends.BACKENDS[name].fn, ctx=ctx)
    if moe_backends.BACKENDS[name].expert_parallel:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("expert",))
        fn = jax.shard_map(fn, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec(), check_vma=False)
    y = fn(x, routing.Routing(idx, gates), w)
    if ep:
        y, dropped = y
        assert int(dropped) == 0  # dropless without impl.moe_capacity_factor
    np.testing.assert_allclose(y, _naive(x, idx, gates, *w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision, sent, back", [("bf16", "bf16[", "bf16["), ("fp32", "f32[", "f32["),
                                                   ("fp8", "u8[", "bf16[")])
def test_dispatched_rows_travel_in_the_dtype_the_expert_matmuls_read(precision, sent, back):
    """Under bf16 the routed rows and the expert outputs are exchanged as bf16 (half the bytes), not as the float32
    residual stream; under fp8 the rows go as E4M3 bytes with their 1x128 scales (D + 4 bytes per row at D < 128)
    and come back as bf16. The outputs equal the naive loop at the precision's tolerance (fp8: the local fp8 backend,
whose E4M3 operands the packed rows reproduce)."""
    n, d, f, e, k = 16, 12, 10, 4, 2
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    gates = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)
    w = moe_backends.ExpertWeights(*(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
                                     for s in [(e, d, f), (e, d, f), (e, f, d)]))
    ctx = moe_backends.MoeContext(Policy(precision=precision), 4, "blocked", ("expert",))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("expert",))
    fn = jax.shard_map(functools.partial(moe_backends.BACKENDS["ep_a2a"].fn, ctx=ctx), mesh=mesh,
                       in_specs=PartitionSpec(), out_specs=PartitionSpec(), check_vma=False)
    jaxpr = str(jax.make_jaxpr(fn)(x, routing.Routing(idx, gates), w))
    # the exchanges of rows: the dispatch (D wide, or D + 4 bytes packed), then the return of the expert outputs
    exchanges = [ln.split(":")[1] for ln in jaxpr.splitlines() if "all_to_all[" in ln and
                 (f",{d}]" in ln or f",{d + 4}]" in ln)]
    assert len(exchanges) == 2, exchanges
    width = d + 4 if precision == "fp8" else d  # (jaxpr text order: the custom-VJP dispatch prints last)
    assert sorted(ln.split("]")[0] + "]" for ln in exchanges) == sorted([f"{sent}1,32,{width}]", f"{back}1,32,{d}]"]), \
        exchanges
    y = fn(x, routing.Routing(idx, gates), w)[0]
    if precision == "fp8":  # the same E4M3 operands as the local backend's; only the bf16 return rounds
        local = moe_backends.BACKENDS["blocked"].fn(x, routing.Routing(idx, gates), w, ctx)
        np.testing.assert_allclose(y, local, rtol=1e-2, atol=1e-2)
        # straight-through: the packed rows' gradient comes back by the return exchange (bf16 rows both ways)
        loss = lambda f: lambda x, w: (f(x, routing.Routing(idx, gates), w)[0] ** 2).sum()  # noqa: E731
        g_ep = jax.grad(loss(fn), argnums=(0, 1))(x, w)
        g_local = jax.grad(loss(lambda x, r, w: (moe_backends.BACKENDS["blocked"].fn(x, r, w, ctx),)),
                           argnums=(0, 1))(x, w)
        for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_local), strict=True):  # dy rounds differently
            assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(b)  # one E4M3 step is 6%
    else:
        tol = {"fp32": 1e-5, "bf16": 0.05}[precision]
        np.testing.assert_allclose(y, _naive(x, idx, gates, *w), rtol=tol, atol=tol)


def _simulate_ragged_all_to_all(operands, outputs, plans):
    """ragged_all_to_all's documented semantics in numpy: device s writes operand[in_off[j] : +send[j]] into
    device j's output at out_off[j]."""
    outs = [o.copy() for o in outputs]
    for op, plan in zip(operands, plans):
        for j in range(len(outs)):
            a, m, o = int(plan.input_offsets[j]), int(plan.send_sizes[j]), int(plan.output_offsets[j])
            outs[j][o:o + m] = op[a:a + m]
    for j, plan in enumerate(plans):  # recv_sizes must agree with what the senders send
        assert [int(plans[s].send_sizes[j]) for s in range(len(plans))] == list(map(int, plan.recv_sizes))
    return outs


def test_exchange_plans_deliver_every_row_and_bring_it_back():
    """The offsets both exchanges share: rows reach their shard packed in sender order, and come back in place."""
    sizes = np.array([[2, 0, 3], [1, 4, 0], [0, 2, 2]], np.int32)  # sizes[s, j]: rows device s sends to j
    s_count = sizes.shape[0]
    plans = [expert_parallel.exchange_plans(jnp.asarray(sizes), jnp.int32(me)) for me in range(s_count)]
    # each device's rows, tagged (sender, destination, rank) and sorted by destination
    rows = [np.array([(s, j, r) for j in range(s_count) for r in range(sizes[s, j])], np.int32) for s in range(3)]
    cap = sizes.sum(0).max()
    recv = _simulate_ragged_all_to_all(rows, [np.full((cap, 3), -1, np.int32)] * 3, [p[0] for p in plans])
    for j in range(s_count):
        want = np.array([(s, j, r) for s in range(s_count) for r in range(sizes[s, j])], np.int32)
        np.testing.assert_array_equal(recv[j][:len(want)], want)
        assert np.all(recv[j][len(want):] == -1)
    back = _simulate_ragged_all_to_all(recv, [np.full_like(r, -1) for r in rows], [p[1] for p in plans])
    for s in range(s_count):
        np.testing.assert_array_equal(back[s], rows[s])


def test_capped_plans_deliver_each_chunks_first_rows_and_bring_back_only_those():
    """impl.moe_capacity_factor: at most `cap` rows of each (sender, destination) chunk travel, the first ones;
    they land packed in sender order within S * cap rows and come back in place; the rest stay unfilled."""
    sizes = np.array([[2, 0, 5], [1, 4, 0], [0, 3, 2]], np.int32)
    cap, s_count = 2, 3
    plans = [expert_parallel.exchange_plans(jnp.asarray(sizes), jnp.int32(me), cap) for me in range(s_count)]
    rows = [np.array([(s, j, r) for j in range(s_count) for r in range(sizes[s, j])], np.int32) for s in range(3)]
    recv = _simulate_ragged_all_to_all(rows, [np.full((s_count * cap, 3), -1, np.int32)] * 3, [p[0] for p in plans])
    for j in range(s_count):
        want = np.array([(s, j, r) for s in range(s_count) for r in range(min(sizes[s, j], cap))], np.int32)
        np.testing.assert_array_equal(recv[j][:len(want)], want)
        assert np.all(recv[j][len(want):] == -1)
    back = _simulate_ragged_all_to_all(recv, [np.full_like(r, -1) for r in rows], [p[1] for p in plans])
    for s in range(s_count):
        kept = np.array([r[2] < cap for r in rows[s]])
        np.testing.assert_array_equal(back[s][kept], rows[s][kept])
        assert np.all(back[s][~kept] == -1)
    assert [int(p[0].send_sizes.sum()) for p in plans] == [4, 3, 4]
    assert expert_parallel.pair_capacity(40, 8, None) == 40 and expert_parallel.pair_capacity(40, 8, 1.25) == 7
    assert expert_parallel.pair_capacity(40, 8, 100.0) == 40  # never more than every row


@pytest.mark.parametrize("factor", [None, 0.5, 1.0])
def test_capacity_factor_drops_the_rows_past_the_capacity_and_counts_them(factor):
    """On one shard a factor f keeps the first ceil(f * R) of the R routed rows in expert order (stable in token
    order): the output equals the naive loop with the dropped (token, choice) pairs' gates zeroed, and the backend
    reports how many it dropped."""
    n, d, f, e, k = 10, 8, 6, 4, 2
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    gates = rng.uniform(0.5, 1.0, size=(n, k)).astype(np.float32)
    w = moe_backends.ExpertWeights(*(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
                                     for s in [(e, d, f), (e, d, f), (e, f, d)]))
    ctx = moe_backends.MoeContext(Policy(), 4, "blocked", ("expert",), capacity_factor=factor)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("expert",))
    fn = jax.shard_map(functools.partial(moe_backends.BACKENDS["ep_a2a"].fn, ctx=ctx), mesh=mesh,
                       in_specs=PartitionSpec(), out_specs=PartitionSpec(), check_vma=False)
    y, dropped = fn(x, routing.Routing(jnp.asarray(idx), jnp.asarray(gates)), w)
    keep = n * k if factor is None else min(n * k, int(np.ceil(factor * n * k)))
    order = np.argsort(idx.reshape(-1), kind="stable")  # rows in expert order, ties in token order
    kept_gates = gates.reshape(-1).copy()
    kept_gates[order[keep:]] = 0.0
    want = _naive(x, jnp.asarray(idx), jnp.asarray(kept_gates.reshape(n, k)), *w)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert int(dropped) == n * k - keep


def _abstract(manual=(), **shape) -> AbstractMesh:
    sizes = {a: shape.get(a, 1) for a in MESH_AXES}
    kinds = tuple(AxisType.Manual if a in manual else AxisType.Auto for a in sizes)
    return AbstractMesh(tuple(sizes.values()), tuple(sizes), axis_types=kinds)


def test_auto_picks_expert_parallel_on_split_experts_and_the_local_matmul_per_platform():
    pol = Policy()

    def pick(mesh, platform, batch=8, impl="auto", experts=8):
        name, ctx, sharded = moe.choose(impl, mesh, RULES, batch, experts, 16, 4, pol, platform)
        return name, ctx.local, ctx.expert_axes, sharded

    assert pick(_abstract(data=2, expert=4), "cpu") == ("ep_a2a", "blocked", ("expert",), True)
    assert pick(_abstract(expert=8), "gpu") == ("ep_ragged", "blocked", ("expert",), True)
    assert pick(_abstract(expert=8), "tpu") == ("ep_ragged", "ragged_dot", ("expert",), True)
    assert pick(_abstract(data=8), "tpu")[:2] == ("ragged_dot", "ragged_dot")  # no expert split: local, own tokens
    assert pick(_abstract(data=8), "gpu") == ("blocked", "blocked", (), True)  # GPU ragged_dot pads to dense
    assert pick(_abstract(expert=4), "cpu", impl="blocked") == ("blocked", "blocked", (), False)  # GSPMD baseline
    assert pick(AbstractMesh((), ()), "cpu") == ("blocked", "blocked", (), False)
    assert pick(_abstract(expert=4), "cpu", batch=1) == ("blocked", "blocked", (), False)  # decoding one row
    assert pick(_abstract(fsdp=2, expert=2, tensor=2), "cpu")[2] == ("expert",)
    _, ctx, _ = moe.choose("auto", _abstract(fsdp=2, expert=2, tensor=2), RULES, 8, 8, 16, 4, pol, "cpu")
    assert ctx.ffn_axes == ("tensor",) and ctx.chunk_tokens == 0
    _, ctx, _ = moe.choose("auto", _abstract(expert=8), RULES, 8, 8, 16, 4, pol, "gpu", chunk_tokens=64)
    assert ctx.chunk_tokens == 64  # impl.moe_ep_chunk_tokens reaches the expert-parallel backend
    # impl.moe_blocks_per_step: None loops over the used blocks 8 at a time on CPU only; a number holds anywhere
    steps = {(platform, n): moe.choose("auto", AbstractMesh((), ()), RULES, 8, 8, 16, 4, pol, platform,
                                       blocks_per_step=n)[1].blocks_per_step
             for platform in ("cpu", "gpu") for n in (None, 0, 3)}
    assert steps == {("cpu", None): 8, ("gpu", None): 0, ("cpu", 0): 0, ("gpu", 0): 0, ("cpu", 3): 3, ("gpu", 3): 3}
    with pytest.raises(ConfigError, match="n_routed_experts"):
        pick(_abstract(expert=8), "cpu", experts=12)
    # experts over an axis that does not split the batch (tensor): the tokens its devices share are split among them
    everywhere = {**RULES, "experts": ("fsdp", "expert", "tensor")}
    _, ctx, _ = moe.choose("auto", _abstract(fsdp=2, expert=2, tensor=2), everywhere, 8, 8, 16, 4, pol, "cpu")
    assert ctx.expert_axes == ("fsdp", "expert", "tensor") and ctx.token_split_axes == ("tensor",)
    assert ctx.ffn_axes == ()  # tensor went to the experts
    # inside the train step's data-parallel region (the batch axes manual, this device's rows only) every backend
    # is "sharded": it reduces its expert counts over the batch axes
    region = _abstract(manual=("data", "fsdp", "expert"), data=2, expert=4)
    assert moe.choose("auto", region, RULES, 2, 8, 16, 4, pol, "cpu")[::2] == ("ep_a2a", True)
    assert moe.choose("blocked", _abstract(manual=("data", "fsdp", "expert"), data=8), RULES, 2, 8, 16, 4, pol,
                      "cpu")[::2] == ("blocked", True)


def test_negative_ep_chunk_is_one_line_config_error():
    with pytest.raises(ConfigError, match=r"impl.moe_ep_chunk_tokens must be >= 0, got -1"):
        load_config("tiny", ["impl.moe_ep_chunk_tokens=-1"])


def test_experts_not_divisible_by_expert_axis_is_one_line_error():
    cfg = load_config("tiny", ["train.global_batch_size=12"])
    with pytest.raises(ConfigError, match=r"model.n_routed_experts \(8\) is not divisible by the expert axis size 3"):
        loop.check_run(cfg, _abstract(expert=3))


@pytest.fixture(scope="module")
def mesh_steps() -> dict[str, str]:
    """Every mesh's comparison and the collectives check, from one 8-device process: "ok" or the failure."""
    out = _run(STEP_SCRIPT, json.dumps(MESHES), HLO_MESH)
    line = next(ln for ln in out.splitlines() if ln.startswith("EP_RESULTS "))
    results = json.loads(line.removeprefix("EP_RESULTS "))
    assert set(results) == {*MESHES, "hlo"}, results
    return results


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_step_equals_single_device_step(mesh_steps, mesh):
    """Logits, losses, gradients, expert counts, bias update on the mesh (micro_batches 2) vs one device; ep-chunks:
    (data=2, expert=4) with the exchange in 3 chunks of 6 of the 16 tokens per device (the last chunk padded)."""
    assert mesh_steps[mesh] == "ok", mesh_steps[mesh]


@pytest.mark.slow
def test_compiled_ep_step_moves_rows_by_all_to_all_and_gathers_no_batch(mesh_steps):
    """The compiled (data=2, expert=4) step: all-to-all of routed rows, no batch-sized gather, experts stay split."""
    assert mesh_steps["hlo"] == "ok", mesh_steps["hlo"]


def test_ragged_path_cross_lowers_for_tpu_and_the_dense_exchange_matches_its_semantics(tmp_path):
    out = _run(EXCHANGE_SCRIPT, str(tmp_path / "x.npz"), timeout=600)
    assert "EXPORT_OK tpu" in out and "EXPORT_OK cuda" in out, out
    z = np.load(tmp_path / "x.npz")
    s_count, r = z["sizes"].shape[0], z["operand"].shape[0] // z["sizes"].shape[0]
    plans = [expert_parallel.exchange_plans(jnp.asarray(z["sizes"]), jnp.int32(me)) for me in range(s_count)]
    ops = np.split(z["operand"], s_count)
    there = _simulate_ragged_all_to_all(ops, [np.full((s_count * r, 3), -1.0, np.float32)] * s_count,
                                        [p[0] for p in plans])
    np.testing.assert_array_equal(z["there"], np.concatenate(there))
    back = _simulate_ragged_all_to_all(there, [np.full((r, 3), -1.0, np.float32)] * s_count, [p[1] for p in plans])
    np.testing.assert_array_equal(z["back"], np.concatenate(back))
    sent = z["sizes"].sum(1)  # rows a device sent come back in place; the rest of its buffer stays untouched
    for s in range(s_count):
        np.testing.assert_array_equal(back[s][:sent[s]], ops[s][:sent[s]])


@pytest.mark.slow
def test_loop_fetches_metrics_only_every_log_every_steps(tmp_path, monkeypatch):
    """Steps are dispatched ahead: the host waits for metrics only at log steps, and those are still logged."""
    cfg = load_config("tiny", ["train.steps=6", "train.log_every=3", "train.eval_every=0", "train.sample_tokens=0",
                               f"train.run_dir={tmp_path}", "train.tensorboard=false", "train.progress=false",
                               "train.checkpoint_every=6", "data.seq_len=32", "data.max_documents=100"])
    fetched, device_get = [], jax.device_get

    def spy(x):
        if isinstance(x, dict) and "loss" in x:
            fetched.append(x)
        return device_get(x)

    monkeypatch.setattr(jax, "device_get", spy)
    last = loop.train(cfg)
    assert len(fetched) == 2, len(fetched)  # steps 3 and 6 only
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [3, 6], rows
    assert np.isfinite(last["loss"]) and last["tokens_per_s"] > 0
    assert (tmp_path / "checkpoints" / "6").is_dir()


def test_config_accepts_exactly_the_registry_names():
    from dsv3_jax.errors import ConfigError
    from dsv3_jax.presets import load_config

    for name in ("auto", *moe_backends.BACKENDS):
        assert load_config("tiny", [f"impl.moe_impl={name}"]).impl.moe_impl == name
    with pytest.raises(ConfigError, match="impl.moe_impl must be one of"):
        load_config("tiny", ["impl.moe_impl=ragged"])
