"""`python -m dsv3_jax.tools.eval`: held-out loss, accuracies and MaxVio_global against a naive per-position loop."""

import jax
import numpy as np
import pytest

from dsv3_jax.config import DataConfig
from dsv3_jax.data import pipeline
from dsv3_jax.model import transformer as model_lib
from dsv3_jax.presets import load_config
from dsv3_jax.tools import eval as evaluation


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcorpus")
    rng = np.random.default_rng(0)
    for i in range(40):
        words = rng.choice(["def", "x", "=", "(", ")", "return", "if", ":", "y", "1"], size=40 + i)
        (root / f"d{i:02d}.py").write_text(" ".join(words) + "\n")
    return DataConfig(source=str(root / "*.py"), seq_len=32, eval_fraction=0.3, cache_dir=str(root / "cache"))


def _naive(model, data_cfg, batch_size, batches):
    """Float64 loops over every position: CE, argmax hits, MTP hits (depth k at t vs token t+k+1), counts."""
    ce = hits = n = 0.0
    depth = len(model.mtp)
    mtp_hits, mtp_n = np.zeros(depth), np.zeros(depth)
    counts = 0.0
    fwd = jax.jit(lambda ids, pos, seg: model(ids, positions=pos, segment_ids=seg))
    for i, b in enumerate(pipeline.make_dataset(data_cfg, "eval", batch_size)):
        if i >= batches:
            break
        tok, seg = b["tokens"], b["segment_ids"]
        out = fwd(tok[:, :-1], b["positions"][:, :-1], seg[:, :-1])
        logits, mtp_logits = np.asarray(out.logits, np.float64), np.asarray(out.mtp_logits, np.float64)
        counts = counts + np.asarray(out.aux["expert_counts"])
        t_in = tok.shape[1] - 1
        for r in range(tok.shape[0]):
            for t in range(t_in):
                if seg[r, t] and seg[r, t + 1] == seg[r, t]:
                    lg = logits[r, t]
                    ce += np.log(np.exp(lg - lg.max()).sum()) + lg.max() - lg[tok[r, t + 1]]
                    hits += lg.argmax() == tok[r, t + 1]
                    n += 1
                for k in range(1, depth + 1):
                    if t + k + 1 <= t_in and seg[r, t] and all(seg[r, t + j] == seg[r, t] for j in range(k + 2)):
                        mtp_hits[k - 1] += mtp_logits[k - 1, r, t].argmax() == tok[r, t + k + 1]
                        mtp_n[k - 1] += 1
    return ce / n, hits / n, mtp_hits / mtp_n, counts


def test_evaluate_model_matches_a_naive_loop(corpus):
    cfg = load_config("tiny")
    model = model_lib.create(cfg.model, seed=0)
    res = evaluation.evaluate_model(model, corpus, batch_size=4, batches=2)
    loss, acc, mtp_acc, counts = _naive(model, corpus, 4, 2)
    np.testing.assert_allclose(res["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(res["perplexity"], np.exp(loss), rtol=1e-5)
    np.testing.assert_allclose(res["accuracy"], acc, rtol=1e-6)
    np.testing.assert_allclose(res["mtp1_accuracy"], mtp_acc[0], rtol=1e-6)
    bpt = pipeline.split_info(corpus, "eval").bytes_per_token
    np.testing.assert_allclose(res["bits_per_byte"], loss / np.log(2) / bpt, rtol=1e-5)
    want = counts.max(-1) / counts.mean(-1) - 1
    np.testing.assert_allclose([res[f"maxvio_global/{i}"] for i in range(len(want))], want, rtol=1e-5)
    assert 0.0 <= res["mtp1_accuracy"] <= 1.0 and res["tokens"] > 0


def test_checkpoint_dir_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert evaluation.main(["--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --checkpoint") and "neither a run dir" in err and "\n" not in err
    assert evaluation.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_position_buckets_under_changed_rope_add_up_to_the_loss(corpus, tmp_path, capsys):
    """`--position-buckets` covering every position under `--model` rope fields: the buckets' token-weighted mean is
    the overall loss (computed by another pass, `batch_sums`), and their tokens add up to the predicted tokens."""
    import json

    from dsv3_jax.train import checkpoint, loop
    from dsv3_jax.train.state import init_state

    cfg = load_config("tiny", ["model.rope_scaling=null", "model.max_position_embeddings=32",
                               f"data.cache_dir={tmp_path / 'cache'}",
                               f"train.run_dir={tmp_path / 'run'}"])
    state, _, _ = init_state(cfg, loop.mesh_of(cfg))
    ckpt = checkpoint.Checkpointer(cfg.train.run_dir, 1, 1, async_save=False)
    ckpt.save(1, state._asdict(), None, cfg, force=True)
    ckpt.close()
    argv = ["--checkpoint", cfg.train.run_dir, "--data", corpus.source, "--seq-len", "32", "--batch-size", "2",
            "--batches", "2", "--position-buckets", "0,8,20,32", "--json", "--model",
            "model.rope_scaling={factor: 2, original_max_position_embeddings: 16}"]
    assert evaluation.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    buckets = res["position_buckets"]
    assert [(b["lo"], b["hi"]) for b in buckets] == [(0, 8), (8, 20), (20, 32)]
    assert sum(b["tokens"] for b in buckets) == res["tokens"]
    mean = sum(b["loss"] * b["tokens"] for b in buckets) / res["tokens"]
    np.testing.assert_allclose(mean, res["loss"], rtol=1e-6)
