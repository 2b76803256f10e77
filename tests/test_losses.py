"""Losses on hand-made packed batches: masks at document boundaries, float32 CE, MTP weighting, balance sum."""

import math

import chex
import jax.numpy as jnp
import numpy as np

from dsv3_jax.train import losses

# One row of T+1 = 9 columns: document 1 (3 tokens), document 2 (4 tokens), then 2 padding columns.
SEG = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0]], np.int32)
TOKENS = np.array([[5, 6, 7, 8, 9, 10, 11, 0, 0]], np.int32)


def _nll(logits_v, target):
    logits_v = logits_v.astype(np.float64)
    return -(logits_v[target] - logits_v.max() - math.log(np.exp(logits_v - logits_v.max()).sum()))


def test_next_token_mask_stops_at_document_boundaries_and_padding():
    mask = np.asarray(losses.same_document_mask(jnp.asarray(SEG), 0))
    # column t predicts t+1: 0->1, 1->2 valid; 2->3 crosses into doc 2; 3..5 valid; 6->7 is padding
    np.testing.assert_array_equal(mask, [[1, 1, 0, 1, 1, 1, 0, 0]])


def test_mtp_mask_requires_every_token_up_to_the_target_in_one_document():
    depth1 = np.asarray(losses.same_document_mask(jnp.asarray(SEG), 1))
    np.testing.assert_array_equal(depth1, [[1, 0, 0, 1, 1, 0, 0]])
    depth2 = np.asarray(losses.same_document_mask(jnp.asarray(SEG), 2))
    np.testing.assert_array_equal(depth2, [[0, 0, 0, 1, 0, 0]])
    # a segment id reappearing after another document must not join them
    seg = np.array([[1, 1, 2, 1, 1]], np.int32)
    np.testing.assert_array_equal(np.asarray(losses.same_document_mask(jnp.asarray(seg), 1)), [[0, 0, 0]])


def test_cross_entropy_matches_a_float64_reference_on_valid_positions():
    rng = np.random.default_rng(0)
    v = 16
    logits = rng.normal(size=(1, 8, v)).astype(np.float32) * 3
    s, c = losses.next_token_loss(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), jnp.asarray(TOKENS),
                                  jnp.asarray(SEG))
    ref_logits = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    valid = [0, 1, 3, 4, 5]
    expect = sum(_nll(ref_logits[0, t], TOKENS[0, t + 1]) for t in valid)
    assert float(c) == len(valid)
    np.testing.assert_allclose(float(s), expect, rtol=1e-6)


def test_cross_entropy_is_float32_for_bfloat16_logits():
    logits = jnp.zeros((1, 8, 16), jnp.bfloat16)
    s, _ = losses.next_token_loss(logits, jnp.asarray(TOKENS), jnp.asarray(SEG))
    assert s.dtype == jnp.float32
    np.testing.assert_allclose(float(s), 5 * math.log(16), rtol=1e-6)


def test_mtp_losses_pick_targets_k_plus_one_ahead():
    rng = np.random.default_rng(1)
    v, d = 16, 2
    mtp_logits = rng.normal(size=(d, 1, 8, v)).astype(np.float32)
    sums, counts = losses.mtp_losses(jnp.asarray(mtp_logits), jnp.asarray(TOKENS), jnp.asarray(SEG))
    exp1 = sum(_nll(mtp_logits[0, 0, t], TOKENS[0, t + 2]) for t in (0, 3, 4))
    exp2 = _nll(mtp_logits[1, 0, 3], TOKENS[0, 6])
    np.testing.assert_array_equal(np.asarray(counts), [3, 1])
    np.testing.assert_allclose(np.asarray(sums), [exp1, exp2], rtol=1e-6)
    ce = np.asarray(sums) / np.asarray(counts)
    np.testing.assert_allclose(float(losses.mtp_loss(jnp.asarray(ce), 0.3)), 0.3 / 2 * ce.sum(), rtol=1e-6)


def test_balance_loss_sums_moe_and_mtp_layers_times_alpha():
    aux = {"balance_loss": jnp.array([1.0, 2.0, 3.0]), "mtp_balance_loss": jnp.array([4.0])}
    np.testing.assert_allclose(float(losses.balance_loss(aux, 1e-2)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(losses.balance_loss({"balance_loss": jnp.array([2.0])}, 0.5)), 1.0)


class MaskAndBalanceVariants(chex.TestCase):
    """The MTP target mask and the balance loss by hand, the same with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_mtp_target_mask_by_hand(self):
        seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 0]])  # T + 1 = 9 columns: inputs 0..7
        mask = self.variant(losses.mtp_target_mask, static_argnums=1)(seg, 2)
        chex.assert_shape(mask, (2, 1, 8))
        np.testing.assert_array_equal(mask[0, 0], [1, 1, 0, 0, 1, 1, 0, 0])  # t, t+1, t+2 in one document
        np.testing.assert_array_equal(mask[1, 0], [1, 0, 0, 0, 1, 0, 0, 0])  # t .. t+3

    @chex.variants(with_jit=True, without_jit=True)
    def test_balance_loss_sums_main_and_mtp_layers(self):
        aux = {"balance_loss": jnp.array([0.5, 0.25]), "mtp_balance_loss": jnp.array([2.0])}
        got = self.variant(losses.balance_loss)(aux, 0.1)
        chex.assert_trees_all_close(got, jnp.float32(0.275))
