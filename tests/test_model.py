"""Whole-model properties: packed documents stay independent, cache == no cache, MTP inputs, remat, scan, YaRN."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import ImplConfig, load_config
from dsv3_jax.layers import RMSNorm, rope_cos_sin, rope_inv_freq
from dsv3_jax.model import Transformer, create
from dsv3_jax.moe import RouterBias


def _randomise_norms(model: Transformer, seed: int = 0) -> Transformer:
    """Norm scales start at 1, which would hide a missing or misplaced norm; make them random."""
    key = jax.random.key(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, RMSNorm):
            key, k = jax.random.split(key)
            node.weight[...] = 1.0 + 0.3 * jax.random.normal(k, node.weight.shape)
    return model


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny").model
    return cfg, _randomise_norms(create(cfg, 0))


def test_packed_documents_do_not_see_each_other(tiny):
    cfg, model = tiny
    ids = jax.random.randint(jax.random.key(1), (1, 20), 2, cfg.vocab_size)
    seg = jnp.array([[1] * 8 + [2] * 12])
    pos = jnp.array([list(range(8)) + list(range(12))])
    packed = model(ids, positions=pos, segment_ids=seg, mtp=False).logits
    alone_a = model(ids[:, :8], mtp=False).logits
    alone_b = model(ids[:, 8:], mtp=False).logits
    np.testing.assert_allclose(packed[:, :8], alone_a, atol=2e-5)
    np.testing.assert_allclose(packed[:, 8:], alone_b, atol=2e-5)


def test_prefill_then_decode_on_latent_cache_equals_full_forward(tiny):
    cfg, model = tiny
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    full = model(ids, mtp=False).logits
    cache = model.init_cache(2, 16)
    out = model(ids[:, :7], cache=cache, mtp=False)
    np.testing.assert_allclose(out.logits, full[:, :7], atol=1e-4)
    cache = out.cache
    for t in range(7, 12):
        out = model(ids[:, t:t + 1], positions=jnp.full((2, 1), t), cache=cache, mtp=False)
        cache = out.cache
        np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=1e-4)
    # the cache holds only the latent and the shared rotary key per token and layer
    assert cache["moe"].c_kv.shape == (cfg.num_moe_layers, 2, 16, cfg.kv_lora_rank)
    assert cache["moe"].k_rope.shape == (cfg.num_moe_layers, 2, 16, cfg.qk_rope_head_dim)


def test_mtp_uses_pre_norm_hidden_and_embedding_of_next_token(tiny):
    cfg, model = tiny
    ids = jax.random.randint(jax.random.key(3), (2, 10), 0, cfg.vocab_size)
    out = model(ids)
    m = model.mtp[0]
    emb = model.embed(jnp.concatenate([ids[:, 1:], jnp.zeros((2, 1), ids.dtype)], axis=1))
    cat = jnp.concatenate([m.enorm(emb), m.hnorm(out.hidden)], axis=-1)  # embedding FIRST
    h = cat @ m.eh_proj.weight[...]
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    cos, sin = rope_cos_sin(pos, cfg)
    seg = jnp.ones((2, 10), jnp.int32)
    h, _, _ = m.block(h, cos, sin, seg, pos, seg > 0)
    want = m.norm(h) @ model.head.weight[...]
    np.testing.assert_allclose(out.mtp_logits[0], want, atol=1e-5)
    # depth-1 logits at position t depend on tokens <= t+1 only
    ids2 = ids.at[:, 6:].set((ids[:, 6:] + 1) % cfg.vocab_size)
    out2 = model(ids2)
    np.testing.assert_allclose(out2.mtp_logits[0, :, :5], out.mtp_logits[0, :, :5], atol=1e-5)
    assert not np.allclose(out2.mtp_logits[0, :, 5], out.mtp_logits[0, :, 5])


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_neither_values_nor_gradients(tiny, remat):
    cfg, model = tiny
    ids = jax.random.randint(jax.random.key(4), (2, 8), 0, cfg.vocab_size)

    def loss_fn(params, graphdef, rest):
        out = nnx.merge(graphdef, params, rest)(ids)
        return out.logits.mean() + out.mtp_logits.mean() + out.aux["balance_loss"].sum()

    def grads(m):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        return jax.jit(jax.grad(loss_fn), static_argnums=1)(params, graphdef, rest)

    other = create(cfg, 0, impl=ImplConfig(remat=remat))
    nnx.update(other, nnx.state(model))
    g0, g1 = grads(model), grads(other)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bias_is_separate_state_and_gets_no_gradient(tiny):
    cfg, model = tiny
    graphdef, params, bias = nnx.split(model, nnx.Param, RouterBias)
    assert jax.tree.leaves(bias) and all(x.dtype == jnp.float32 for x in jax.tree.leaves(bias))
    bias_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(bias)[0]}
    param_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not bias_paths & param_paths


def test_scan_keeps_compiled_program_size_independent_of_depth():
    sizes = []
    for layers in (3, 9):
        cfg = dataclasses.replace(load_config("tiny").model, num_hidden_layers=layers, num_nextn_predict_layers=0)
        abstract = nnx.eval_shape(lambda c=cfg: Transformer(c, nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        fn = jax.jit(lambda s, ids, g=graphdef: nnx.merge(g, s)(ids).logits)
        hlo = fn.lower(state, jax.ShapeDtypeStruct((1, 8), jnp.int32)).as_text()
        sizes.append(len(hlo.splitlines()))
    assert sizes[1] <= sizes[0] * 1.05, sizes


def test_yarn_frequencies_by_hand():
    m = load_config("deepseek-v3-671b").model
    inv_freq, factor = rope_inv_freq(m)
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    assert factor == 1.0  # mscale == mscale_all_dim: the cos/sin multiplier cancels
    # high-frequency dims (many rotations in 4096 tokens) are kept; low-frequency dims are divided by the factor
    np.testing.assert_allclose(inv_freq[:5], base[:5], rtol=1e-6)
    np.testing.assert_allclose(inv_freq[-3:], base[-3:] / 40.0, rtol=1e-6)
    assert np.all(np.diff(inv_freq) < 0)
