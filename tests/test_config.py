"""Config presets, overrides, HF config.json mapping and one-line validation errors."""

import dataclasses

import pytest

from dsv3_jax.config import ModelConfig, YarnConfig
from dsv3_jax.errors import ConfigError
from dsv3_jax.interop.hf_config import from_hf_config, to_hf_config
from dsv3_jax.presets import load_config


@pytest.mark.parametrize("preset", ["tiny", "small", "dsv3-16b", "deepseek-v3-671b"])
def test_presets_load_and_validate(preset):
    cfg = load_config(preset)
    assert cfg.model.hidden_size > 0


def test_671b_preset_is_the_released_architecture():
    m = load_config("deepseek-v3-671b").model
    assert (m.vocab_size, m.hidden_size, m.num_hidden_layers, m.first_k_dense_replace) == (129280, 7168, 61, 3)
    assert (m.n_routed_experts, m.n_shared_experts, m.num_experts_per_tok, m.n_group, m.topk_group) == (256, 1, 8, 8, 4)
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (1536, 512, 128, 64,
                                                                                                      128)
    assert m.rope_scaling == YarnConfig(40.0, 4096, 32.0, 1.0, 1.0, 1.0)
    # mscale = 0.1 * ln(40) + 1 ~ 1.369; the softmax scale grows by its square ~ 1.874
    assert m.softmax_scale() * (192**0.5) == pytest.approx((0.1 * 3.6888794541139363 + 1) ** 2, rel=1e-9)


def test_overrides_by_section_and_by_bare_name():
    cfg = load_config("tiny", ["model.hidden_size=64", "steps=7", "model.q_lora_rank=null"])
    assert cfg.model.hidden_size == 64 and cfg.train.steps == 7 and cfg.model.q_lora_rank is None


def _error(**kw) -> str:
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(ModelConfig(), **kw).validate()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("kw,field", [
    (dict(n_routed_experts=10, n_group=4), "n_group"),
    (dict(topk_group=3, n_group=2), "topk_group"),
    (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_attention_heads=-2), "num_attention_heads"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
])
def test_impossible_configs_name_the_field(kw, field):
    assert field in _error(**kw)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean model.hidden_size"):
        load_config("tiny", ["model.hiden_size=3"])
    with pytest.raises(ConfigError, match="did you mean n_routed_experts"):
        load_config("tiny", ["n_routed_expert=3"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("base: tiny\nmodel:\n  num_experts_per_token: 2\n")
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        load_config(str(p))


@pytest.mark.parametrize("override,field", [("impl.moe_impl=magic", "impl.moe_impl"),
                                            ("impl.precision=fp4", "impl.precision"),
                                            ("impl.remat=some", "impl.remat")])
def test_bad_impl_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config("tiny", [override])


def test_impl_fields_under_model_point_to_impl(tmp_path):
    with pytest.raises(ConfigError, match="set impl.remat"):
        load_config("tiny", ["model.remat=full"])
    p = tmp_path / "old.yaml"
    p.write_text("base: tiny\nmodel:\n  dtype: bfloat16\n")
    with pytest.raises(ConfigError, match="set impl.dtype"):
        load_config(str(p))


def test_saved_config_from_before_impl_is_upgraded():
    from dsv3_jax.config import Config, from_dict, upgrade

    old = dataclasses.asdict(load_config("tiny"))
    old["model"].update(remat="full", moe_block_size=4)
    del old["impl"]
    cfg = from_dict(Config, upgrade(old)).validate()
    assert cfg.impl.remat == "full" and cfg.impl.moe_block_size == 4 and cfg.model == load_config("tiny").model


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match="model.hidden_size expects int"):
        load_config("tiny", ["model.hidden_size=abc"])


def test_hf_config_round_trip():
    cfg = load_config("tiny").model
    back = from_hf_config(to_hf_config(cfg))
    for f in dataclasses.fields(ModelConfig):
        if f.name not in ("initializer_range",):
            assert getattr(back, f.name) == getattr(cfg, f.name), f.name


def test_hf_config_rejects_unsupported_variants():
    hf = to_hf_config(load_config("tiny").model)
    with pytest.raises(ConfigError, match="scoring_func"):
        from_hf_config({**hf, "scoring_func": "softmax"})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        from_hf_config({**hf, "num_key_value_heads": 1})
