"""Routing computed by hand, the grouped matmul against a naive per-expert loop, and the bias rule."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ImplConfig, ModelConfig
from dsv3_jax.kernels import grouped_matmul
from dsv3_jax.kernels.precision import Policy
from dsv3_jax.model import moe, moe_backends, routing


def _cfg(**kw) -> ModelConfig:
    base = dict(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=True,
                routed_scaling_factor=2.5)
    return ModelConfig(**{**base, **kw}).validate()


# ---------------------------------------------------------------------------------------------------------------
# Routing by hand.


def test_bias_changes_choice_but_not_gate_values():
    s = jnp.array([[0.9, 0.8, 0.3, 0.2]])
    cfg = _cfg()
    idx, gates = routing.select_experts(s, jnp.zeros(4), cfg)
    assert sorted(idx[0].tolist()) == [0, 1]
    # bias lifts expert 3 above expert 1 for selection; its gate still comes from the unbiased 0.2
    idx_b, gates_b = routing.select_experts(s, jnp.array([0.0, 0.0, 0.0, 0.7]), cfg)
    got = dict(zip(idx_b[0].tolist(), gates_b[0].tolist()))
    assert set(got) == {0, 3}
    np.testing.assert_allclose(got[0], 0.9 / 1.1 * 2.5, rtol=1e-6)
    np.testing.assert_allclose(got[3], 0.2 / 1.1 * 2.5, rtol=1e-6)
    base = dict(zip(idx[0].tolist(), gates[0].tolist()))
    np.testing.assert_allclose(base[0], 0.9 / 1.7 * 2.5, rtol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_scaling_with_and_without_norm_topk_prob(norm):
    s = jnp.array([[0.6, 0.1, 0.4, 0.3]])
    idx, gates = routing.select_experts(s, jnp.zeros(4), _cfg(norm_topk_prob=norm, routed_scaling_factor=2.0))
    got = dict(zip(idx[0].tolist(), gates[0].tolist()))
    assert set(got) == {0, 2}
    want = {0: 0.6 / 1.0 * 2.0, 2: 0.4 / 1.0 * 2.0} if norm else {0: 0.6 * 2.0, 2: 0.4 * 2.0}
    for e in want:
        np.testing.assert_allclose(got[e], want[e], rtol=1e-6)


def test_group_score_is_sum_of_top2_not_max():
    # 8 experts in 4 groups of 2, keep 2 groups. Group maxima: g0 0.95, g1 0.6, g2 0.7, g3 0.5;
    # group sums of top-2: g0 0.95+0.0=0.95, g1 0.6+0.59=1.19, g2 0.7+0.1=0.8, g3 0.5+0.45=0.95 (g0 first on ties).
    s = jnp.array([[0.95, 0.0, 0.6, 0.59, 0.7, 0.1, 0.5, 0.45]])
    cfg = _cfg(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    idx, _ = routing.select_experts(s, jnp.zeros(8), cfg)
    # kept groups by sum: g1 (1.19) and one of g0/g3 (0.95); by max it would be g0 and g2 (expert 4 = 0.7).
    chosen = set(idx[0].tolist())
    assert 4 not in chosen and {2, 3} <= chosen


def test_masked_groups_are_minus_inf_not_zero():
    # E=6 in 2 groups of 3, keep 1 group, K=3. Biased scores: g0 [0.9, 0.8, -0.5] (top-2 sum 1.7), g1 [0.5] * 3
    # (sum 1.0), so g0 is kept. Expert 2's negative biased score must still beat the masked g1 experts: a mask
    # filled with 0 instead of -inf would pick one of experts 3..5 instead.
    cfg = _cfg(n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=3)
    s = jnp.array([[0.9, 0.8, 0.1, 0.5, 0.5, 0.5]])
    bias = jnp.array([0.0, 0.0, -0.6, 0.0, 0.0, 0.0])
    idx, gates = routing.select_experts(s, bias, cfg)
    assert sorted(idx[0].tolist()) == [0, 1, 2]
    got = dict(zip(idx[0].tolist(), gates[0].tolist()))
    np.testing.assert_allclose(got[2], 0.1 / 1.8 * 2.5, rtol=1e-6)  # gate from the unbiased 0.1


def test_router_is_float32_even_for_bf16_inputs():
    x = jax.random.normal(jax.random.key(0), (5, 16), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (16, 8), jnp.float32)
    s = routing.router_scores(x, w)
    assert s.dtype == jnp.float32
    ref = jax.nn.sigmoid(np.asarray(x, np.float32) @ np.asarray(w))
    np.testing.assert_allclose(s, ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Bias rule, counts, balance loss, MaxVio.


def test_update_bias_moves_by_exactly_gamma():
    counts = jnp.array([[10.0, 2.0, 6.0, 6.0], [1.0, 1.0, 1.0, 1.0]])  # means 6 and 1
    bias = jnp.array([[0.5, -0.25, 0.0, 0.125], [0.0, 0.0, 0.0, 0.0]])
    new = routing.update_bias(bias, counts, 0.001)
    signs = np.array([[-1, 1, 0, 0], [0, 0, 0, 0]], np.float32)  # sign(mean - c): over-loaded experts go down
    np.testing.assert_array_equal(new, np.asarray(bias) + np.float32(0.001) * signs)


def test_counts_balance_loss_and_maxvio_by_hand():
    idx = jnp.array([[0, 1], [0, 2], [3, 0]])
    valid = jnp.array([True, True, False])
    np.testing.assert_array_equal(routing.expert_counts(idx, valid, 4), [2.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(routing.max_violation(jnp.array([4.0, 2.0, 0.0, 2.0])), 4 / 2 - 1)
    # one sequence of 2 valid tokens, E=4, K=2
    s = jnp.array([[[0.5, 0.5, 0.5, 0.5], [0.8, 0.2, 0.6, 0.4], [0.1, 0.9, 0.1, 0.9]]])
    loss = routing.sequence_balance_loss(s, idx[None], valid[None], k=2)
    f = 4 / (2 * 2) * np.array([2, 1, 1, 0])
    p = (np.array([0.25, 0.25, 0.25, 0.25]) + np.array([0.8, 0.2, 0.6, 0.4]) / 2.0) / 2
    np.testing.assert_allclose(loss, (f * p).sum(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Grouped matmul against a naive loop.


def _naive(x, idx, gates, wg, wu, wd):
    """Per token, per chosen expert, in numpy float64."""
    x, idx, gates = np.asarray(x, np.float64), np.asarray(idx), np.asarray(gates, np.float64)
    wg, wu, wd = (np.asarray(w, np.float64) for w in (wg, wu, wd))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[n, j]
            h = x[n] @ wg[e]
            h = h / (1 + np.exp(-h)) * (x[n] @ wu[e])
            out[n] += gates[n, j] * (h @ wd[e])
    return out


def _problem(n=40, d=12, f=10, e=6, k=2, seed=0, skip=(4,)):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (n, d))
    allowed = np.array([i for i in range(e) if i not in skip])
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(allowed, k, replace=False) for _ in range(n)]).astype(np.int32)
    gates = jax.random.uniform(keys[1], (n, k))
    wg = jax.random.normal(keys[2], (e, d, f)) * 0.3
    wu = jax.random.normal(keys[3], (e, d, f)) * 0.3
    wd = jax.random.normal(keys[4], (e, f, d)) * 0.3
    return x, jnp.asarray(idx), gates, wg, wu, wd


@pytest.mark.parametrize("impl,block", [("blocked", 4), ("blocked", 16), ("ragged_dot", 0), ("dense", 0)])
def test_grouped_ffn_matches_naive_loop(impl, block):
    x, idx, gates, wg, wu, wd = _problem()
    y = moe_backends.grouped_ffn(x, idx, gates, wg, wu, wd, impl, block, Policy())
    np.testing.assert_allclose(y, _naive(x, idx, gates, wg, wu, wd), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_grouped_ffn_gradients_match_and_empty_expert_gets_exact_zero(impl):
    x, idx, gates, wg, wu, wd = _problem(skip=(4,))
    cot = jax.random.normal(jax.random.key(9), x.shape)

    def loss(fn_impl, x, gates, wg, wu, wd):
        return jnp.sum(moe_backends.grouped_ffn(x, idx, gates, wg, wu, wd, fn_impl, 8, Policy()) * cot)

    grads = jax.grad(loss, argnums=(1, 2, 3, 4, 5))(impl, x, gates, wg, wu, wd)
    ref = jax.grad(loss, argnums=(1, 2, 3, 4, 5))("dense", x, gates, wg, wu, wd)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    for g in grads[2:]:  # expert 4 received no token: its weight gradients are exactly zero
        assert np.all(np.asarray(g[4]) == 0.0)
        assert np.any(np.asarray(g[3]) != 0.0)


def test_blocked_handles_all_tokens_on_one_expert_and_tiny_batches():
    x, _, gates, wg, wu, wd = _problem(n=7)
    idx = jnp.stack([jnp.full(7, 2), jnp.full(7, 5)], axis=1).astype(jnp.int32)
    y = moe_backends.grouped_ffn(x, idx, gates, wg, wu, wd, "blocked", 4, Policy())
    np.testing.assert_allclose(y, _naive(x, idx, gates, wg, wu, wd), rtol=1e-5, atol=1e-5)
    y1 = moe_backends.grouped_ffn(x[:1], idx[:1], gates[:1], wg, wu, wd, "blocked", 32, Policy())
    np.testing.assert_allclose(y1, _naive(x[:1], idx[:1], gates[:1], wg, wu, wd), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,skew", [(1, False), (2, False), (4, False), (40, False), (40, True), (3, True)])
def test_decode_backend_matches_naive_loop(n, skew):
    """The decode backend's three regimes: per-pair expert slices (N*K < E: n 1, 2), experts batched with a
    capacity of twice the mean pairs per expert (n 40, balanced), and every expert on every token when one expert
    gets more than that (skewed: expert 2 on every token; n 40 and 3) or the capacity reaches N anyway (n 4)."""
    x, idx, gates, wg, wu, wd = _problem(n=n, e=6, k=2)
    if skew:
        idx = idx.at[:, 0].set(2).at[:, 1].set(jnp.where(idx[:, 1] == 2, 3, idx[:, 1]))
    y = jax.jit(lambda *a: moe_backends.grouped_ffn(*a, "decode", 0, Policy()))(x, idx, gates, wg, wu, wd)
    np.testing.assert_allclose(y, _naive(x, idx, gates, wg, wu, wd), rtol=1e-5, atol=1e-5)


def test_decode_capacity_slots_by_hand():
    """Each pair's rank among the pairs of its expert, in token-major order, and the counts."""
    idx = jnp.array([[0, 2], [2, 1], [0, 2]], jnp.int32)
    rank, counts = grouped_matmul.expert_ranks(idx, 4)
    np.testing.assert_array_equal(rank, [0, 0, 1, 0, 1, 2])
    np.testing.assert_array_equal(counts, [2, 1, 3, 0])


def _compiled_flops(impl, n, d, f, e, k, block=64):
    x = jnp.zeros((n, d))
    idx = jnp.zeros((n, k), jnp.int32)
    gates = jnp.zeros((n, k))
    w1, w2 = jnp.zeros((e, d, f)), jnp.zeros((e, f, d))
    fn = jax.jit(lambda *a: moe_backends.grouped_ffn(*a, impl, block, Policy()))
    compiled = fn.lower(x, idx, gates, w1, w1, w2).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"], compiled.as_text()


def test_compiled_blocked_moe_does_not_run_every_expert_on_every_token():
    n, d, f, e, k = 2048, 64, 48, 16, 2
    useful = 2 * n * k * d * f * 3
    flops_blocked, hlo = _compiled_flops("blocked", n, d, f, e, k)
    flops_dense, _ = _compiled_flops("dense", n, d, f, e, k)
    # padded rows are at most n*k + e*(block-1): the compiled matmul work stays within that bound
    bound = 2 * (n * k + e * 63) * d * f * 3
    assert flops_blocked < 1.3 * bound, (flops_blocked, bound)
    assert flops_dense > 6 * flops_blocked, (flops_dense, flops_blocked, useful)
    # and no dot in the optimised HLO has an (all tokens x all experts) operand
    for line in hlo.splitlines():
        if " dot(" in line:
            assert f"[{n},{e}," not in line and f"{n},{e}]" not in line, line


def test_moe_layer_aux_counts_only_valid_tokens():
    from flax import nnx

    cfg = dataclasses.replace(ModelConfig(), n_routed_experts=8, n_group=2, topk_group=1).validate()
    layer = moe.MoE(cfg, ImplConfig(), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.hidden_size))
    valid = jnp.array([[True] * 5, [True, True, False, False, False]])
    _, aux = layer(x, valid)
    assert float(aux["expert_counts"].sum()) == 7 * cfg.num_experts_per_tok
    chex.assert_shape(aux["expert_counts"], (8,))
    assert np.isfinite(float(aux["balance_loss"]))


def _naive_balance(scores_bte, idx_btk, valid_bt, k):
    """sum_i f_i P_i per sequence over its valid tokens, then the mean over sequences that have any (float64 loops)."""
    scores, idx, valid = (np.asarray(a) for a in (scores_bte, idx_btk, valid_bt))
    e = scores.shape[-1]
    per_seq = []
    for b in range(scores.shape[0]):
        rows = [t for t in range(scores.shape[1]) if valid[b, t]]
        if not rows:
            continue
        f = np.zeros(e)
        p = np.zeros(e)
        for t in rows:
            for j in idx[b, t]:
                f[j] += e / (k * len(rows))
            p += scores[b, t].astype(np.float64) / scores[b, t].astype(np.float64).sum() / len(rows)
        per_seq.append((f * p).sum())
    return np.mean(per_seq)


def test_sequence_balance_loss_is_a_mean_over_sequences_without_padding_rows():
    # 3 rows, E=4, K=2: rows of 4 and 2 valid tokens (different lengths tell a per-sequence mean from a pooled one),
    # and an all-padding row that must not count as a sequence with loss 0.
    # Row 0 always picks experts 0 and 1 and scores them high (unbalanced); row 1 spreads over all four.
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.05, 0.3, (3, 4, 4))
    scores[0, :, :2] += 0.6
    scores = jnp.asarray(scores, jnp.float32)
    idx = jnp.asarray([[[0, 1]] * 4, [[0, 1], [2, 3], [0, 1], [2, 3]], [[1, 2]] * 4], jnp.int32)
    valid = jnp.array([[True] * 4, [True, True, False, False], [False] * 4])
    got = float(routing.sequence_balance_loss(scores, idx, valid, k=2))
    np.testing.assert_allclose(got, _naive_balance(scores, idx, valid, 2), rtol=1e-6)
    # the alternatives it must differ from: pooled over all tokens, summed over rows, padding row counted as 0
    pooled = _naive_balance(scores.reshape(1, 12, 4), idx.reshape(1, 12, 2), valid.reshape(1, 12), 2)
    per_row = [_naive_balance(scores[i:i + 1], idx[i:i + 1], valid[i:i + 1], 2) for i in range(2)]
    for wrong in (pooled, sum(per_row), sum(per_row) / 3):
        assert abs(got - wrong) > 0.05, (got, wrong)


def test_moe_layer_balance_loss_matches_a_naive_computation():
    from flax import nnx

    cfg = dataclasses.replace(ModelConfig(), n_routed_experts=8, n_group=2, topk_group=1).validate()
    layer = moe.MoE(cfg, ImplConfig(), nnx.Rngs(0))
    layer.bias[...] = jax.random.normal(jax.random.key(5), (8,)) * 0.05  # the bias steers selection, not P_i
    x = jax.random.normal(jax.random.key(1), (3, 6, cfg.hidden_size))
    valid = jnp.array([[True] * 6, [True, True, True, False, False, False], [False] * 6])
    _, aux = layer(x, valid)
    x_nd = np.asarray(x, np.float64).reshape(18, -1)
    scores = 1 / (1 + np.exp(-(x_nd @ np.asarray(layer.router[...], np.float64))))  # (N, E)
    idx, _ = routing.select_experts(jnp.asarray(scores, jnp.float32), layer.bias[...], cfg)
    k = cfg.num_experts_per_tok
    want = _naive_balance(scores.reshape(3, 6, 8), np.asarray(idx).reshape(3, 6, k), valid, k)
    chex.assert_shape(aux["balance_loss"], ())
    np.testing.assert_allclose(float(aux["balance_loss"]), want, rtol=1e-5)
    counts = np.zeros(8)
    for n in np.flatnonzero(np.asarray(valid).reshape(-1)):
        counts[np.asarray(idx)[n]] += 1
    np.testing.assert_array_equal(np.asarray(aux["expert_counts"]), counts)


class RoutingVariants(chex.TestCase):
    """Routing and the balance term are the same traced under jit and run eagerly (hand-computed cases above)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_group_limited_selection_and_balance(self):
        cfg = _cfg(n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=3)
        s = jnp.array([[0.9, 0.8, 0.1, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.9, 0.2, 0.4]])
        bias = jnp.array([0.0, 0.0, -0.6, 0.0, 0.0, 0.0])
        idx, gates = self.variant(lambda s, b: routing.select_experts(s, b, cfg))(s, bias)
        chex.assert_shape((idx, gates), (2, 3))
        assert sorted(np.asarray(idx[0]).tolist()) == [0, 1, 2] and sorted(np.asarray(idx[1]).tolist()) == [3, 4, 5]
        np.testing.assert_allclose(np.sort(np.asarray(gates[1])), np.sort([0.9, 0.2, 0.4]) / 1.5 * 2.5, rtol=1e-6)
        valid = jnp.array([[True, True]])
        loss = self.variant(routing.sequence_balance_loss, static_argnums=3)(s[None], idx[None], valid, 3)
        np.testing.assert_allclose(loss, _naive_balance(s[None], idx[None], valid, 3), rtol=1e-6)


@pytest.mark.parametrize("budget_blocks", [1, 3])
def test_chunked_block_matmul_equals_one_batched_matmul(budget_blocks):
    """Past the weight budget the blocks run in chunks with a recomputing backward; values and both gradients
    equal the one-shot gather (several blocks of one expert inside a chunk, a partial last chunk)."""
    from dsv3_jax.kernels.precision import Policy

    nb, b, i, o, e = 7, 4, 5, 6, 3
    x = jax.random.normal(jax.random.key(0), (nb, b, i))
    w = jax.random.normal(jax.random.key(1), (e, i, o))
    expert = jnp.array([0, 0, 1, 2, 2, 2, 1], jnp.int32)
    cot = jax.random.normal(jax.random.key(2), (nb, b, o))
    budget = budget_blocks * i * o * 4
    assert grouped_matmul._blocks_per_chunk(nb, w, budget) == budget_blocks

    def loss(fn_budget, x, w):
        return jnp.sum(grouped_matmul.block_matmul(x, w, expert, Policy(), budget=fn_budget) * cot)

    want = jnp.einsum("nbi,nio->nbo", x, w[expert], precision="highest")
    chex.assert_trees_all_close(grouped_matmul.block_matmul(x, w, expert, Policy(), budget=budget), want, atol=1e-5)
    g_chunked = jax.grad(functools.partial(loss, budget), argnums=(0, 1))(x, w)
    g_once = jax.grad(functools.partial(loss, 2**30), argnums=(0, 1))(x, w)
    chex.assert_trees_all_close(g_chunked, g_once, atol=1e-5)


@pytest.mark.parametrize("used, per_step", [(3, 2), (7, 3), (1, 4)])
def test_block_matmul_loops_over_the_used_blocks_only(used, per_step):
    """The loop over the used blocks, `per_step` at a time, against the one-shot einsum on the used blocks, values
    and gradients. Blocks past the last chunk that holds a used block are NaN, as stale padding could be: they are
    never read (their outputs and input gradients are zeros, the weight gradient stays finite); blocks inside that
    chunk but past `used` hold zeros, as the dispatch leaves padding, so their outputs are zeros too."""
    from dsv3_jax.kernels.precision import Policy

    nb, b, i, o, e = 7, 4, 5, 6, 3
    computed = -(-used // per_step) * per_step
    x = jax.random.normal(jax.random.key(0), (nb, b, i))
    x = jnp.where((jnp.arange(nb) >= used)[:, None, None], 0.0, x)
    x = jnp.where((jnp.arange(nb) >= computed)[:, None, None], jnp.nan, x)
    w = jax.random.normal(jax.random.key(1), (e, i, o))
    expert = jnp.array([0, 0, 1, 2, 2, 2, 2], jnp.int32)
    cot = jax.random.normal(jax.random.key(2), (nb, b, o))

    def loss(x, w):
        y = grouped_matmul.block_matmul(x, w, expert, Policy(), used=jnp.int32(used), per_step=per_step)
        return jnp.sum(y * cot), y

    def ref(x, w):
        y = jnp.einsum("nbi,nio->nbo", x[:used], w[expert[:used]], precision="highest")
        return jnp.sum(y * cot[:used]), y

    (_, y), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
    (_, y_ref), g_ref = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(x, w)
    chex.assert_trees_all_close(y[:used], y_ref, atol=1e-5)
    assert not bool(jnp.any(y[used:]))
    chex.assert_trees_all_close(g[0][:used], g_ref[0][:used], atol=1e-5)
    assert not bool(jnp.any(g[0][computed:]))  # (padding inside the last chunk gets a gradient no row reads)
    chex.assert_trees_all_close(g[1], g_ref[1], atol=1e-5)


def test_blocked_moe_under_a_small_weight_budget_matches_the_naive_loop(monkeypatch):
    """The blocked backend with its weights gathered a few blocks at a time is still the exact MoE."""
    from dsv3_jax.kernels.precision import Policy

    n, d, f, e, k = 40, 6, 5, 4, 2
    keys = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(keys[0], (n, d))
    idx = jax.random.randint(keys[1], (n, k), 0, e)
    gates = jax.random.uniform(keys[2], (n, k))
    wg, wu = (jax.random.normal(kk, (e, d, f)) for kk in jax.random.split(keys[3]))
    wd = jax.random.normal(keys[4], (e, f, d))
    want = moe_backends.grouped_ffn(x, idx, gates, wg, wu, wd, "dense", 4, Policy())
    monkeypatch.setattr(grouped_matmul, "BLOCK_WEIGHT_BUDGET_BYTES", 2 * d * f * 4)
    got = moe_backends.grouped_ffn(x, idx, gates, wg, wu, wd, "blocked", 4, Policy())
    chex.assert_trees_all_close(got, want, atol=1e-5)


@pytest.mark.parametrize("rank_max", [0, 2**22])
def test_block_layout_by_hand_from_the_sort_and_the_one_hot_ranks(monkeypatch, rank_max):
    """Each expert's rows, in row order, fill its run of whole blocks; padding slots point past the rows. Both
    ways of ranking rows (one-hot cumsum for few experts, a sort past ONE_HOT_RANK_MAX) give this layout."""
    monkeypatch.setattr(grouped_matmul, "ONE_HOT_RANK_MAX", rank_max)
    idx = jnp.array([[2, 0], [0, 3], [2, 0], [0, 2]], jnp.int32)  # rows 0..7 -> experts 2 0 0 3 2 0 0 2; none: 1
    layout = grouped_matmul.block_layout(idx, 4, 2)
    # expert 0: rows 1 2 5 6 -> blocks 0-1; expert 2: rows 0 4 7 -> blocks 2-3 (one pad); expert 3: row 3 -> block 4;
    # the static bound is min(8/2 + 4, 8) = 8 blocks, the unused ones are padding
    np.testing.assert_array_equal(layout.slot_r, [4, 0, 1, 8, 5, 2, 3, 6])
    np.testing.assert_array_equal(layout.row_p, [1, 2, 5, 6, 0, 4, 7, 8, 3] + [8] * 7)
    np.testing.assert_array_equal(layout.expert_b[:5], [0, 0, 2, 2, 3])
