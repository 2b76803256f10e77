"""Model FLOPs per trained token (the MFU numerator) against a count written out from the architecture."""

import pytest
from test_params import _by_hand

from dsv3_jax.presets import load_config
from dsv3_jax.train import metrics


@pytest.mark.parametrize("preset, seq_len", [("tiny", 64), ("small", 128), ("deepseek-v3-671b", 4096)])
def test_flops_per_token_is_6n_plus_attention(preset, seq_len):
    m = load_config(preset).model
    _, activated, mtp_total = _by_hand(m)
    d_mtp = m.num_nextn_predict_layers
    unused_experts = (m.n_routed_experts - m.num_experts_per_tok) * 3 * m.hidden_size * m.moe_intermediate_size
    mtp_activated = mtp_total - d_mtp * unused_experts + d_mtp * m.hidden_size * m.vocab_size  # + the shared head
    # QK^T and AV: 2 * T * H * (qk + v) multiply-adds per token and layer, x3 for forward and backward
    attention = 6 * seq_len * m.num_attention_heads * (m.qk_head_dim + m.v_head_dim) * (m.num_hidden_layers + d_mtp)
    assert metrics.flops_per_token(m, seq_len) == pytest.approx(6 * (activated + mtp_activated) + attention, rel=1e-12)
