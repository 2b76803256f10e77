"""Gradients summed over micro-batches in place: under `impl.remat: full` the layer scans add each layer's weight
gradient into the accumulator (kernels/accumulating_scan.py) instead of `acc + grad(micro_batch)`.

Checked: the sums equal the plain `acc + grad` sums (values and gradients, with MTP and the balance loss); the
micro-batch loop adds no whole (L, ...) gradient stack (the memory this saves at 671B: docs/scale.md); and on 8
fake devices the
expert-parallel layout of the 671B `-ep` preset (experts resident, weights gathered per layer inside the node,
vocabulary chunks) trains two steps equal to one device within 1e-6.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels.accumulating_scan import accumulating_scan
from dsv3_jax.parallel.sharding import make_mesh
from dsv3_jax.presets import load_config
from dsv3_jax.train import state as train_state
from dsv3_jax.train import step as train_step
from tests import checks, xla_env

SEQ, BATCH = 16, 4
STACKS = train_step.STACKS  # the stacks accumulated in place; () turns that off


def _batch(vocab: int) -> dict:
    """Rows of two documents each, padding at the end of the last row."""
    return checks.packed_rows(np.random.default_rng(3), BATCH, SEQ, vocab, cut=7)


def test_accumulating_scan_gradient_is_the_accumulator_plus_the_scan_gradient():
    """A 3-layer tanh stack with an integer and a float side output: values equal lax.scan's; the weights'
    cotangent is acc + the true gradient, the input's is the true one."""
    rng = np.random.default_rng(0)
    w = {"a": jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3, 4)),
                                                                                      jnp.float32)}
    acc = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), w)
    scale, x0 = jnp.float32(0.5), jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)

    def body(x, wl, consts, s):
        y = jnp.tanh(x @ wl["a"] + wl["b"]) * consts[0] + s
        return y, ((y > 0).sum(), (y ** 2).sum())

    def loss(scan, w, x):
        y, (count, sq) = scan(w, x)
        return (y ** 3).sum() + sq.sum() + 0.0 * count.sum()

    shift = jnp.arange(3, dtype=jnp.float32)
    plain = lambda w, x: jax.lax.scan(lambda c, ws: body(c, ws[0], (scale,), ws[1]), x, (w, shift))  # noqa: E731
    mine = lambda w, x: accumulating_scan(body, x, w, acc, (scale,), shift)  # noqa: E731
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)
    jax.tree.map(close, mine(w, x0), plain(w, x0))
    (gw, gx), (rw, rx) = (jax.grad(functools.partial(loss, f), argnums=(0, 1))(w, x0) for f in (mine, plain))
    jax.tree.map(close, gw, jax.tree.map(jnp.add, acc, rw))
    close(gx, rx)


def _sums(cfg, in_place: bool, monkeypatch):
    """(total, aux, grads) of `_accumulate` on one batch split into cfg.train.micro_batches; in_place=False runs
    the plain `acc + grad` sum (no stack is accumulated in place)."""
    monkeypatch.setattr(train_step, "STACKS", STACKS if in_place else ())
    jax.clear_caches()  # STACKS is read while tracing: no traced program of the other setting may be reused
    mesh = make_mesh(cfg.mesh)
    state, graphdef, _ = train_state.init_state(cfg, mesh)
    m = cfg.train.micro_batches
    micro = jax.tree.map(lambda x: jnp.asarray(x).reshape(BATCH // m, m, *x.shape[1:]).swapaxes(0, 1),
                         _batch(cfg.model.vocab_size))
    fn = jax.jit(functools.partial(train_step._accumulate, graphdef=graphdef, cfg=cfg))
    with jax.set_mesh(mesh):
        return fn(state.params, state.bias, micro, jnp.float32(50.0), jnp.full((1,), 40.0), jnp.float32(0.3))


def test_in_place_sums_equal_the_plain_sums(monkeypatch):
    cfg = load_config("tiny", [f"data.seq_len={SEQ}", f"train.global_batch_size={BATCH}", "impl.remat=full",
                               "train.micro_batches=2", "train.balance_alpha=0.01"])
    assert cfg.model.num_nextn_predict_layers >= 1 and cfg.model.first_k_dense_replace >= 1  # both stacks, MTP
    total, aux, grads = _sums(cfg, True, monkeypatch)
    ref_total, ref_aux, ref_grads = _sums(cfg, False, monkeypatch)
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    for k in ("ce", "mtp_ce", "balance", "counts"):
        np.testing.assert_allclose(aux[k], ref_aux[k], rtol=1e-6, err_msg=k)
    flat, ref_flat = jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)
    for (path, g), r in zip(flat, ref_flat):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["moe_layers"]))


def _whole_stack_adds(cfg, in_place: bool, monkeypatch) -> int:
    """Adds inside the micro-batch loop whose output is a whole (L, ...) stacked weight: `acc + grad` per stacked
    weight in the plain sum, none when the layer scans add into the accumulator slice by slice."""
    monkeypatch.setattr(train_step, "STACKS", STACKS if in_place else ())
    jax.clear_caches()
    mesh = make_mesh(cfg.mesh)
    abstract, graphdef, _ = train_state.abstract_state(cfg, mesh)
    stacked = {x.shape for k in STACKS for x in jax.tree.leaves(abstract.params[k])}
    m = cfg.train.micro_batches
    micro = {k: jax.ShapeDtypeStruct((m, BATCH // m, SEQ + 1), jnp.int32) for k in train_step.BATCH_KEYS}
    fn = functools.partial(train_step._accumulate, graphdef=graphdef, cfg=cfg)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(fn)(abstract.params, abstract.bias, micro, 1.0, jnp.ones((1,)), 0.3).jaxpr
    loop = next(e for e in jaxpr.eqns if e.primitive.name == "scan" and e.params["length"] == m)
    return sum(1 for e in loop.params["jaxpr"].jaxpr.eqns
               if e.primitive.name in ("add", "add_any") and e.outvars[0].aval.shape in stacked)


def test_micro_batch_loop_adds_no_whole_gradient_stack(monkeypatch):
    cfg = load_config("tiny", [f"data.seq_len={SEQ}", f"train.global_batch_size={BATCH}", "impl.remat=full",
                               "train.micro_batches=2"])
    assert _whole_stack_adds(cfg, False, monkeypatch) >= len(STACKS)  # the check sees the plain sum's adds
    assert _whole_stack_adds(cfg, True, monkeypatch) == 0


EP_SCRIPT = r"""
import json
import jax, numpy as np
from jax.sharding import NamedSharding
from tests.checks import outcome, packed_rows
from dsv3_jax.presets import load_config
from dsv3_jax.parallel.sharding import logical_spec, make_mesh, rules_for, use_rules
from dsv3_jax.train.state import init_state
from dsv3_jax.train.step import jit_train_step

SEQ, B = 16, 32
BASE = [f"data.seq_len={SEQ}", f"train.global_batch_size={B}", "train.bias_gamma=0.01", "train.warmup_steps=1",
        "train.balance_alpha=0.01", "impl.remat=full", "train.micro_batches=2", "impl.vocab_chunk=100"]
# the -ep preset's layout: experts resident over fsdp x expert, the other weights over expert x fsdp gathered
# layer by layer inside the node
EP = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4", "impl.gather_weights=layer",
      "mesh.rules={experts: [fsdp, expert], embed: [expert, fsdp], q_lora: [expert, fsdp], kv_lora: [expert, fsdp]}"]
rng = np.random.default_rng(0)

batches = [packed_rows(rng, B, SEQ), packed_rows(rng, B, SEQ)]

def two_steps(overrides, devices=None):
    cfg = load_config("tiny", [*BASE, *overrides])
    mesh = make_mesh(cfg.mesh, devices=devices)
    with use_rules(rules_for(cfg.mesh)):
        state, graphdef, tx = init_state(cfg, mesh)
        rows = NamedSharding(mesh, logical_spec(("batch",)))
    step = jit_train_step(cfg, graphdef, tx, mesh, state, donate=False)
    out = []
    with jax.set_mesh(mesh), use_rules(rules_for(cfg.mesh)):
        for b in batches:
            state, metrics = step(state, {k: jax.device_put(v, rows) for k, v in b.items()})
            out.append(jax.device_get(metrics))
    return out, jax.device_get(state.params)

def check():
    (ref, ref_params), (got, params) = two_steps(["mesh.data=1"], jax.devices()[:1]), two_steps(EP)
    for i, (r, g) in enumerate(zip(ref, got)):
        for k in ("loss", "total_loss", "mtp_loss", "balance_loss", "grad_norm"):
            np.testing.assert_allclose(g[k], r[k], rtol=1e-6, atol=1e-6, err_msg=f"step {i + 1} {k}")
        np.testing.assert_allclose(g["expert_load"], r["expert_load"], rtol=1e-6, err_msg=f"step {i + 1} load")
    for r, g in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg="params after two steps")

print("ACC_RESULTS", json.dumps({"ep_equals_one_device": outcome(check)}))
"""


@pytest.mark.slow
def test_expert_parallel_in_place_steps_equal_one_device():
    result = xla_env.script_results(EP_SCRIPT, "ACC_RESULTS", timeout=900)
    assert result["ep_equals_one_device"] == "ok", result["ep_equals_one_device"]
