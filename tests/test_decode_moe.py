"""The decode MoE backend at batch (N*K >= E: a decode batch, or a speculative verify step's 2 tokens a row): exact
on skewed routing, and its compiled program runs no expert on a token that did not pick it."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels.precision import Policy
from dsv3_jax.model import moe_backends

E, K, D, F = 16, 4, 24, 12  # the `bench` model's E and K, small widths


def _naive(x, idx, gates, wg, wu, wd):
    """Per token, per chosen expert, in numpy float64."""
    x, idx, gates = np.asarray(x, np.float64), np.asarray(idx), np.asarray(gates, np.float64)
    wg, wu, wd = (np.asarray(w, np.float64) for w in (wg, wu, wd))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[n, j]
            h = x[n] @ wg[e]
            out[n] += gates[n, j] * ((h / (1 + np.exp(-h)) * (x[n] @ wu[e])) @ wd[e])
    return out


def _problem(n: int, skewed: bool, seed: int = 0):
    """n tokens with K distinct experts each; skewed: experts 3 and 7 on every token (what a decode batch of similar
    rows does), the other two choices spread over the rest."""
    rng = np.random.default_rng(seed)
    if skewed:
        rest = np.array([e for e in range(E) if e not in (3, 7)])
        idx = np.stack([np.concatenate([[3, 7], rng.choice(rest, K - 2, replace=False)]) for _ in range(n)])
    else:
        idx = np.stack([rng.choice(E, K, replace=False) for _ in range(n)])
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (n, D))
    gates = jax.random.uniform(keys[1], (n, K))
    w = [jax.random.normal(keys[i], s) * 0.3 for i, s in ((2, (E, D, F)), (3, (E, D, F)), (4, (E, F, D)))]
    return x, jnp.asarray(idx, jnp.int32), gates, *w


def _decode(*args):
    return jax.jit(lambda *a: moe_backends.grouped_ffn(*a, "decode", 0, Policy()))(*args)


@pytest.mark.parametrize("n", [4, 16, 32, 128])
@pytest.mark.parametrize("skewed", [False, True])
def test_decode_backend_at_batch_matches_naive_loop(n, skewed):
    """Plain steps of batch 4, 16 and 128 tokens' worth, and the verify steps of batch 2, 8, 16 and 64."""
    args = _problem(n, skewed)
    np.testing.assert_allclose(_decode(*args), _naive(*args), rtol=1e-5, atol=1e-5)


def test_verify_step_moe_runs_no_expert_on_tokens_that_did_not_pick_it():
    """The compiled decode MoE for a verify step of batch 16 (32 tokens, K 4 of E 16), skewed routing or not: no
    dot has every token or every expert's rows in one operand (the capacity-or-every-expert form computed E x N
    rows, 4x the routed pairs, whenever one expert got more than twice the mean); each dot is one block of
    DECODE_BLOCK rows against one expert's matrix."""
    n = 32
    hlo = jax.jit(lambda *a: moe_backends.grouped_ffn(*a, "decode", 0, Policy())).lower(
        *_problem(n, True)).compile().as_text()
    shapes = [[int(s) for s in m.group(1).split(",")] for m in re.finditer(r"= f32\[([\d,]+)\]\S* dot\(", hlo)]
    expert_dots = [s for s in shapes if s[-1] in (D, F)]  # an expert matrix's output (the K-combine's ends in 1)
    assert len(expert_dots) >= 3, shapes
    for shape in expert_dots:
        assert int(np.prod(shape[:-1])) <= moe_backends.DECODE_BLOCK, shape  # rows of one block
