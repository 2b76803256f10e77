"""Context extension (docs/context_extension.md): the report's YaRN stage configs, YaRN against transformers at the
stage values, starting a run from another run's checkpoint (train.init_from), and the loss by position bucket."""

import math
import re

import jax
import numpy as np
import pytest

from dsv3_jax.config import DataConfig
from dsv3_jax.data import pipeline
from dsv3_jax.errors import ConfigError
from dsv3_jax.model import transformer as model_lib
from dsv3_jax.model.rope import rope_inv_freq
from dsv3_jax.presets import load_config
from dsv3_jax.tools import eval as evaluation
from dsv3_jax.train import checkpoint, loop
from dsv3_jax.train.state import abstract_state, init_state

# REFERENCE.md: both stages use YaRN factor 40 over the 4K pre-training context, beta_fast 32, beta_slow 1,
# mscale = mscale_all_dim = 1; 32K stage: batch 1,920; 128K stage: batch 480; lr 7.3e-6; about 1,000 steps each.
STAGES = {"deepseek-v3-671b-32k": (32768, 1920), "deepseek-v3-671b-128k": (131072, 480)}
REPORT_YARN = {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
               "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("name", STAGES)
def test_stage_configs_have_the_reports_values(name):
    cfg = load_config(name)
    seq, batch = STAGES[name]
    y = cfg.model.rope_scaling
    assert (y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow) == (40.0, 4096, 32, 1)
    assert (y.mscale, y.mscale_all_dim, y.attention_factor) == (1.0, 1.0, None)
    assert cfg.data.seq_len == seq <= cfg.model.max_position_embeddings == 40 * 4096
    assert cfg.train.global_batch_size == batch and cfg.train.steps == 1000
    assert cfg.train.learning_rate == cfg.train.min_learning_rate == 7.3e-6 and cfg.train.warmup_steps == 0
    assert cfg.train.global_batch_size % cfg.train.micro_batches == 0
    # the attention temperature: (0.1 ln 40 + 1)^2 ~ 1.874 times 1/sqrt(128 + 64)
    assert cfg.model.softmax_scale() == pytest.approx((0.1 * math.log(40) + 1) ** 2 / math.sqrt(192), rel=1e-12)


def test_yarn_at_the_stage_values_matches_transformers():
    """transformers' DeepSeek-V3 attention scale and rotary frequencies / cos-sin multiplier, built from the
    report's numbers, against the 32K stage config (rope dims 64, nope 128: the softmax scale's 1/sqrt(192))."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds

    from tests.hf_util import hf_config

    ours = load_config("deepseek-v3-671b-32k").model
    ref = hf_config(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=16, kv_lora_rank=8,
                    max_position_embeddings=163840,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **REPORT_YARN})
    attn = hf_ds.DeepseekV3Attention(ref, layer_idx=0)
    assert ours.softmax_scale() == pytest.approx(attn.scaling, rel=1e-6)
    rotary = hf_ds.DeepseekV3RotaryEmbedding(ref)
    inv_freq, factor = rope_inv_freq(ours)
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(rotary.attention_scaling, rel=1e-6)


SHORT = ["model.rope_scaling=null", "model.max_position_embeddings=128", "data.seq_len=64"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A run dir holding one checkpoint (step 7) of a fresh tiny state trained at 64 tokens without rope scaling
    (seed 1, so no other run's init equals it): (its config, its state)."""
    cfg = load_config("tiny", SHORT + [f"train.run_dir={tmp_path_factory.mktemp('short') / 'src'}", "train.seed=1"])
    state, _, _ = init_state(cfg, loop.mesh_of(cfg))
    ckpt = checkpoint.Checkpointer(cfg.train.run_dir, 1, 1, async_save=False)
    ckpt.save(7, state._asdict(), None, cfg, force=True)
    ckpt.close()
    return cfg, state


def test_init_from_loads_the_arrays_bitwise_and_says_what_changed(short_run, tmp_path, capsys):
    src_cfg, src = short_run
    cfg = load_config("tiny", ["data.seq_len=256", f"train.init_from={src_cfg.train.run_dir}",
                               f"train.run_dir={tmp_path / 'new'}"])
    mesh = loop.mesh_of(cfg)
    abstract, _, tx = abstract_state(cfg, mesh)
    state = loop.init_from(cfg, abstract, tx, mesh, lead=True)
    for part in ("params", "bias"):
        got, want = getattr(state, part), getattr(src, part)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.dtype == w.dtype and np.array_equal(np.asarray(g), np.asarray(w))
    assert int(state.step) == 0
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(state.opt_state))  # fresh moments and counts
    lines = capsys.readouterr().err.strip().splitlines()
    where = f"init_from {src_cfg.train.run_dir}: "
    assert [x.split(":")[1].strip() if x.startswith(where) else x for x in lines] == [
        "model.rope_scaling", "model.max_position_embeddings", "data.seq_len"]
    assert lines[1] == where + "model.max_position_embeddings: 128 -> 512"
    assert lines[2] == where + "data.seq_len: 64 -> 256"


@pytest.mark.slow
def test_a_training_run_starts_from_init_from(short_run, tmp_path, capsys):
    """train() with train.init_from: one step at learning rate 0 (and no bias update) leaves the source's arrays
    bitwise as they were, so its checkpoint holds them; a run that ignored init_from would hold a fresh init."""
    src_cfg, src = short_run
    cfg = load_config("tiny", ["train.steps=1", "train.learning_rate=0", "train.min_learning_rate=0",
                               "train.bias_gamma=0", "train.eval_every=0", "train.sample_tokens=0",
                               "train.tensorboard=false", "train.progress=false", "train.checkpoint_every=1",
                               f"train.init_from={src_cfg.train.run_dir}", f"train.run_dir={tmp_path / 'new'}"])
    loop.train(cfg)
    assert f"init_from {src_cfg.train.run_dir}: model.rope_scaling: None -> " in capsys.readouterr().err
    model, _ = checkpoint.load_model(tmp_path / "new")
    from flax import nnx

    from dsv3_jax.model.routing import RouterBias

    _, params, bias = nnx.split(model, nnx.Param, RouterBias)
    for got, want in ((nnx.to_pure_dict(params), src.params), (nnx.to_pure_dict(bias), src.bias)):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert np.array_equal(np.asarray(g), np.asarray(w))


def test_init_from_refuses_other_shapes_with_one_line(short_run):
    src_cfg, _ = short_run
    cfg = load_config("tiny", ["model.kv_lora_rank=16", f"train.init_from={src_cfg.train.run_dir}"])
    abstract, _, _ = abstract_state(cfg, loop.mesh_of(cfg))
    with pytest.raises(ConfigError) as e:
        checkpoint.read_params(cfg.train.init_from, abstract.params, abstract.bias)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"train.init_from {src_cfg.train.run_dir} (step 7): ")
    assert re.search(r": \d+ of \d+ arrays differ, first \S*kv_a\S*: \(.+\) there, \(.+\) here$", msg), msg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucketcorpus")
    rng = np.random.default_rng(0)
    for i in range(30):
        words = rng.choice(["def", "x", "=", "(", ")", "return", "if", ":", "y", "1"], size=10 + 4 * i)
        (root / f"d{i:02d}.py").write_text(" ".join(words) + "\n")
    return DataConfig(source=str(root / "*.py"), seq_len=64, eval_fraction=0.3, cache_dir=str(root / "cache"))


def _naive_buckets(model, data_cfg, edges, batch_size, batches):
    """Float64 loops: every next-token prediction inside one document, put in the bucket of its input's position."""
    ce, n = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    fwd = jax.jit(lambda ids, pos, seg: model(ids, positions=pos, segment_ids=seg))
    for i, b in enumerate(pipeline.make_dataset(data_cfg, "eval", batch_size)):
        if i >= batches:
            break
        tok, seg, pos = b["tokens"], b["segment_ids"], b["positions"]
        logits = np.asarray(fwd(tok[:, :-1], pos[:, :-1], seg[:, :-1]).logits, np.float64)
        for r in range(tok.shape[0]):
            for t in range(tok.shape[1] - 1):
                if not (seg[r, t] and seg[r, t + 1] == seg[r, t]):
                    continue
                for k in range(len(edges) - 1):
                    if edges[k] <= pos[r, t] < edges[k + 1]:
                        lg = logits[r, t]
                        ce[k] += np.log(np.exp(lg - lg.max()).sum()) + lg.max() - lg[tok[r, t + 1]]
                        n[k] += 1
    return ce / n, n


def test_position_buckets_match_a_naive_per_position_loop(corpus):
    cfg = load_config("tiny")
    model = model_lib.create(cfg.model, seed=0)
    edges = (0, 7, 20, 41, 64)
    res = evaluation.evaluate_model(model, corpus, batch_size=4, batches=2, position_buckets=edges)
    loss, n = _naive_buckets(model, corpus, edges, 4, 2)
    got = res["position_buckets"]
    assert [(b["lo"], b["hi"]) for b in got] == list(zip(edges, edges[1:]))
    assert [b["tokens"] for b in got] == list(n) and n.min() > 0
    np.testing.assert_allclose([b["loss"] for b in got], loss, rtol=1e-5)
    assert sum(n) == res["tokens"]  # buckets covering every position hold every predicted token once


YARN_FIELDS = ["model.rope_scaling={factor: 8, original_max_position_embeddings: 64}",
               "model.max_position_embeddings=1024"]


@pytest.fixture(scope="module")
def plain_model():
    return model_lib.create(load_config("tiny", ["model.rope_scaling=null"]).model, seed=0)


def test_model_fields_change_rope_but_never_shapes(plain_model):
    yarn = evaluation.with_model_fields(plain_model, YARN_FIELDS)
    assert yarn.cfg == load_config("tiny", ["model.rope_scaling=null"] + YARN_FIELDS).model
    with pytest.raises(ConfigError, match=r"^--model model.kv_lora_rank=8 changes parameter shapes: \d+ of"):
        evaluation.with_model_fields(plain_model, ["model.kv_lora_rank=8"])
    with pytest.raises(ConfigError, match="model.KEY=VALUE"):
        evaluation.with_model_fields(plain_model, ["train.steps=3"])


@pytest.mark.slow
def test_model_fields_compute_what_a_model_built_with_them_computes(plain_model):
    """The same weights under YaRN compute what a model built with YaRN from the same seed computes (rope scaling
    creates no parameter, so the two share every array), and not what the plain model computes."""
    native = model_lib.create(load_config("tiny", ["model.rope_scaling=null"] + YARN_FIELDS).model, seed=0)
    yarn = evaluation.with_model_fields(plain_model, YARN_FIELDS)
    ids = (np.arange(100, dtype=np.int32)[None] * 7) % 250
    out = np.asarray(yarn(ids).logits)
    np.testing.assert_array_equal(out, np.asarray(native(ids).logits))
    assert not np.array_equal(out, np.asarray(plain_model(ids).logits))


@pytest.mark.parametrize("text", ["0,256,100", "5", "a,b", "-1,3"])
def test_bad_position_buckets_are_one_line(text, capsys):
    assert evaluation.main(["--checkpoint", ".", "--position-buckets", text]) == 2
    err = capsys.readouterr().err.strip()
    assert "--position-buckets" in err and "\n" not in err
