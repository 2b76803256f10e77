"""The balancing strategies: the batch-level aux loss by hand and against the router, bias frozen unless aux_free."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import ImplConfig, ModelConfig, TrainConfig
from dsv3_jax.errors import ConfigError
from dsv3_jax.model import moe, routing
from dsv3_jax.parallel.sharding import make_mesh
from dsv3_jax.presets import load_config
from dsv3_jax.train import losses, step
from dsv3_jax.train import state as train_state


def test_aux_balance_terms_by_hand():
    # one layer, E=4, K=1, N=4 tokens: counts [2, 1, 1, 0], normalised affinities summed over tokens [1.6, 1, .8, .6]
    # f = [.5, .25, .25, 0], P = [.4, .25, .2, .15]: E * sum f P = 4 * (.2 + .0625 + .05) = 1.25
    counts = jnp.array([[2.0, 1.0, 1.0, 0.0]])
    affinity = jnp.array([[1.6, 1.0, 0.8, 0.6]])
    np.testing.assert_allclose(np.asarray(losses.aux_balance_terms(counts, affinity, 1)), [1.25], rtol=1e-6)
    # K=2 with the same tokens: slots double, f and P unchanged -> the same value; uniform routing gives 1
    np.testing.assert_allclose(np.asarray(losses.aux_balance_terms(2 * counts, affinity, 2)), [1.25], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(losses.aux_balance_terms(jnp.ones((1, 4)), jnp.ones((1, 4)), 1)), [1.0])
    aux = {"expert_counts": jnp.concatenate([counts, jnp.ones((1, 4))]),
           "expert_affinity": jnp.concatenate([affinity, jnp.ones((1, 4))]),
           "mtp_expert_counts": counts, "mtp_expert_affinity": affinity}
    np.testing.assert_allclose(float(losses.aux_balance_loss(aux, 0.1, 1)), 0.1 * (1.25 + 1.0 + 1.25), rtol=1e-6)


def _layer():
    cfg = dataclasses.replace(ModelConfig(), n_routed_experts=8, n_group=2, topk_group=1).validate()
    layer = moe.MoE(cfg, ImplConfig(), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 6, cfg.hidden_size))
    valid = jnp.array([[True] * 6, [True, True, True, False, False, False], [False] * 6])
    return cfg, layer, x, valid


def _naive_aux(x, router, bias, valid, cfg):
    """E * sum_i f_i P_i from the router weights directly (differentiable in the router; f_i from the selection)."""
    x_nd = x.reshape(-1, x.shape[-1])
    scores = jax.nn.sigmoid(x_nd @ router)
    idx, _ = routing.select_experts(scores, bias, cfg)
    v = valid.reshape(-1).astype(jnp.float32)
    counts = (jax.nn.one_hot(idx, cfg.n_routed_experts).sum(1) * v[:, None]).sum(0)
    f = counts / counts.sum()
    p = ((scores / scores.sum(-1, keepdims=True)) * v[:, None]).sum(0) / v.sum()
    return cfg.n_routed_experts * (jax.lax.stop_gradient(f) * p).sum()


def test_moe_layer_aux_loss_and_its_router_gradient_match_a_naive_computation():
    cfg, layer, x, valid = _layer()
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    k = cfg.num_experts_per_tok

    def via_layer(w):
        _, aux = nnx.merge(graphdef, {**params, "router": w}, rest)(x, valid)
        return losses.aux_balance_terms(aux["expert_counts"][None], aux["expert_affinity"][None], k)[0]

    w = layer.router[...]
    naive = functools.partial(_naive_aux, x, bias=layer.bias[...], valid=valid, cfg=cfg)
    value, g = jax.jit(jax.value_and_grad(via_layer))(w)
    want, g_want = jax.jit(jax.value_and_grad(lambda w: naive(router=w)))(w)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
    assert np.abs(np.asarray(g)).max() > 0  # the aux loss reaches the router
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_want), rtol=1e-4, atol=1e-9)


def test_unknown_strategy_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"train\.balance must be one of .*'aux_free'.* got 'auxfree'"):
        load_config("tiny", ["train.balance=auxfree"])


@pytest.mark.parametrize("strategy", ["aux_free", "aux_loss", "none"])
def test_bias_gamma_is_zero_unless_aux_free(strategy):
    cfg = TrainConfig(balance=strategy, bias_gamma=0.01)
    assert float(step.bias_gamma(jnp.int32(0), cfg)) == pytest.approx(0.01 if strategy == "aux_free" else 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["aux_loss", "none"])
def test_train_step_freezes_the_bias_and_adds_the_aux_loss_only_under_aux_loss(strategy):
    cfg = load_config("tiny", ["data.seq_len=16", f"train.balance={strategy}", "train.aux_loss_alpha=0.5",
                               "train.bias_gamma=0.01", "train.balance_alpha=0"])
    mesh = make_mesh(cfg.mesh)
    state, graphdef, tx = train_state.init_state(cfg, mesh)
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(2, 258, (4, 17)), jnp.int32),
             "segment_ids": jnp.ones((4, 17), jnp.int32),
             "positions": jnp.tile(jnp.arange(17, dtype=jnp.int32), (4, 1))}
    with jax.set_mesh(mesh):
        new, m = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx, cfg=cfg))(state, batch)
        out = jax.jit(functools.partial(step.forward, graphdef))(state.params, state.bias, batch)
    for old_b, new_b in zip(jax.tree.leaves(state.bias), jax.tree.leaves(new.bias)):
        np.testing.assert_array_equal(np.asarray(new_b), np.asarray(old_b))  # frozen at zero
    k = cfg.model.num_experts_per_tok
    want = float(losses.aux_balance_loss(out.aux, 0.5, k)) if strategy == "aux_loss" else 0.0
    np.testing.assert_allclose(float(m["aux_balance_loss"]), want, rtol=1e-5)
    ce_mtp = float(m["loss"]) + float(m["mtp_lambda"]) * float(m["mtp_loss"])
    np.testing.assert_allclose(float(m["total_loss"]), ce_mtp + want, rtol=1e-5)
    assert (want > 0) == (strategy == "aux_loss")
