"""Generation: cached decode against the full forward, greedy against transformers' generate, MTP speculative
decoding against plain greedy, sampling rules, stops, streaming, and the cache size formula.

Compiles are the cost here: every test of one model reuses the same prompts and budget so that the prefill and the
decode loop compile once per (shapes, sampling rule)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import errors
from dsv3_jax.infer import sampling
from dsv3_jax.model.routing import RouterBias
from dsv3_jax.model.transformer import Transformer, block_consts, create, unstacked
from dsv3_jax.presets import load_config

PROMPTS = [[5, 9, 33, 2, 7], [100, 3], [4] * 17 + [8]]  # different lengths; the longest spans two 16-buckets
NEW = 12


def randomize(model: Transformer, seed: int) -> Transformer:
    """Norm scales ~ 1 + N(0, 0.1^2) and routing bias ~ N(0, 0.05^2) (ones and zeros would hide bugs)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if isinstance(var, RouterBias):
            var.set_value(jnp.asarray(0.05 * rng.standard_normal(shape), dtype))
        elif "norm" in str(path[-2]):
            var.set_value(jnp.asarray(1 + 0.1 * rng.standard_normal(shape), dtype))
    return model


def make_drafter(model: Transformer, alpha: float) -> Transformer:
    """A model whose MTP head is a good drafter: every block's output projections scaled by alpha, so the next
    token is mostly a function of the current one, and an MTP module that applies the main model's final norm to
    the embedding of token t+1 (eh_proj = [I; 0], enorm = 1). alpha trades acceptance for non-trivial text."""
    d = model.cfg.hidden_size
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("w_down",) or path[-2] in ("o_proj", "down"):
            var.set_value(var.get_value() * alpha)
    m = model.mtp[0]
    m.eh_proj.weight.set_value(jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], axis=0))
    m.enorm.weight.set_value(jnp.ones((d,)))
    m.norm.weight.set_value(model.norm.weight.get_value())
    return model


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(load_config("tiny").model, initializer_range=0.1)  # logits of order 1


@pytest.fixture(scope="module")
def model(cfg):
    return randomize(create(cfg, seed=0), seed=0)


@pytest.fixture(scope="module")
def greedy(model):
    return sampling.generate(model, PROMPTS, NEW)


@pytest.fixture(scope="module")
def drafter(model):
    return make_drafter(nnx.clone(model), alpha=0.05)


def full_logits(model: Transformer, seqs: list[list[int]]) -> np.ndarray:
    """Logits of the full forward (no cache) for right-padded sequences, (B, T, V)."""
    t = max(map(len, seqs))
    ids = np.zeros((len(seqs), t), np.int32)
    seg = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], seg[i, : len(s)] = s, 1
    fwd = nnx.jit(lambda m, x, s: m(x, segment_ids=s, mtp=False).logits)
    return np.asarray(fwd(model, jnp.asarray(ids), jnp.asarray(seg)))


# ----------------------------------------------------------------------------------------------------------------
# (1) The latent cache reproduces the full forward.


@pytest.mark.parametrize("block", [None, 8])
def test_cached_decode_matches_full_forward_logits(model, cfg, block):
    """Prefill a right-padded batch of different lengths in one pass, then decode teacher-forced tokens one at a
    time, each row at its own position: logits equal the full forward's at every position. With
    impl.attention_block_size 8 the 20-slot cache is read in blocks, up to the largest position only."""
    if block is not None:
        blocked = create(cfg, seed=0, impl=dataclasses.replace(model.impl, attention_block_size=block))
        nnx.update(blocked, nnx.state(model))
    lens, steps = [5, 2, 11], 6
    rng = np.random.default_rng(1)
    seqs = [rng.integers(2, cfg.vocab_size, n + steps).tolist() for n in lens]
    ref = full_logits(model, seqs)

    decoded = model if block is None else blocked
    graphdef, *state = nnx.split(unstacked(decoded), nnx.Param, RouterBias, ...)  # the layout generate decodes on
    slots = max(lens) + steps + 3

    @jax.jit
    def run_prefill(state, ids, lens):
        logits, _, cache, _ = sampling.prefill(nnx.merge(graphdef, *state), ids, lens, slots)
        return logits, cache

    @jax.jit
    def run_step(state, tok_b, pos_b, cache):
        logits, _, cache = sampling.decode_step(nnx.merge(graphdef, *state), tok_b[:, None], pos_b[:, None], cache)
        return logits[:, 0], cache

    ids = np.zeros((len(lens), max(lens)), np.int32)
    for i, (s, n) in enumerate(zip(seqs, lens)):
        ids[i, :n] = s[:n]
    logits, cache = run_prefill(state, ids, np.array(lens, np.int32))
    for i, n in enumerate(lens):
        np.testing.assert_allclose(np.asarray(logits[i, :n]), ref[i, :n], atol=1e-4, rtol=1e-4)
    for k in range(steps):
        pos = np.array(lens, np.int32) + k
        tok = np.array([s[p] for s, p in zip(seqs, pos)], np.int32)
        step_logits, cache = run_step(state, tok, pos, cache)
        np.testing.assert_allclose(np.asarray(step_logits), ref[np.arange(len(lens)), pos], atol=1e-4, rtol=1e-4)


def test_greedy_is_argmax_of_full_forward(model, greedy):
    """Each generated token is the full forward's argmax given the prompt and the tokens before it."""
    assert [len(t) for t in greedy.tokens] == [NEW] * len(PROMPTS)
    assert greedy.finish_reasons == ["length"] * len(PROMPTS)
    ref = full_logits(model, [p + t for p, t in zip(PROMPTS, greedy.tokens)])
    for i, (p, t) in enumerate(zip(PROMPTS, greedy.tokens)):
        assert ref[i, len(p) - 1: len(p) - 1 + NEW].argmax(-1).tolist() == t
    assert greedy.timing["decode_forwards"] == NEW - 1  # the first token comes from the prefill
    assert greedy.timing["new_tokens"] == NEW * len(PROMPTS) and greedy.acceptance is None


def test_decode_reads_the_current_weights(model, greedy):
    """generate decodes on a per-layer copy of the last model's stacked weights: an update must reach it."""
    var = model.moe_layers.attn.o_proj.weight
    before = var.get_value()
    var.set_value(-before)
    try:
        got = sampling.generate(model, PROMPTS, NEW)
        ref = full_logits(model, [p + t for p, t in zip(PROMPTS, got.tokens)])
    finally:
        var.set_value(before)
    assert got.tokens != greedy.tokens
    for i, (p, t) in enumerate(zip(PROMPTS, got.tokens)):
        assert ref[i, len(p) - 1: len(p) - 1 + NEW].argmax(-1).tolist() == t


def test_compiled_loops_are_reused_across_calls_and_equal_models(model, greedy, cfg):
    """A repeated request compiles nothing, nor does the same request on another model of the same structure
    (graphdefs compare equal); each still decodes its own weights."""
    again = sampling.generate(model, PROMPTS, NEW)
    assert again.timing["compile_s"] == 0.0 and again.tokens == greedy.tokens
    other = randomize(create(cfg, seed=1), seed=1)
    got = sampling.generate(other, PROMPTS, NEW)
    assert got.timing["compile_s"] == 0.0 and got.tokens != greedy.tokens
    ref = full_logits(other, [p + t for p, t in zip(PROMPTS, got.tokens)])
    for i, (p, t) in enumerate(zip(PROMPTS, got.tokens)):
        assert ref[i, len(p) - 1: len(p) - 1 + NEW].argmax(-1).tolist() == t


def test_stop_tokens_end_rows_independently(model, greedy):
    stop = greedy.tokens[0][3]
    got = sampling.generate(model, PROMPTS, NEW, stop_tokens=[stop])
    for row, full in zip(got.tokens, greedy.tokens):
        cut = full.index(stop) + 1 if stop in full else NEW
        assert row == full[:cut]
    assert got.finish_reasons[0] == "stop"
    assert got.finish_reasons == ["stop" if stop in full else "length" for full in greedy.tokens]


def test_streaming_chunks_concatenate_to_the_result(model, greedy):
    calls = []
    got = sampling.generate(model, PROMPTS, NEW, on_tokens=calls.append, chunk_size=4)
    assert got.tokens == greedy.tokens
    assert len(calls) == 1 + -(-(NEW - 1) // 4)  # the prefill's token, then one call per compiled chunk
    assert all(len(row) == 1 for row in calls[0])
    assert [[t for c in calls for t in c[i]] for i in range(len(PROMPTS))] == greedy.tokens


def test_sampling_is_seeded(model, greedy):
    kw = {"temperature": 0.8, "top_p": 0.9}
    a = sampling.generate(model, PROMPTS, NEW, seed=1, **kw)
    b = sampling.generate(model, PROMPTS, NEW, seed=1, **kw)
    c = sampling.generate(model, PROMPTS, NEW, seed=2, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens and a.tokens != greedy.tokens
    assert all(0 <= t < 258 for row in a.tokens for t in row)


@pytest.mark.parametrize("rule, expected", [
    ({"temperature": 1.0, "top_k": 2}, [0.625, 0.375, 0, 0]),
    ({"temperature": 1.0, "top_p": 0.7}, [0.625, 0.375, 0, 0]),  # mass before token 1 is 0.5 < 0.7, before 2 is 0.8
    ({"temperature": 1.0, "top_p": 0.85}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    ({"temperature": 2.0}, np.sqrt([0.5, 0.3, 0.15, 0.05]) / np.sqrt([0.5, 0.3, 0.15, 0.05]).sum()),
])
def test_sampling_rule_frequencies(rule, expected):
    n = 20000
    logits = jnp.tile(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), (n, 1))
    draws = np.asarray(sampling.sample_tokens(logits, jax.random.key(0), sampling.SamplingRule(**rule)))
    freq = np.bincount(draws, minlength=4) / n
    np.testing.assert_allclose(freq, expected, atol=0.015)  # 4 sigma of a binomial frequency at n = 20000
    assert all(freq[np.asarray(expected) == 0] == 0)


def test_greedy_rule_is_argmax():
    logits = jax.random.normal(jax.random.key(3), (64, 50))
    got = sampling.sample_tokens(logits, jax.random.key(0), sampling.SamplingRule())
    assert got.tolist() == np.asarray(logits).argmax(-1).tolist()


@pytest.mark.parametrize("kwargs, match", [
    ({"prompts": [[3], []]}, "prompt 1 is empty"),
    ({"prompts": [[3, 258]]}, "token id 258 is outside the vocabulary"),
    ({"prompts": [[3] * 500], "max_new_tokens": 13}, "max_position_embeddings=512"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"stop_tokens": [999]}, "stop token id 999"),
    ({"speculative": "medusa"}, "speculative"),
])
def test_bad_input_raises_one_line_error(model, kwargs, match):
    kw = {"prompts": [[3, 4]], "max_new_tokens": 4} | kwargs
    with pytest.raises(errors.GenerateError, match=match) as e:
        sampling.generate(model, **kw)
    assert "\n" not in str(e.value)


def test_speculative_needs_an_mtp_module():
    cfg = dataclasses.replace(load_config("tiny").model, num_nextn_predict_layers=0)
    with pytest.raises(errors.GenerateError, match="num_nextn_predict_layers"):
        sampling.generate(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), [[3]], 2, speculative="mtp")


# ----------------------------------------------------------------------------------------------------------------
# (3) MTP speculative decoding.


def test_speculative_greedy_equals_plain_greedy_random_model(model, greedy):
    """A random MTP head drafts badly: almost every draft is rejected, output unchanged."""
    spec = sampling.generate(model, PROMPTS, NEW, speculative="mtp")
    assert spec.tokens == greedy.tokens
    assert spec.drafts > 0 and spec.acceptance == spec.accepted / spec.drafts


def test_speculative_greedy_equals_plain_greedy_good_drafter(drafter):
    plain = sampling.generate(drafter, PROMPTS, NEW)
    spec = sampling.generate(drafter, PROMPTS, NEW, speculative="mtp")
    print(f"acceptance {spec.accepted}/{spec.drafts} = {spec.acceptance:.3f}; forwards "
          f"{spec.timing['decode_forwards']} vs {plain.timing['decode_forwards']}")
    assert spec.tokens == plain.tokens
    assert len({t for row in plain.tokens for t in row}) > 8  # the text is not a constant
    assert 0.3 < spec.acceptance < 1.0  # both the accept and the reject paths run
    assert spec.timing["decode_forwards"] < plain.timing["decode_forwards"]
    # with stop tokens the rows end exactly where plain decoding ends them, also inside an accepted pair
    stops = sorted({row[k] for row in plain.tokens for k in (4, 7)})
    assert (sampling.generate(drafter, PROMPTS, NEW, stop_tokens=stops, speculative="mtp").tokens
            == sampling.generate(drafter, PROMPTS, NEW, stop_tokens=stops).tokens)


def test_mtp_draft_at_one_position_matches_the_full_mtp_step(model, cfg):
    """`mtp_draft` runs the MTP block's FFN and the head on one selected token per row: its logits equal those of
    the full `mtp_step` over every position at that token, and both write the same cache entries (the block's
    input latents) at every position, on a cache that already holds entries before them."""
    graphdef, *state = nnx.split(unstacked(model), nnx.Param, RouterBias, ...)
    b, t, d, slots = 3, 2, cfg.hidden_size, 16
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(2, cfg.vocab_size, (b, t)), jnp.int32)
    hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    pos = jnp.asarray([[4, 5], [0, 1], [9, 10]], jnp.int32)
    sel = jnp.asarray([1, 0, 1], jnp.int32)
    cache = model.init_cache(b, slots)["mtp"][0]
    cache = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), cache)  # earlier entries

    @jax.jit
    def both(state, cache):
        view = nnx.merge(graphdef, *state)
        consts = block_consts(pos, jnp.ones((b, t), jnp.int32), cfg)
        _, full, _, full_cache = view.mtp_step(1, ids, hidden, consts, cache)
        one, one_cache = sampling.mtp_draft(view, ids, hidden, pos, cache, sel)
        return full[jnp.arange(b), sel], full_cache, one, one_cache

    full, full_cache, one, one_cache = both(state, cache)
    np.testing.assert_allclose(np.asarray(one), np.asarray(full), atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(full)).max() > 0.1  # logits of order 1: the comparison is not trivial
    for a, c in zip(jax.tree.leaves(one_cache), jax.tree.leaves(full_cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_decode_loops_update_the_cache_in_place(model, greedy, cfg):
    """The compiled decode loops (plain and speculative) copy no layer's cache: each step scatters its latents
    into the loop-carried cache and reads that (reading the cache as it was before the write makes XLA copy every
    layer's (B, S, c) cache twice per step)."""
    programs = sampling.Programs()  # its own: the shared one also holds other tests' models and batch sizes
    sampling.generate(model, PROMPTS, NEW, programs=programs)
    sampling.generate(model, PROMPTS, NEW, speculative="mtp", programs=programs)
    loops = [exe.as_text() for key, exe in programs.executables.items() if key[0] is sampling._chunk_fn]
    assert len(loops) >= 2
    b = len(PROMPTS)
    for width in (cfg.kv_lora_rank, cfg.qk_rope_head_dim):
        cache_like = re.compile(rf"= f32\[{b},\d+,{width}\]\S* copy\(")
        carried = re.compile(rf"f32\[{b},\d+,{width}\]")
        for text in loops:
            assert carried.search(text)  # the pattern names the cache's shape
            assert not cache_like.search(text), cache_like.search(text).group(0)


def test_acceptance_is_per_call(drafter, model):
    first = sampling.generate(drafter, PROMPTS, NEW, speculative="mtp")
    sampling.generate(model, PROMPTS, NEW, speculative="mtp")
    again = sampling.generate(drafter, PROMPTS, NEW, speculative="mtp")
    assert (again.drafts, again.accepted, again.acceptance) == (first.drafts, first.accepted, first.acceptance)


def test_speculative_sampling_with_one_candidate_is_greedy(drafter):
    """The sampled verification path (top_k=1 leaves one candidate) reproduces greedy decoding."""
    plain = sampling.generate(drafter, PROMPTS, NEW)
    spec = sampling.generate(drafter, PROMPTS, NEW, temperature=0.7, top_k=1, seed=5, speculative="mtp")
    assert spec.tokens == plain.tokens and spec.accepted > 0


# ----------------------------------------------------------------------------------------------------------------
# (2) Parity with transformers' greedy generate.


HF_CFG = {"q_lora_rank": 20, "num_hidden_layers": 3, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
          "max_position_embeddings": 64,
          "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                              "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 1.0}}


@pytest.mark.slow  # transformers' generate end to end, like the hf export round trips
def test_greedy_matches_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    hf_util = pytest.importorskip("tests.hf_util")
    from dsv3_jax.interop import hf

    ref = hf_util.make_hf_model(hf_util.hf_config(**HF_CFG), seed=11)  # every weight random, incl. norms and bias
    ref.save_pretrained(tmp_path)
    ours = hf.load(tmp_path, dtype="float32")
    prompts, n = [[5, 9, 33, 2, 7, 60], [40], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]], 16
    got = sampling.generate(ours, prompts, n, stop_tokens=[ref.config.eos_token_id])
    for p, row in zip(prompts, got.tokens):
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)
        assert row == out[0, len(p):].tolist()


# ----------------------------------------------------------------------------------------------------------------
# (5) Cache size.


def test_cache_bytes_per_token_formula(model, cfg):
    v3 = load_config("deepseek-v3-671b").model
    assert sampling.cache_bytes_per_token(v3, "bfloat16") == (512 + 64) * 61 * 2  # 70,272 bytes per token
    assert sampling.cache_bytes_per_token(v3, "bfloat16", mtp=True) == (512 + 64) * 62 * 2
    assert sampling.cache_bytes_per_token(cfg) == (20 + 6) * 3 * 4
    cache = model.init_cache(2, 5)  # what decoding really allocates, MTP cache included
    measured = sum(x.nbytes for x in jax.tree.leaves(cache)) // (2 * 5)
    assert measured == sampling.cache_bytes_per_token(cfg, mtp=True)
    main_only = sum(x.nbytes for k, v in cache.items() if k != "mtp" for x in jax.tree.leaves(v)) // (2 * 5)
    assert main_only == sampling.cache_bytes_per_token(cfg)


# ----------------------------------------------------------------------------------------------------------------
# (4) Speculative sampling keeps the sampling distribution.


@pytest.mark.slow  # a frequency test: thousands of sampled tokens through the compiled loop
@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_sampled_tokens_follow_the_model_distribution(speculative):
    """N rows of one prompt sample 3 tokens at temperature 1 (V = 8). The frequency of every pair (t2, t3) must
    match the exact P(t2, t3) = sum_t1 P(t1) P(t2 | t1) P(t3 | t1, t2) from the full forward. With the MTP
    drafter, t3 is emitted through the accept path whenever the draft equals t2, so a verification that accepted
    drafts the main model did not sample, or took y1 from the wrong position, shifts these frequencies.

    Tolerance: a cell's frequency is binomial, sd = sqrt(p (1 - p) / N); 4.5 sd (+ 2 / N for tiny p) per cell
    makes a false alarm over all 64 cells about 64 * 7e-6 < 1e-3 likely. N = 4096 gives sd <= 0.0078."""
    n, v = 4096, 8
    cfg = dataclasses.replace(load_config("tiny").model, vocab_size=v, initializer_range=0.3)
    model = make_drafter(randomize(create(cfg, seed=1), seed=1), alpha=0.3)
    prompt = [3, 5, 2, 6]
    got = sampling.generate(model, [prompt] * n, 3, temperature=1.0, seed=7, speculative=speculative)
    seqs = [prompt + [a, b] for a in range(v) for b in range(v)]
    logits = full_logits(model, seqs)  # (64, 6, V)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float64 if jax.config.x64_enabled else jnp.float32)))
    p1 = probs[0, len(prompt) - 1]  # (V,)
    p2 = probs[::v, len(prompt)]  # row a * v: P(t2 | t1 = a), (V, V)
    p3 = probs[:, len(prompt) + 1].reshape(v, v, v)  # P(t3 | t1, t2)
    exact = np.einsum("a,ab,abc->bc", p1, p2, p3)  # (t2, t3)
    assert exact.max() > 2.5 / v**2  # not uniform
    freq = np.zeros((v, v))
    for row in got.tokens:
        freq[row[1], row[2]] += 1 / n
    bound = 4.5 * np.sqrt(exact * (1 - exact) / n) + 2 / n
    assert (np.abs(freq - exact) <= bound).all(), np.abs(freq - exact) / bound
    if speculative:
        assert got.accepted > n / 8, got.accepted  # the accept path emitted many of the t3
