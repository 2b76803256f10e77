"""Parity with transformers' DeepseekV3ForCausalLM: random HF models saved with save_pretrained, loaded with
hf.load, logits and every layer's hidden state compared (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv3_jax.interop import hf
from tests.hf_util import hf_config, make_hf_model

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
CONFIGS = {
    # no q_lora, plain rotary, no group limit
    "plain": {},
    # q_lora, YaRN with mscale == mscale_all_dim, 4 groups keep 2
    "yarn_groups": {"q_lora_rank": 20, "rope_parameters": {**YARN, "rope_theta": 10000.0},
                    "max_position_embeddings": 64, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
                    "num_experts_per_tok": 3},
    # YaRN with mscale != mscale_all_dim (cos/sin and softmax both rescaled), 3 groups keep 1, all layers MoE,
    # two shared experts, unnormalised gates
    "yarn_mscale": {"q_lora_rank": 14, "rope_parameters": {**YARN, "factor": 8.0, "mscale": 0.707,
                                                           "mscale_all_dim": 1.0, "rope_theta": 5000.0},
                    "max_position_embeddings": 128, "n_routed_experts": 9, "n_group": 3, "topk_group": 1,
                    "num_experts_per_tok": 2, "first_k_dense_replace": 0, "n_shared_experts": 2,
                    "norm_topk_prob": False, "routed_scaling_factor": 1.7, "num_hidden_layers": 2},
    # two dense layers first, wider rope
    "dense_first": {"q_lora_rank": 22, "qk_rope_head_dim": 10, "first_k_dense_replace": 2, "num_hidden_layers": 4,
                    "n_routed_experts": 4, "n_group": 2, "topk_group": 1},
}
SEEDS = (0, 1)
# every config with seed 0 in the quick subset; the second seed's weights add nothing new to map: `slow`
CASES = [pytest.param((name, seed), id=f"{name}-{seed}", marks=[pytest.mark.slow] if seed else [])
         for name in CONFIGS for seed in SEEDS]


@pytest.fixture(scope="module", params=CASES)
def pair(request, tmp_path_factory):
    """(HF model, our model loaded from its save_pretrained directory), built once per case."""
    name, seed = request.param
    ref = make_hf_model(hf_config(**CONFIGS[name]), seed)
    path = tmp_path_factory.mktemp(f"{name}-{seed}")
    ref.save_pretrained(path)
    return ref, hf.load(path, dtype="float32"), seed


def test_logits_and_hidden_states_match(pair):
    ref, ours, seed = pair
    ids = np.random.default_rng(seed).integers(0, ref.config.vocab_size, (2, 13))
    with torch.no_grad():
        expect = ref(torch.tensor(ids), output_hidden_states=True)
    out = ours(ids.astype(np.int32), return_hidden_states=True)
    assert out.logits.shape == (2, 13, ref.config.vocab_size)
    np.testing.assert_allclose(np.asarray(out.logits), expect.logits.numpy(), atol=1e-4, rtol=0)
    # transformers v5 records the embeddings, each layer's output, and the final NORMED state in place of the last
    # layer's output.
    hs = expect.hidden_states
    n = ref.config.num_hidden_layers
    assert len(hs) == n + 1 and out.hidden_states.shape[0] == n
    for layer in range(n - 1):
        np.testing.assert_allclose(np.asarray(out.hidden_states[layer]), hs[layer + 1].numpy(), atol=1e-4, rtol=0,
                                   err_msg=f"layer {layer}")
    np.testing.assert_allclose(np.asarray(out.hidden_states[-1]), np.asarray(out.hidden), atol=0, rtol=0)
    np.testing.assert_allclose(np.asarray(ours.norm(out.hidden)), hs[n].numpy(), atol=1e-4, rtol=0)
