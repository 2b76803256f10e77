"""Parameter counts of the presets from abstract shapes, checked by hand and against the published figures."""

import subprocess
import sys

import pytest

from dsv3_jax.model.params import count_params
from dsv3_jax.presets import load_config


def _by_hand(m):
    """Total, activated and MTP counts written out from the architecture (the DeepSeek-V3 report and config.json)."""
    d, h, v = m.hidden_size, m.num_attention_heads, m.vocab_size
    q = d * h * m.qk_head_dim if m.q_lora_rank is None else (
        d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * h * m.qk_head_dim)
    attn = (q + d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
            + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim) + h * m.v_head_dim * d)
    dense = attn + 2 * d + 3 * d * m.intermediate_size
    expert = 3 * d * m.moe_intermediate_size
    moe = attn + 2 * d + d * m.n_routed_experts + (m.n_routed_experts + m.n_shared_experts) * expert
    main = 2 * v * d + d + m.first_k_dense_replace * dense + m.num_moe_layers * moe
    activated = main - m.num_moe_layers * (m.n_routed_experts - m.num_experts_per_tok) * expert - v * d
    mtp = m.num_nextn_predict_layers * (moe + 2 * d * d + 3 * d)
    return main, activated, mtp


@pytest.mark.parametrize("preset", ["tiny", "small", "dsv3-16b", "deepseek-v3-671b"])
def test_counts_match_the_hand_formula(preset):
    m = load_config(preset).model
    c = count_params(m)
    assert (c["total"], c["activated"], c["mtp_total"]) == _by_hand(m)


def test_671b_counts_reproduce_the_report():
    c = count_params(load_config("deepseek-v3-671b").model)
    assert round(c["total"] / 1e9) == 671  # 671.03B main model
    assert round(c["activated"] / 1e9) == 37  # 36.63B without the embedding lookup (37.55B with it)
    assert c["mtp_total"] > 11e9  # one MoE block + eh_proj + norms; with its embedding/head copies ~13.5B


def test_16b_preset_is_16b_total_3b_active():
    c = count_params(load_config("dsv3-16b").model)
    assert round(c["total"] / 1e9) == 16
    assert 2.5e9 < c["activated"] < 3.5e9


def test_param_count_cli_and_error_exit():
    ok = subprocess.run([sys.executable, "-m", "dsv3_jax.tools.params", "deepseek-v3-671b"], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "671.03B total" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "dsv3_jax.tools.params", "tiny", "model.n_group=3"],
                         capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "n_group" in bad.stderr
