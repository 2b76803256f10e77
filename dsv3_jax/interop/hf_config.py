"""The HF `config.json` <-> ModelConfig mapping (the fields DeepSeek-V3 checkpoints carry, the ones we ignore)."""

from __future__ import annotations

import dataclasses
import sys

from dsv3_jax.config import ModelConfig, YarnConfig
from dsv3_jax.errors import ConfigError

_HF_IGNORED = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "pad_token_id", "pretraining_tp", "attention_dropout", "hidden_act", "num_key_value_heads",
    "scoring_func", "topk_method", "tie_word_embeddings", "attention_bias", "rope_interleave", "aux_loss_alpha",
    "seq_aux", "quantization_config", "moe_layer_freq", "ep_size", "output_router_logits", "head_dim",
    "qk_head_dim", "num_local_experts", "num_mtp_layers", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
    "tokenizer_class", "rope_parameters", "rope_scaling", "_name_or_path", "initializer_range", "router_aux_loss_coef",
}


def from_hf_config(hf: dict) -> ModelConfig:
    """ModelConfig from an HF DeepSeek-V3 `config.json` dict; unsupported variants fail naming the field."""
    checks = {"hidden_act": "silu", "scoring_func": "sigmoid", "topk_method": "noaux_tc",
              "tie_word_embeddings": False, "attention_bias": False}
    for key, want in checks.items():
        if key in hf and hf[key] != want:
            raise ConfigError(f"config.json {key}={hf[key]!r} is not supported (DeepSeek-V3 uses {want!r})")
    heads = hf.get("num_attention_heads")
    if hf.get("num_key_value_heads") not in (None, heads):
        raise ConfigError(f"config.json num_key_value_heads={hf['num_key_value_heads']} must equal "
                          f"num_attention_heads={heads} (MLA)")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: v for k, v in hf.items() if k in names and k not in _HF_IGNORED and k != "rope_theta"}
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = kw["eos_token_id"][0]
    for k in ("bos_token_id", "eos_token_id"):
        if kw.get(k) is None:
            kw.pop(k, None)
    if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
        kw["num_nextn_predict_layers"] = hf["num_mtp_layers"]
    kw.setdefault("num_nextn_predict_layers", 0)
    if "initializer_range" in hf:
        kw["initializer_range"] = hf["initializer_range"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kw["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "yarn":
        fields = {f.name for f in dataclasses.fields(YarnConfig)}
        y = {k: v for k, v in rope.items() if k in fields and v is not None}
        for k in ("mscale", "mscale_all_dim"):
            y.setdefault(k, 0.0)
        if "original_max_position_embeddings" in hf:  # as transformers: a top-level value wins, then the rope dict's
            y["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        y.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 4096))
        kw["rope_scaling"] = YarnConfig(**y)
    elif rope_type not in ("default", None):
        raise ConfigError(f"config.json rope_scaling type {rope_type!r} is not supported (default or yarn)")
    unknown = set(hf) - names - _HF_IGNORED
    if unknown:
        print(f"note: ignoring config.json keys {sorted(unknown)}", file=sys.stderr)
    return ModelConfig(**kw).validate()


def to_hf_config(cfg: ModelConfig) -> dict:
    """The HF `config.json` dict for this architecture (rope dims stored interleaved, as released)."""
    d = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_attention_heads,
        "n_shared_experts": cfg.n_shared_experts, "n_routed_experts": cfg.n_routed_experts,
        "routed_scaling_factor": cfg.routed_scaling_factor, "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "num_experts_per_tok": cfg.num_experts_per_tok, "first_k_dense_replace": cfg.first_k_dense_replace,
        "norm_topk_prob": cfg.norm_topk_prob, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": False, "rope_theta": cfg.rope_theta, "rope_interleave": True,
        "attention_bias": False, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers, "torch_dtype": "float32",
    }
    if cfg.rope_scaling is not None:
        y = dataclasses.asdict(cfg.rope_scaling)
        y = {k: v for k, v in y.items() if v is not None}
        d["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **y}
    return d
