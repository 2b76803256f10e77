"""Helpers for the HF tests: tiny random transformers DeepSeek-V3 models and raw safetensors directories."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

BASE = {
    "vocab_size": 97, "hidden_size": 36, "intermediate_size": 44, "moe_intermediate_size": 20, "num_hidden_layers": 3,
    "first_k_dense_replace": 1, "num_attention_heads": 3, "num_key_value_heads": 3, "n_routed_experts": 6,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "q_lora_rank": None,
    "kv_lora_rank": 18, "qk_nope_head_dim": 10, "qk_rope_head_dim": 6, "v_head_dim": 14,
    "max_position_embeddings": 256, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}


def hf_config(**overrides) -> DeepseekV3Config:
    kw = {**BASE, **overrides}
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    return DeepseekV3Config(**kw, attn_implementation="eager")


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random: matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2), routing bias ~ N(0, 0.05^2)
    (HF's ones / zeros would hide mapping bugs)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim == 1:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def make_hf_model(cfg: DeepseekV3Config, seed: int) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    return randomize(DeepseekV3ForCausalLM(cfg), seed).eval()


def read_dir(path) -> tuple[dict, dict]:
    """(config.json dict, {key: array}) of a directory with a single model.safetensors."""
    path = pathlib.Path(path)
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


def write_dir(path, config: dict, tensors: dict) -> pathlib.Path:
    """A single-file HF-format directory."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path
