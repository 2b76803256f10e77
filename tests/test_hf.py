"""hf.load / hf.save: the MTP layer, FP8 block-scaled weights, the fused expert layout, errors, and export to
transformers."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding

from dsv3_jax import errors
from dsv3_jax.interop import fp8_blocks as precision
from dsv3_jax.interop import hf
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.presets import load_config
from tests import xla_env
from tests.hf_util import hf_config, make_hf_model, read_dir, write_dir

MTP_CFG = {
    "q_lora_rank": 20, "num_hidden_layers": 2, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
    "max_position_embeddings": 64,
    "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                        "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 1.0},
}


def leaves(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_same_model(a, b):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for p in la:
        np.testing.assert_array_equal(la[p], lb[p], err_msg=str(p))


def read_sharded(path) -> dict:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(path / f)))
    assert out.keys() == index["weight_map"].keys()
    return out


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A transformers save_pretrained directory (no MTP) and its config/tensors."""
    path = tmp_path_factory.mktemp("base")
    make_hf_model(hf_config(**MTP_CFG), seed=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mtp_dir(base_dir, tmp_path_factory):
    """base_dir plus a hand-made MTP layer (index num_hidden_layers) with random values."""
    config, tensors = read_dir(base_dir)
    n, d = config["num_hidden_layers"], config["hidden_size"]
    rng = np.random.default_rng(7)
    mtp = {}
    for key, a in tensors.items():
        if key.startswith(f"model.layers.{n - 1}."):  # the last main layer is MoE: copy its key set and shapes
            new = key.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")
            mtp[new] = random_like(a, rng, bias=key.endswith("bias"))
    for name in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"model.layers.{n}.{name}.weight"] = random_like(np.zeros(d, np.float32), rng)
    mtp[f"model.layers.{n}.eh_proj.weight"] = random_like(np.zeros((d, 2 * d), np.float32), rng)
    mtp[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    mtp[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"]
    config["num_nextn_predict_layers"] = 1
    return write_dir(tmp_path_factory.mktemp("mtp"), config, {**tensors, **mtp})


def random_like(a, rng, bias=False):
    if bias:
        return (0.05 * rng.standard_normal(a.shape)).astype(np.float32)
    if a.ndim == 1:
        return (1 + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)
    return (rng.standard_normal(a.shape) * a.shape[-1] ** -0.5).astype(np.float32)


def test_base_dir_loads_with_mtp_off(base_dir, capsys):
    model = hf.load(base_dir)
    assert model.cfg.num_nextn_predict_layers == 0 and len(model.mtp) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MTP off" in err[0]
    assert model(np.zeros((1, 4), np.int32)).mtp_logits is None


def test_mtp_round_trip_keeps_every_tensor(mtp_dir, tmp_path):
    _, original = read_dir(mtp_dir)
    model = hf.load(mtp_dir)
    assert model.cfg.num_nextn_predict_layers == 1
    hf.save(model, tmp_path, shard_size_mb=0.05)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    saved = read_sharded(tmp_path)
    assert saved.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(saved[key], original[key], err_msg=key)
    assert_same_model(model, hf.load(tmp_path))


def test_mtp_copy_that_differs_warns_in_one_line(mtp_dir, tmp_path, capsys):
    def edit(config, tensors):
        tensors["model.layers.2.embed_tokens.weight"] = tensors["model.layers.2.embed_tokens.weight"] + 1

    model = hf.load(broken_copy(mtp_dir, tmp_path / "d", edit))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers.2.embed_tokens.weight differs" in err[0]
    assert_same_model(model, hf.load(mtp_dir))


def test_mtp_logits_match_hand_computation(mtp_dir):
    """Depth-1 MTP logits: eh_proj([enorm(emb(t+1)) ; hnorm(h_t)]) with h the PRE-norm main hidden, transformers'
    own decoder layer on the layer-N weights, then shared_head.norm and the shared head."""
    config, t = read_dir(mtp_dir)
    t = {k: torch.from_numpy(v) for k, v in t.items()}
    n, e = config["num_hidden_layers"], config["n_routed_experts"]
    model = hf.load(mtp_dir)
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], (2, 11)).astype(np.int32)
    out = model(ids)

    hf_cfg = DeepseekV3Config.from_pretrained(mtp_dir, attn_implementation="eager")
    layer = DeepseekV3DecoderLayer(hf_cfg, layer_idx=n).eval()
    prefix = f"model.layers.{n}."
    sd = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix) and ".experts." not in k
          and not k[len(prefix):].startswith(("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens"))}
    expert = [[t[f"{prefix}mlp.experts.{i}.{w}_proj.weight"] for i in range(e)] for w in ("gate", "up", "down")]
    sd["mlp.experts.gate_up_proj"] = torch.cat([torch.stack(expert[0]), torch.stack(expert[1])], dim=1)
    sd["mlp.experts.down_proj"] = torch.stack(expert[2])
    layer.load_state_dict(sd, strict=True)

    s = ids.shape[1] - 1
    h = torch.from_numpy(np.array(out.hidden))[:, :s]
    emb = t["model.embed_tokens.weight"][torch.from_numpy(ids[:, 1:]).long()]
    x = torch.cat([rms(emb, t[prefix + "enorm.weight"]), rms(h, t[prefix + "hnorm.weight"])], -1)
    x = x @ t[prefix + "eh_proj.weight"].T
    pos = torch.arange(s)[None]
    cos_sin = DeepseekV3RotaryEmbedding(hf_cfg)(x, pos)
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        y = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    expect = rms(y, t[prefix + "shared_head.norm.weight"]) @ t["lm_head.weight"].T
    np.testing.assert_allclose(np.asarray(out.mtp_logits[0, :, :s]), expect.numpy(), atol=1e-4, rtol=0)


FP8_CFG = {
    "vocab_size": 150, "hidden_size": 144, "intermediate_size": 200, "moe_intermediate_size": 40,
    "num_hidden_layers": 2, "num_attention_heads": 2, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "v_head_dim": 16, "q_lora_rank": 136, "kv_lora_rank": 24, "n_routed_experts": 4, "n_group": 2, "topk_group": 1,
}


def test_fp8_weights_dequantise_within_e4m3_rounding(tmp_path):
    make_hf_model(hf_config(**FP8_CFG), seed=5).save_pretrained(tmp_path / "f32")
    config, tensors = read_dir(tmp_path / "f32")
    quantised, scales = dict(tensors), {}
    for key, w in tensors.items():
        if key.endswith("_proj.weight") and w.ndim == 2:
            q, s = precision.quantize_blocks(w)
            quantised[key], quantised[key + "_scale_inv"], scales[key] = q, s, s
    assert any(s.shape[0] > 1 and s.shape[1] > 1 for s in scales.values())  # several blocks, cropped edges
    model = hf.load(write_dir(tmp_path / "fp8", config, quantised))
    hf.save(model, tmp_path / "back")
    back = read_sharded(tmp_path / "back")
    assert back.keys() == tensors.keys()
    worst = 0.0
    for key, w in tensors.items():
        if key not in scales:
            np.testing.assert_array_equal(back[key], w, err_msg=key)
            continue
        s = np.repeat(np.repeat(scales[key], 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
        # E4M3 has 3 mantissa bits: relative rounding error <= 2^-4, subnormal spacing 2^-9 (half is 2^-10) x scale
        bound = np.maximum(2.0**-4 * np.abs(w), 2.0**-10 * s) * (1 + 1e-5)
        err = np.abs(back[key] - w)
        assert np.all(err <= bound), key
        worst = max(worst, float((err / bound).max()))
    assert worst > 0.1  # the weights really went through FP8


def test_fp8_without_scale_is_an_error(tmp_path):
    make_hf_model(hf_config(**FP8_CFG), seed=5).save_pretrained(tmp_path / "f32")
    config, tensors = read_dir(tmp_path / "f32")
    key = "model.layers.0.self_attn.o_proj.weight"
    tensors[key] = precision.quantize_blocks(tensors[key])[0]
    with pytest.raises(errors.HFError, match=f"{key} has no {key}_scale_inv") as e:
        hf.load(write_dir(tmp_path / "fp8", config, tensors))
    assert "\n" not in str(e.value)


def test_fused_expert_layout_loads_the_same(tmp_path):
    """transformers v5's in-memory layout (gate_up_proj [E, 2F, D], down_proj [E, D, F]) equals per-expert keys."""
    ref = make_hf_model(hf_config(**MTP_CFG), seed=11)
    ref.save_pretrained(tmp_path / "per_expert")
    config, per_expert = read_dir(tmp_path / "per_expert")
    fused = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused and fused.keys() != per_expert.keys()
    assert_same_model(hf.load(write_dir(tmp_path / "fused", config, fused)), hf.load(tmp_path / "per_expert"))


# ----------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the file or key.


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    config, tensors = read_dir(dst)
    edit(config, tensors)
    return write_dir(dst, config, tensors)


def expect_error(path, match):
    with pytest.raises(errors.HFError, match=match) as e:
        hf.load(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_key(base_dir, tmp_path):
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    path = broken_copy(base_dir, tmp_path / "d", lambda c, t: t.pop(key))
    expect_error(path, f"missing {key}")


def test_unexpected_key(base_dir, tmp_path):
    key = "model.layers.0.mlp.extra.weight"
    path = broken_copy(base_dir, tmp_path / "d", lambda c, t: t.update({key: np.zeros(3, np.float32)}))
    expect_error(path, f"unexpected {key}")


def test_scale_beside_a_non_fp8_weight_is_unexpected(base_dir, tmp_path):
    key = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    path = broken_copy(base_dir, tmp_path / "d", lambda c, t: t.update({key: np.ones((1, 1), np.float32)}))
    expect_error(path, f"unexpected {key}")


def test_partial_mtp_layer(mtp_dir, tmp_path):
    path = broken_copy(mtp_dir, tmp_path / "d", lambda c, t: t.pop("model.layers.2.eh_proj.weight"))
    expect_error(path, r"MTP layer 2 is incomplete; missing model\.layers\.2\.eh_proj\.weight")


def test_index_listing_absent_tensor(base_dir, tmp_path):
    model = hf.load(base_dir)
    hf.save(model, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = "model-00001-of-00001.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(tmp_path, "lists tensors its shards lack: model.layers.0.ghost.weight")


def test_wrong_shape(base_dir, tmp_path):
    key = "model.layers.0.self_attn.o_proj.weight"
    path = broken_copy(base_dir, tmp_path / "d", lambda c, t: t.update({key: t[key][:, :-1]}))
    expect_error(path, f"{key} has shape")


def test_missing_directory_and_config(base_dir, tmp_path):
    expect_error(tmp_path / "nope", "is not a directory")
    shutil.copytree(base_dir, tmp_path / "d")
    (tmp_path / "d" / "config.json").unlink()
    expect_error(tmp_path / "d", "config.json not found")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_shard(base_dir, tmp_path, damage):
    shutil.copytree(base_dir, tmp_path / "d")
    shard = tmp_path / "d" / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(b"\x00\x01not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    expect_error(tmp_path / "d", "model.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Export.


def random_model(seed: int) -> Transformer:
    """The tiny preset with every weight random at a scale that gives O(1) logits, norms != 1, bias != 0
    (filled into the abstract model: eager init is slow on CPU)."""
    cfg = load_config("tiny").model
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        noise = rng.standard_normal(var.shape).astype(np.float32)
        if path[-1] == "bias":
            var.set_value(jnp.asarray(0.05 * noise))
        elif "norm" in path[-2]:
            var.set_value(jnp.asarray(1 + 0.1 * noise))
        else:
            var.set_value(jnp.asarray(0.15 * noise))
    return model


def assert_logits_match(ours, ref) -> None:
    """Our model's logits equal transformers' `ref` on random ids (float32, 1e-4), and are not near-constant."""
    ids = np.random.default_rng(1).integers(0, ours.cfg.vocab_size, (2, 12)).astype(np.int32)
    logits = np.asarray(ours(ids).logits)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids).long()).logits.numpy()
    assert logits.std() > 0.3
    np.testing.assert_allclose(logits, theirs, atol=1e-4, rtol=0)


@pytest.mark.slow  # transformers end to end: our export, its from_pretrained, both forwards
def test_export_loads_in_transformers(tmp_path):
    model = random_model(0)
    hf.save(model, tmp_path)
    ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert_logits_match(model, ref)
    assert_same_model(model, hf.load(tmp_path))


def test_bfloat16_export_round_trip(mtp_dir, tmp_path):
    """bfloat16 files (router and its bias stay float32) load back to the bfloat16 rounding of the weights."""
    model = hf.load(mtp_dir)
    hf.save(model, tmp_path, dtype="bfloat16")
    saved = read_sharded(tmp_path)
    assert saved["model.layers.1.mlp.gate.weight"].dtype == np.float32
    assert saved["model.layers.1.self_attn.o_proj.weight"].dtype == jnp.bfloat16
    back = leaves(hf.load(tmp_path, dtype="bfloat16"))
    for path, value in leaves(model).items():
        want = value if path[-1] in ("router", "bias") else value.astype(jnp.bfloat16)
        np.testing.assert_array_equal(back[path], want, err_msg=str(path))


# ----------------------------------------------------------------------------------------------------------------
# Sliced loading onto a mesh: each process reads only what its devices hold.


def test_read_slice_matches_whole_dequantisation_with_cropped_edge_blocks(tmp_path):
    import contextlib

    from dsv3_jax.interop.hf_sliced import read_slice

    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 270)).astype(np.float32)
    q, s = precision.quantize_blocks(w)
    plain = rng.standard_normal((5, 7, 9)).astype(np.float32)
    path = write_dir(tmp_path / "ck", {}, {"w": q, "w_scale_inv": s, "p": plain}) / "model.safetensors"
    whole = precision.dequantize_blocks(q, s)
    with contextlib.ExitStack() as stack:
        reader = hf._Reader([path], stack)
        for (r0, r1), (c0, c1) in [((0, 300), (0, 270)), ((100, 260), (5, 270)), ((127, 129), (255, 257)),
                                   ((256, 300), (0, 1)), ((3, 3), (0, 10))]:
            before = reader.bytes_read
            got = read_slice(reader, "w", ((r0, r1), (c0, c1)))
            np.testing.assert_array_equal(got, whole[r0:r1, c0:c1])
            n_scales = (-(-r1 // 128) - r0 // 128) * (-(-c1 // 128) - c0 // 128) if r1 > r0 else 0
            assert reader.bytes_read - before == (r1 - r0) * (c1 - c0) + 4 * n_scales  # 1-byte FP8 + f32 scales
        np.testing.assert_array_equal(read_slice(reader, "p", ((1, 4), (0, 7), (2, 5))), plain[1:4, :, 2:5])


_SHARDED_LOAD = """
import json, sys
import numpy as np
from dsv3_jax.parallel import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
from flax import nnx
from dsv3_jax.interop import hf
from dsv3_jax import errors
from dsv3_jax.config import MeshConfig
from dsv3_jax.parallel.sharding import make_mesh

mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))  # fsdp (the embed dim) spans the two processes
sharded_stats, full_stats = {}, {}
model = hf.load(sys.argv[3], mesh=mesh, stats=sharded_stats)
ref = hf.load(sys.argv[3], stats=full_stats)
checked = 0
for (path, v), (_, r) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(ref))):
    a, want = v.get_value(), np.asarray(r.get_value())
    assert a.shape == want.shape and a.sharding.mesh.shape == mesh.shape, path
    for shard in a.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=str(path))
        checked += 1
print(json.dumps({"sharded": sharded_stats["bytes_read"], "full": full_stats["bytes_read"], "checked": checked,
                  "devices": jax.local_device_count()}))
"""


@pytest.mark.slow
def test_sharded_load_in_two_processes_equals_single_process_load(tmp_path):
    """FP8 checkpoint onto a (fsdp 2, expert 2, tensor 2) mesh over 2 processes x 4 CPU devices: every addressable
    shard equals the unsharded load, and each process reads well under the whole checkpoint."""
    import socket
    import subprocess
    import sys

    make_hf_model(hf_config(**FP8_CFG), seed=5).save_pretrained(tmp_path / "f32")
    config, tensors = read_dir(tmp_path / "f32")
    for key, w in list(tensors.items()):
        if key.endswith("_proj.weight") and w.ndim == 2:
            tensors[key], tensors[key + "_scale_inv"] = precision.quantize_blocks(w)
    ckpt = write_dir(tmp_path / "fp8", config, tensors)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = xla_env.env(4, PYTHONPATH=str(pathlib.Path(__file__).resolve().parent.parent))
    procs = [subprocess.Popen([sys.executable, "-c", _SHARDED_LOAD, f"localhost:{port}", str(i), str(ckpt)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    print(results)
    for r in results:
        assert r["devices"] == 4 and r["checked"] > 0
        assert r["sharded"] < 0.6 * r["full"]  # about half: the embed dim (and what it touches) is split


# ----------------------------------------------------------------------------------------------------------------
# FP8 export.

FP8_QUANTISED = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                 "down_proj")


def random_model_of(overrides: list[str], seed: int) -> Transformer:
    """`random_model` with tiny-preset overrides."""
    cfg = load_config("tiny", overrides).model
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        noise = rng.standard_normal(var.shape).astype(np.float32)
        scale = 0.05 if path[-1] == "bias" else 0.15
        var.set_value(jnp.asarray(1 + 0.1 * noise if "norm" in path[-2] else scale * noise))
    return model


def read_any(path) -> dict:
    """Every tensor of an HF directory as numpy, FP8 ones as ml_dtypes float8_e4m3fn (numpy safetensors has none)."""
    import ml_dtypes
    from safetensors.torch import load_file as load_torch

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        for key, t in load_torch(str(f)).items():
            out[key] = (t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn) if t.dtype == torch.float8_e4m3fn
                        else t.numpy())
    return out


def test_fp8_export_round_trip_equals_the_fp8_rounded_weights(tmp_path):
    """Odd dims (several 128x128 blocks, partial edge blocks): the FP8 export holds E4M3 weights and
    [ceil(out/128), ceil(in/128)] scales for exactly the released set of tensors; our load of it is the block-wise
    FP8 rounding of the float32 export."""
    model = random_model_of(["model.hidden_size=136", "model.intermediate_size=260", "model.moe_intermediate_size=130",
                             "model.q_lora_rank=130"], seed=4)
    hf.save(model, tmp_path / "f32")
    hf.save(model, tmp_path / "fp8", fp8=True)
    plain, f8 = read_any(tmp_path / "f32"), read_any(tmp_path / "fp8")
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["weight_block_size"] == [
        128, 128]
    quantised = {k for k in plain if k.rsplit(".", 2)[-2] in FP8_QUANTISED}
    assert {k for k in f8 if k.endswith("_scale_inv")} == {k + "_scale_inv" for k in quantised}
    assert any("layers.3." in k for k in quantised) and not any("eh_proj" in k for k in quantised)  # MTP block too
    hf.save(hf.load(tmp_path / "fp8"), tmp_path / "back")
    back = read_any(tmp_path / "back")
    assert back.keys() == plain.keys()
    for key, w in plain.items():
        if key not in quantised:
            assert f8[key].dtype == w.dtype
            np.testing.assert_array_equal(back[key], w, err_msg=key)
            continue
        scale = f8[key + "_scale_inv"]
        assert f8[key].dtype == jnp.float8_e4m3fn and f8[key].shape == w.shape
        assert scale.dtype == np.float32 and scale.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128)), key
        np.testing.assert_array_equal(back[key], precision.dequantize_blocks(*precision.quantize_blocks(w)),
                                      err_msg=key)
        s = np.repeat(np.repeat(scale, 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
        bound = np.maximum(2.0**-4 * np.abs(w), 2.0**-10 * s) * (1 + 1e-5)
        assert np.all(np.abs(back[key] - w) <= bound), key
    assert not np.array_equal(back["model.layers.1.self_attn.o_proj.weight"],
                              plain["model.layers.1.self_attn.o_proj.weight"])


@pytest.mark.slow  # transformers end to end: our export, its from_pretrained, both forwards
def test_fp8_export_loads_in_transformers(tmp_path):
    """transformers (which dequantises on CPU) loads our FP8 export and computes our logits. Its CPU dequantiser
    needs every dim a multiple of 128 (no partial edge blocks), hence these dims."""
    model = random_model_of(["model.hidden_size=128", "model.q_lora_rank=128", "model.kv_lora_rank=64",
                             "model.qk_rope_head_dim=64", "model.qk_nope_head_dim=64", "model.v_head_dim=64",
                             "model.num_attention_heads=2", "model.intermediate_size=256",
                             "model.moe_intermediate_size=128"], seed=6)
    hf.save(model, tmp_path, fp8=True)
    ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert ref.model.layers[1].self_attn.o_proj.weight.dtype == torch.float32
    ours = hf.load(tmp_path)
    assert_logits_match(ours, ref)
