"""The units the training loop reports, each against a count made here: the MTP loss is a mean over each depth's
own targets (not over the main next-token targets), and held-out bits per byte are nats per predicted token / ln 2
/ (UTF-8 bytes per predicted token), the bytes and targets counted from the held-out documents themselves."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import DataConfig
from dsv3_jax.data import pipeline
from dsv3_jax.parallel.sharding import make_mesh
from dsv3_jax.presets import load_config
from dsv3_jax.train import losses
from dsv3_jax.train import state as train_state
from dsv3_jax.train.evaluate import bits_per_byte
from dsv3_jax.train.step import forward, train_step

SEQ, BATCH = 16, 4


def documents_batch(vocab: int) -> dict:
    """Rows of several short documents and some padding: each MTP depth has fewer targets than the main head."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(2, vocab, size=(BATCH, SEQ + 1)).astype(np.int32)
    seg = np.zeros((BATCH, SEQ + 1), np.int32)
    pos = np.zeros((BATCH, SEQ + 1), np.int32)
    for r, cuts in enumerate(([0, 4, 9, 17], [0, 3, 6, 12, 15], [0, 17], [0, 5, 11])):
        for d, (a, b) in enumerate(zip(cuts, cuts[1:]), 1):
            seg[r, a:b], pos[r, a:b] = d, np.arange(b - a)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


@pytest.mark.slow
def test_mtp_loss_is_a_mean_over_each_depths_own_targets():
    cfg = load_config("tiny", [f"data.seq_len={SEQ}", f"train.global_batch_size={BATCH}"])
    mesh = make_mesh(cfg.mesh)
    state, graphdef, tx = train_state.init_state(cfg, mesh)
    batch = jax.tree.map(jnp.asarray, documents_batch(cfg.model.vocab_size))
    with jax.set_mesh(mesh):
        _, m = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, cfg=cfg))(state, batch)
    out = jax.jit(functools.partial(forward, graphdef))(state.params, state.bias, batch)
    ce, n = losses.next_token_loss(out.logits, batch["tokens"], batch["segment_ids"])
    sums, counts = losses.mtp_losses(out.mtp_logits, batch["tokens"], batch["segment_ids"])
    counts = np.asarray(counts)
    assert (counts < 0.9 * float(n)).all()  # the denominators differ enough for the test to tell them apart
    np.testing.assert_allclose(float(m["loss"]), float(ce) / float(n), rtol=1e-5)
    np.testing.assert_allclose(float(m["mtp_loss"]), float(np.mean(np.asarray(sums) / counts)), rtol=1e-5)


@pytest.mark.slow
def test_bits_per_byte_of_the_training_loop(tmp_path):
    """One training step with an evaluation over the whole held-out split; its record's bits per byte against
    the held-out documents' own bytes and targets (byte tokenizer: a target per byte and one for the eos)."""
    from dsv3_jax.train.loop import train

    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdé xyz\n"), rng.integers(20, 80))) for _ in range(60)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = [f"data.source={tmp_path / 'd.jsonl'}", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=0.2"]
    cfg = load_config("tiny", [*data, f"data.seq_len={SEQ}", "train.global_batch_size=2", "train.steps=1",
                               "train.eval_every=1", "train.eval_batches=0", "train.sample_tokens=0",
                               "train.tensorboard=false", "train.peak_tflops=1", "train.progress=false",
                               f"train.run_dir={tmp_path / 'run'}"])
    train(cfg)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (ev,) = [r for r in rows if r["kind"] == "eval"]
    docs = pipeline.read_documents(DataConfig(source=str(tmp_path / "d.jsonl")))
    held = [t for (_, t), e in zip(docs, pipeline.eval_mask([k for k, _ in docs], 0.2)) if e]
    n_bytes = sum(len(t.encode("utf-8")) for t in held)
    targets = n_bytes + len(held)
    assert 0 < len(held) < len(docs)
    np.testing.assert_allclose(ev["bits_per_byte"], ev["loss"] / math.log(2) * targets / n_bytes, rtol=1e-9)
    assert bits_per_byte(math.log(2) * 3.0, 1.5) == pytest.approx(2.0)  # 3 bits per token, 1.5 bytes per token
