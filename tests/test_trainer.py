"""The train step: bias rule from global counts, bias outside gradients and optimizer, gradient accumulation."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.kernels import accumulating_scan
from dsv3_jax.model import transformer
from dsv3_jax.model.routing import update_bias
from dsv3_jax.parallel.sharding import make_mesh
from dsv3_jax.presets import load_config
from dsv3_jax.train import losses
from dsv3_jax.train import state as train_state
from dsv3_jax.train.step import bias_gamma, forward, mtp_lambda, train_step, update_router_bias

SEQ, BATCH = 16, 4


def packed_batch(seed: int, vocab: int) -> dict:
    """Rows of two documents each (the split point varies per row), random tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab, size=(BATCH, SEQ + 1)).astype(np.int32)
    seg = np.ones((BATCH, SEQ + 1), np.int32)
    pos = np.tile(np.arange(SEQ + 1, dtype=np.int32), (BATCH, 1))
    for r in range(BATCH):
        cut = 3 + 2 * r
        seg[r, cut:] = 2
        pos[r, cut:] = np.arange(SEQ + 1 - cut)
    seg[-1, -3:] = 0  # padding at the end of the last row
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("tiny", [f"data.seq_len={SEQ}", f"train.global_batch_size={BATCH}", "train.bias_gamma=0.01",
                               "train.balance_alpha=0.01"])
    mesh = make_mesh(cfg.mesh)
    state, graphdef, tx = train_state.init_state(cfg, mesh)
    return cfg, mesh, state, graphdef, tx


@functools.cache
def _jitted_step(cfg, graphdef, tx):
    return jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, cfg=cfg))


@functools.cache
def _jitted_forward(graphdef):
    return jax.jit(functools.partial(forward, graphdef))


def run_step(cfg, mesh, state, graphdef, tx, batch):
    step = _jitted_step(cfg, graphdef, tx)
    with jax.set_mesh(mesh):
        return step(state, jax.tree.map(jnp.asarray, batch))


def _paths(tree) -> set[str]:
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_update_router_bias_moves_each_expert_by_gamma_towards_the_mean():
    counts = {"moe_layers": {"mlp": {"bias": jnp.array([[10.0, 0.0, 5.0, 5.0], [1.0, 2.0, 3.0, 6.0]])}},  # means 5, 3
              "mtp": {0: {"block": {"mlp": {"bias": jnp.array([4.0, 4.0, 0.0, 8.0])}}}}}  # mean 4
    bias = {"moe_layers": {"mlp": {"bias": jnp.zeros((2, 4))}}, "mtp": {0: {"block": {"mlp": {"bias": jnp.ones(4)}}}}}
    new = update_router_bias(bias, counts, jnp.float32(0.5))
    np.testing.assert_array_equal(np.asarray(new["moe_layers"]["mlp"]["bias"]),
                                  [[-0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, -0.5]])
    np.testing.assert_array_equal(np.asarray(new["mtp"][0]["block"]["mlp"]["bias"]), [1.0, 1.0, 1.5, 0.5])
    np.testing.assert_array_equal(np.asarray(bias["moe_layers"]["mlp"]["bias"]), np.zeros((2, 4)))  # pure


def test_router_counts_have_the_structure_of_the_bias(setup):
    cfg, _, state, graphdef, _ = setup
    out = _jitted_forward(graphdef)(state.params, state.bias, jax.tree.map(jnp.asarray, packed_batch(3, 258)))
    assert jax.tree.structure(out.aux["router_counts"]) == jax.tree.structure(state.bias)
    chex.assert_trees_all_equal_shapes(out.aux["router_counts"], state.bias)
    np.testing.assert_array_equal(out.aux["router_counts"]["moe_layers"]["mlp"]["bias"], out.aux["expert_counts"])


def test_bias_is_in_no_gradient_and_no_optimizer_state(setup):
    cfg, _, state, graphdef, _ = setup
    bias_paths = _paths(state.bias)
    assert bias_paths and all("bias" in p for p in bias_paths)
    assert not bias_paths & _paths(state.params)
    assert not any("'bias'" in p for p in _paths(state.opt_state))
    # every optimizer leaf that mirrors a parameter mirrors one of `params`, never the bias
    param_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sorted(x.shape for x in moments) == sorted(param_shapes * 2)

    batch = jax.tree.map(jnp.asarray, packed_batch(0, cfg.model.vocab_size))
    bias = jax.tree.map(lambda b: b + 0.05 * jnp.cos(jnp.arange(b.size, dtype=jnp.float32).reshape(b.shape)),
                        state.bias)  # a non-zero bias that changes the choice

    def loss(params, bias):  # the training objective: next-token and MTP cross-entropy plus the balance loss
        out = forward(graphdef, params, bias, batch)
        ce, n = losses.next_token_loss(out.logits, batch["tokens"], batch["segment_ids"])
        mtp, _ = losses.mtp_losses(out.mtp_logits, batch["tokens"], batch["segment_ids"])
        return ce / n + mtp.sum() / n + losses.balance_loss(out.aux, 0.1)

    g_params, g_bias = jax.jit(jax.grad(loss, argnums=(0, 1)))(state.params, bias)
    chex.assert_tree_all_finite(g_params)
    for g in jax.tree.leaves(g_bias):  # the bias only selects experts: no gradient reaches it
        np.testing.assert_array_equal(np.asarray(g), 0.0)
    assert np.abs(np.asarray(g_params["moe_layers"]["mlp"]["router"])).max() > 0


def test_bias_update_uses_the_counts_of_the_whole_batch(setup):
    cfg, mesh, state, graphdef, tx = setup
    batch = packed_batch(1, cfg.model.vocab_size)
    new_state, metrics = run_step(cfg, mesh, state, graphdef, tx, batch)
    # reference counts: one forward over the whole batch with the pre-step parameters and bias
    out = _jitted_forward(graphdef)(state.params, state.bias, jax.tree.map(jnp.asarray, batch))
    counts = np.asarray(out.aux["expert_counts"])
    valid_tokens = (batch["segment_ids"][:, :-1] != 0).sum()
    np.testing.assert_array_equal(counts.sum(-1), valid_tokens * cfg.model.num_experts_per_tok)
    gamma = cfg.train.bias_gamma
    old = np.asarray(state.bias["moe_layers"]["mlp"]["bias"])
    new = np.asarray(new_state.bias["moe_layers"]["mlp"]["bias"])
    np.testing.assert_allclose(new - old, gamma * np.sign(counts.mean(-1, keepdims=True) - counts), atol=1e-9)
    moved = np.abs(new - old)[np.abs(new - old) > 0]
    np.testing.assert_allclose(moved, gamma, rtol=1e-6)  # exactly +/- gamma (or 0 for an expert at the mean)
    assert (np.abs(new - old) > 0).any()
    mtp_counts = np.asarray(out.aux["mtp_expert_counts"][0])
    np.testing.assert_allclose(np.asarray(new_state.bias["mtp"][0]["block"]["mlp"]["bias"]),
                               np.asarray(update_bias(state.bias["mtp"][0]["block"]["mlp"]["bias"],
                                                      jnp.asarray(mtp_counts), gamma)), atol=1e-9)
    np.testing.assert_array_equal(np.asarray(metrics["dead_experts"]), (counts == 0).sum())
    np.testing.assert_array_equal(np.asarray(metrics["routed_tokens"]), counts.sum(-1))
    np.testing.assert_array_equal(np.asarray(metrics["router_bias"]), new)  # the main layers' bias after the update
    assert int(new_state.step) == 1


def test_mtp_counts_cover_exactly_the_mtp_targets(setup):
    """MTP counts cover the positions with a depth-1 target: not those whose token t+1 ends a document (the
    target t+2 lies in the next one), nor the last input column, whose target column starts a new document here."""
    cfg, _, state, graphdef, _ = setup
    batch = packed_batch(4, cfg.model.vocab_size)
    batch["segment_ids"][0, -1] = 9  # a new document in the target column only
    batch = jax.tree.map(jnp.asarray, batch)
    out = _jitted_forward(graphdef)(state.params, state.bias, batch)
    targets = int(losses.same_document_mask(batch["segment_ids"], 1).sum())
    inputs_in_doc = int(losses.same_document_mask(batch["segment_ids"][:, :-1], 0).sum())
    assert inputs_in_doc > targets  # the model alone (no target column) would count more
    np.testing.assert_array_equal(np.asarray(out.aux["mtp_expert_counts"]).sum(-1),
                                  [targets * cfg.model.num_experts_per_tok])


def test_gradient_accumulation_matches_one_big_batch(setup):
    cfg, mesh, state, graphdef, tx = setup
    batch = packed_batch(2, cfg.model.vocab_size)
    one, m_one = run_step(cfg, mesh, state, graphdef, tx, batch)
    cfg2 = load_config("tiny", [f"data.seq_len={SEQ}", f"train.global_batch_size={BATCH}", "train.bias_gamma=0.01",
                                "train.balance_alpha=0.01", "train.micro_batches=2"])
    two, m_two = run_step(cfg2, mesh, state, graphdef, tx, batch)
    # identical routing counts (so identical bias updates), counted once: sums are valid tokens (targets) x K
    np.testing.assert_array_equal(np.asarray(m_one["maxvio"]), np.asarray(m_two["maxvio"]))
    k = cfg.model.num_experts_per_tok
    valid = int((batch["segment_ids"][:, :-1] != 0).sum())
    targets = int(losses.same_document_mask(jnp.asarray(batch["segment_ids"]), 1).sum())
    for m in (m_one, m_two):
        np.testing.assert_array_equal(np.asarray(m["routed_tokens"]), [valid * k] * cfg.model.num_moe_layers)
        np.testing.assert_array_equal(np.asarray(m["mtp_routed_tokens"]), [targets * k])
    for a, b in zip(jax.tree.leaves(one.bias), jax.tree.leaves(two.bias)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(float(m_one["loss"]), float(m_two["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_one["mtp_loss"]), float(m_two["mtp_loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_one["grad_norm"]), float(m_two["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_schedules():
    cfg = load_config("tiny", ["train.steps=100", "train.warmup_steps=10", "train.constant_steps=20",
                               "train.learning_rate=1e-3", "train.min_learning_rate=1e-4",
                               "train.mtp_lambda_switch_step=50", "train.bias_gamma_stop_step=80"]).train
    lr = [float(train_state.learning_rate(jnp.int32(s), cfg)) for s in (0, 9, 10, 29, 30, 65, 100)]
    np.testing.assert_allclose(lr, [1e-4, 1e-3, 1e-3, 1e-3, 1e-3, 5.5e-4, 1e-4], rtol=1e-5)
    assert float(mtp_lambda(jnp.int32(49), cfg)) == pytest.approx(0.3)
    assert float(mtp_lambda(jnp.int32(50), cfg)) == pytest.approx(0.1)
    assert float(bias_gamma(jnp.int32(79), cfg)) == pytest.approx(1e-3)
    assert float(bias_gamma(jnp.int32(80), cfg)) == 0.0


def test_weight_decay_mask_skips_norms_and_vectors(setup):
    cfg, *_ = setup
    _, abs_params, _ = train_state.split_abstract(cfg)
    mask = train_state.decay_mask(abs_params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert not any(m for p, m in flat.items() if "norm" in p)  # stacked norm scales are 2-D but not decayed
    assert flat["['embed']['weight']"] and flat["['moe_layers']['mlp']['w_gate']"]
    assert isinstance(abs_params, nnx.State)


def test_optimizer_clips_then_applies_adamw_with_its_betas_and_decay_mask():
    """Two optimizer steps against numpy: global-norm clipping, AdamW moments with b1 != b2 (step 2 tells them
    apart), decoupled decay on the masked (matrix) leaves only."""
    cfg = load_config("tiny", ["train.warmup_steps=1", "train.learning_rate=0.1", "train.b1=0.8", "train.b2=0.9",
                               "train.weight_decay=0.5", "train.grad_clip=1.0", "train.steps=10"]).train
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "scale": jnp.array([2.0, -1.0])}
    tx = train_state.make_optimizer(cfg, {"w": True, "scale": False})
    grads = [{"w": jnp.array([[3.0, 0.0], [4.0, 0.0]]), "scale": jnp.array([0.0, 0.0])},  # norm 5: clipped to 1
             {"w": jnp.array([[0.1, -0.2], [0.0, 0.05]]), "scale": jnp.array([0.1, 0.0])}]  # below the clip
    state = tx.init(params)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for step, g in enumerate(grads):
        updates, state = tx.update(g, state, params)
        params = jax.tree.map(jnp.add, params, updates)
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        lr = float(train_state.learning_rate(jnp.int32(step), cfg))
        for k in p:
            gk = g[k] * min(1.0, cfg.grad_clip / norm)
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * gk
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * gk ** 2
            mhat, vhat = m[k] / (1 - cfg.b1 ** (step + 1)), v[k] / (1 - cfg.b2 ** (step + 1))
            decay = cfg.weight_decay * p[k] if k == "w" else 0.0
            p[k] = p[k] - lr * (mhat / (np.sqrt(vhat) + 1e-8) + decay)
        chex.assert_trees_all_close(params, {k: x.astype(np.float32) for k, x in p.items()}, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_remat_inside_the_train_step_changes_nothing_but_memory(setup, monkeypatch):
    """impl.remat=full: the layer stacks run through the accumulating scan (each layer recomputed in the backward,
    kernels/accumulating_scan.py), impl.remat=dots through a checkpoint region, and the results equal the plain
    step's."""
    cfg, mesh, state, graphdef, tx = setup
    batch = jax.tree.map(jnp.asarray, packed_batch(5, cfg.model.vocab_size))
    base = [f"data.seq_len={SEQ}", f"train.global_batch_size={BATCH}", "train.bias_gamma=0.01",
            "train.balance_alpha=0.01"]
    cfg_r, cfg_d = (load_config("tiny", [*base, f"impl.remat={r}"]) for r in ("full", "dots"))
    graphdef_r, _, _ = train_state.split_abstract(cfg_r)
    calls = []
    monkeypatch.setattr(transformer, "accumulating_scan",
                        lambda *a: calls.append(1) or accumulating_scan.accumulating_scan(*a))

    def program(c, g):
        jax.clear_caches()
        with jax.set_mesh(mesh):
            return str(jax.make_jaxpr(functools.partial(train_step, graphdef=g, tx=tx, cfg=c))(state, batch))

    assert "remat2[" not in program(cfg, graphdef) and not calls
    assert "remat2[" in program(cfg_d, train_state.split_abstract(cfg_d)[0]) and not calls
    program(cfg_r, graphdef_r)
    assert len(calls) == 2  # the dense and the MoE stack
    plain, m_plain = run_step(cfg, mesh, state, graphdef, tx, batch)
    remat, m_remat = run_step(cfg_r, mesh, state, graphdef_r, tx, batch)
    chex.assert_trees_all_close(remat.params, plain.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(remat.bias, plain.bias)
    for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
        np.testing.assert_allclose(float(m_remat[key]), float(m_plain[key]), rtol=1e-5, err_msg=key)
