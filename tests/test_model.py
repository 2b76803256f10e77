"""Whole-model properties: packed documents stay independent, cache == no cache, MTP inputs, remat, scan, YaRN."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import ImplConfig
from dsv3_jax.model.layers import RMSNorm
from dsv3_jax.model.rope import rope_cos_sin, rope_inv_freq
from dsv3_jax.model.routing import RouterBias
from dsv3_jax.model.transformer import Transformer, create
from dsv3_jax.presets import load_config


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


def test_remat_changes_neither_values_nor_gradients(tiny):
    """Both remat policies and the unrolled layer stack against one scanned no-remat reference (computed once)."""
    cfg, model = tiny
    ids = jax.random.randint(jax.random.key(4), (2, 8), 0, cfg.vocab_size)

    def loss_fn(params, graphdef, rest):
        out = nnx.merge(graphdef, params, rest)(ids)
        return out.logits.mean() + out.mtp_logits.mean() + out.aux["balance_loss"].sum()

    grad_fn = jax.jit(jax.grad(loss_fn), static_argnums=1)

    def grads(m):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        return grad_fn(params, graphdef, rest)

    g0 = grads(model)
    for impl in (ImplConfig(remat="full"), ImplConfig(remat="dots"), ImplConfig(scan_layers=False)):
        other = nnx.eval_shape(lambda i=impl: Transformer(cfg, nnx.Rngs(0), i))  # no init
        nnx.update(other, nnx.state(model))
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(grads(other)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=str(impl))


def test_bias_is_separate_state_and_gets_no_gradient(tiny):
    """The bias steers selection only: d(loss)/d(bias) is exactly zero while the router weights get a gradient."""
    cfg, model = tiny
    graphdef, params, bias = nnx.split(model, nnx.Param, RouterBias)
    assert jax.tree.leaves(bias) and all(x.dtype == jnp.float32 for x in jax.tree.leaves(bias))
    bias_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(bias)[0]}
    param_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not bias_paths & param_paths
    keys = iter(jax.random.split(jax.random.key(11), 16))
    bias = jax.tree.map(lambda b: b + 0.1 * jax.random.normal(next(keys), b.shape), bias)  # changes the choice
    ids = jax.random.randint(jax.random.key(12), (2, 9), 0, cfg.vocab_size)

    def loss(params, bias):
        out = nnx.merge(graphdef, params, bias)(ids)
        return (out.logits ** 2).mean() + (out.mtp_logits ** 2).mean() + out.aux["balance_loss"].sum()

    g_params, g_bias = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, bias)
    assert jax.tree.leaves(g_bias)
    for g in jax.tree.leaves(g_bias):
        np.testing.assert_array_equal(np.asarray(g), 0.0)
    assert np.abs(np.asarray(g_params["moe_layers"]["mlp"]["router"][...])).max() > 0
    assert np.abs(np.asarray(g_params["mtp"][0]["block"]["mlp"]["router"][...])).max() > 0


def _tiny_depth2():
    cfg = dataclasses.replace(load_config("tiny").model, num_nextn_predict_layers=2)
    return cfg, _randomise_norms(create(cfg, 3), seed=3)


def test_mtp_depth_two_chains_the_modules():
    """Depth 2 takes depth 1's hidden and the embedding of token t+2; its logits at t see tokens <= t+2 only."""
    cfg, model = _tiny_depth2()
    ids = jax.random.randint(jax.random.key(6), (2, 10), 0, cfg.vocab_size)
    out = model(ids)
    chex.assert_shape(out.mtp_logits, (2, 2, 10, cfg.vocab_size))
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    cos, sin = rope_cos_sin(pos, cfg)
    seg = jnp.ones((2, 10), jnp.int32)
    h = out.hidden
    for k, m in enumerate(model.mtp, start=1):
        shifted = jnp.concatenate([ids[:, k:], jnp.zeros((2, k), ids.dtype)], axis=1)
        cat = jnp.concatenate([m.enorm(model.embed(shifted)), m.hnorm(h)], axis=-1)
        h, _, _ = m.block(cat @ m.eh_proj.weight[...], cos, sin, seg, pos, seg > 0)
        np.testing.assert_allclose(out.mtp_logits[k - 1], m.norm(h) @ model.head.weight[...], atol=1e-5)
    ids2 = ids.at[:, 6:].set((ids[:, 6:] + 1) % cfg.vocab_size)
    out2 = model(ids2)
    np.testing.assert_allclose(out2.mtp_logits[1, :, :4], out.mtp_logits[1, :, :4], atol=1e-5)
    assert not np.allclose(out2.mtp_logits[1, :, 4], out.mtp_logits[1, :, 4])


def test_mtp_counts_and_balance_use_only_positions_with_a_target():
    """MTP expert counts and balance loss cover exactly the positions of `mtp_valid` (default: the input token t+k
    lies in the same document), never the last k positions fed token 0 nor positions across a document end."""
    cfg, model = _tiny_depth2()
    k_top = cfg.num_experts_per_tok
    ids = jax.random.randint(jax.random.key(7), (2, 12), 2, cfg.vocab_size)
    seg = jnp.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
    pos = jnp.array([list(range(5)) + list(range(7)), list(range(9)) + [0] * 3])
    out = model(ids, positions=pos, segment_ids=seg)
    # depth 1: row 0 has 4 + 6 positions whose token t+1 is in the same document, row 1 has 8; depth 2: 3+5, 7
    np.testing.assert_array_equal(np.asarray(out.aux["mtp_expert_counts"]).sum(-1), [18 * k_top, 15 * k_top])
    mask = jnp.zeros((2, 2, 12), bool).at[:, 0, :3].set(True).at[1, 1, 4].set(True)  # 3 and 4 positions
    given = model(ids, positions=pos, segment_ids=seg, mtp_valid=mask)
    np.testing.assert_array_equal(np.asarray(given.aux["mtp_expert_counts"]).sum(-1), [3 * k_top, 4 * k_top])
    np.testing.assert_allclose(given.mtp_logits, out.mtp_logits, atol=1e-6)  # the mask changes no logits
    # the balance loss of depth 1 is the MoE block's own on those positions (a naive re-run of the block)
    m = model.mtp[0]
    cos, sin = rope_cos_sin(pos, cfg)
    shifted = jnp.concatenate([ids[:, 1:], jnp.zeros((2, 1), ids.dtype)], axis=1)
    cat = jnp.concatenate([m.enorm(model.embed(shifted)), m.hnorm(out.hidden)], axis=-1)
    _, aux, _ = m.block(cat @ m.eh_proj.weight[...], cos, sin, seg, pos, mask[0])
    np.testing.assert_allclose(given.aux["mtp_balance_loss"][0], aux["balance_loss"], rtol=1e-6)
    np.testing.assert_array_equal(given.aux["mtp_expert_counts"][0], aux["expert_counts"])


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
