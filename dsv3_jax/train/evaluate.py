"""Held-out evaluation: sums of per-batch statistics over the eval split, in float64 on the host.

The training loop sums (cross-entropy, targets) with `step.eval_step`; `python -m dsv3_jax.tools.eval` sums more
(accuracies, expert counts, MTP depths) with `batch_sums`. Both walk the split through `split_sums`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import DataConfig
from dsv3_jax.data import pipeline
from dsv3_jax.train import losses
from dsv3_jax.train.step import forward


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    """Bits per UTF-8 byte of a loss in nats per predicted token: / ln 2 (nats -> bits), / bytes per predicted token
    (`pipeline.SplitInfo.bytes_per_token`). The one conversion: the training loop and the eval tool both use it."""
    return nats_per_token / math.log(2) / bytes_per_token


def split_sums(fn: Callable[[dict], object], data_cfg: DataConfig, batch_size: int, batches: int, seed: int,
               vocab_size: int, process_index: int = 0, process_count: int = 1):
    """The sum of `fn(batch)` (a pytree of arrays) over the first `batches` eval batches (0: the whole split),
    accumulated in float64; None when the split has no batch."""
    it = pipeline.make_dataset(data_cfg, "eval", batch_size, process_index, process_count, seed=seed,
                               vocab_size=vocab_size)
    total = None
    for i, batch in enumerate(it):
        if batches and i >= batches:
            break
        sums = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(fn(batch)))
        total = sums if total is None else jax.tree.map(np.add, total, sums)
    return total


def batch_sums(graphdef, params, bias, batch: dict) -> dict:
    """Sums over one packed batch (B, T+1): main CE / correct / count, expert counts (L_moe, E), and per MTP depth
    CE / correct / count."""
    out = forward(graphdef, params, bias, batch, mtp=True)
    tokens, seg = batch["tokens"], batch["segment_ids"]
    mask = losses.same_document_mask(seg, 0)
    ce, n = losses.next_token_loss(out.logits, tokens, seg)
    hit = ((out.logits.argmax(-1) == tokens[:, 1:]) & mask).sum()
    res = {"ce": ce, "correct": hit.astype(jnp.float32), "count": n, "expert_counts": out.aux["expert_counts"]}
    if out.mtp_logits is not None:
        m_ce, m_n = losses.mtp_losses(out.mtp_logits, tokens, seg)
        hits = []
        for k in range(1, out.mtp_logits.shape[0] + 1):
            n_k = tokens.shape[1] - 1 - k
            pred = out.mtp_logits[k - 1][:, :n_k].argmax(-1)
            hits.append(((pred == tokens[:, k + 1:]) & losses.same_document_mask(seg, k)).sum())
        res.update(mtp_ce=m_ce, mtp_correct=jnp.stack(hits).astype(jnp.float32), mtp_count=m_n)
    return res
