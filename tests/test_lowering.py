"""The GPU and TPU programs, lowered on this CPU: the train step and the decode loop cross-lowered for `cuda` and `tpu`
with the backends `auto` picks there (`kernels.platform.lowering_for`), asserting the custom calls and dtypes in
the lowered StableHLO: cuDNN flash attention (forward and backward), FP8 dots with float32 accumulation, the
ragged all-to-all expert exchange, `ragged_dot` and the TPU splash kernel.

One subprocess on 8 fake CPU devices lowers every case (the device count is fixed when JAX starts) and prints one
JSON line per case: the custom-call targets with the element types of their first operand, the dot_general operand
types, and the loop ops. Single-device programs go through `jax.export.export(..., platforms=[p])` (so they also
pass its serialisation checks); the expert-parallel step goes through `jit(...).trace(...).lower(
lowering_platforms=(p,))`, because jax.export refuses cuDNN attention under a mesh: it is wrapped in
`custom_partitioning`, whose Python partitioning callback jax.export cannot serialise. Its cuDNN call therefore
appears as a `CustomSPMDPartitioning` call (XLA's partitioner emits the cuDNN target at compile time).

While tracing, jax asks the local device for its cuDNN version and compute capability before it emits a cuDNN
call; the script answers as an H100 with cuDNN 9.10 would (`_as_hopper_with_cudnn`).
"""

import json
import subprocess
import sys
import textwrap

import pytest

from tests import xla_env

SCRIPT = textwrap.dedent(r"""
    import collections, contextlib, functools, json, re, sys, traceback
    from unittest import mock
    import jax, jax.numpy as jnp
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
    from dsv3_jax.infer import sampling
    from dsv3_jax.kernels.platform import lowering_for
    from dsv3_jax.model.transformer import create
    from dsv3_jax.parallel.sharding import make_mesh, rules_for, use_rules
    from dsv3_jax.presets import load_config
    from dsv3_jax.train import state as train_state
    from dsv3_jax.train.step import BATCH_KEYS, jit_train_step

    # tiny, with every linear contraction >= 32 (FP8) and a q/k head dim that is a multiple of 8 (cuDNN): 32 + 8
    SHAPE = ["model.hidden_size=64", "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=32",
             "model.qk_rope_head_dim=8",
             "model.v_head_dim=16", "model.num_attention_heads=2", "model.intermediate_size=64",
             "model.moe_intermediate_size=32", "data.seq_len=64", "train.global_batch_size=8"]
    UNCHECKED = [jax.export.DisabledSafetyCheck.custom_call(n) for n in (
        "ragged_all_to_all", "tpu_custom_call", "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward",
        "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")]

    @contextlib.contextmanager
    def _as_hopper_with_cudnn():
        with mock.patch.object(cudnn_fa, "check_cudnn_version", lambda: 91000), \
             mock.patch.object(cudnn_fa, "check_compute_capability", lambda capability: True), \
             mock.patch.object(cudnn_fa, "is_cuda_compute_capability_equal", lambda capability: False):
            yield

    ELEMENT = r"tensor<(?:[\d?]+x)*([a-zA-Z]\w*)>"  # the element type of a tensor type

    def summary(text):
        calls = collections.defaultdict(collections.Counter)  # target -> element type of its first operand -> count
        for target, operand in re.findall(r"stablehlo\.custom_call @([\w$.]+)\(.* : \(" + ELEMENT, text):
            calls[target][operand] += 1
        dots = collections.Counter(" ".join(m) for m in re.findall(
            r"stablehlo\.dot_general .* : \(" + ELEMENT + ", " + ELEMENT + r"\) -> " + ELEMENT, text))
        return {"calls": {k: dict(v) for k, v in calls.items()}, "dots": dict(dots),
                "ragged_dot": text.count("ragged_dot"), "while": text.count("stablehlo.while")}

    def train_case(plat, mesh_kv, overrides, export):
        cfg = load_config("tiny", SHAPE + [f"mesh.{kv}" for kv in mesh_kv.split(",")] + overrides)
        with use_rules(rules_for(cfg.mesh)):
            mesh = make_mesh(cfg.mesh, jax.devices()[:cfg.mesh.data * cfg.mesh.expert])
            abstract, graphdef, tx = train_state.abstract_state(cfg, mesh)
            step = jit_train_step(cfg, graphdef, tx, mesh, abstract, donate=False)
            b, t = cfg.train.global_batch_size, cfg.data.seq_len + 1
            batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32) for k in BATCH_KEYS}
            with jax.set_mesh(mesh):
                if export:
                    return jax.export.export(step, platforms=[plat], disabled_checks=UNCHECKED)(
                        abstract, batch).mlir_module()
                return step.trace(abstract, batch).lower(lowering_platforms=(plat,)).as_text()

    def decode_case(plat):
        # the two programs `sampling.generate` compiles: prefill of a (2, 16) prompt, then the decode while-loop
        cfg = load_config("tiny", SHAPE + ["impl.precision=bf16"])
        model = create(cfg.model, seed=0, impl=cfg.impl)
        graphdef, state = sampling.Programs().decode_state(model)
        rule, slots, budget = sampling.SamplingRule(), 64, 8
        args = (state, jnp.ones((2, 16), jnp.int32), jnp.full((2,), 16, jnp.int32), jnp.full((8,), -1, jnp.int32),
                jax.random.key(0))
        prefill = jax.jit(functools.partial(sampling._prefill_fn, graphdef.value, rule, False, slots, budget))
        carry = jax.eval_shape(prefill, *args)
        chunk = jax.jit(functools.partial(sampling._chunk_fn, graphdef.value, rule, False))
        texts = [jax.export.export(f, platforms=[plat], disabled_checks=UNCHECKED)(*a).mlir_module()
                 for f, a in ((prefill, args), (chunk, (state, carry, args[3], jnp.int32(budget))))]
        return {"prefill": summary(texts[0]), "loop": summary(texts[1])}

    CASES = {
        "cuda-bf16": lambda: summary(train_case("cuda", "data=1", ["impl.precision=bf16"], True)),
        "cuda-fp8": lambda: summary(train_case("cuda", "data=1", ["impl.precision=fp8"], True)),
        "cuda-bf16-ep": lambda: summary(train_case("cuda", "data=2,expert=4", ["impl.precision=bf16"], False)),
        "tpu-bf16": lambda: summary(train_case("tpu", "data=1", ["impl.precision=bf16"], True)),
        "tpu-bf16-ep-blocked-attention": lambda: summary(
            train_case("tpu", "data=2,expert=4", ["impl.precision=bf16", "impl.attention=blocked"], False)),
        "tpu-bf16-ep": lambda: summary(train_case("tpu", "data=2,expert=4", ["impl.precision=bf16"], False)),
        "decode-cuda": lambda: decode_case("cuda"),
        "decode-tpu": lambda: decode_case("tpu"),
    }
    for name in sys.argv[1].split(","):
        plat = "tpu" if "tpu" in name else "cuda"
        try:
            with _as_hopper_with_cudnn(), lowering_for(plat):
                out = CASES[name]()
        except Exception as e:  # each case reports its own failure
            out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                   "where": traceback.format_exc().splitlines()[-3:]}
        print("CASE", json.dumps({"name": name, **out}), flush=True)
""")

CASES = ("cuda-bf16", "cuda-fp8", "cuda-bf16-ep", "tpu-bf16", "tpu-bf16-ep-blocked-attention", "tpu-bf16-ep",
         "decode-cuda", "decode-tpu")


@pytest.fixture(scope="module")
def lowered() -> dict:
    r = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(CASES)], capture_output=True, text=True,
                       env=xla_env.env(8), timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    cases = {}
    for line in r.stdout.splitlines():
        if line.startswith("CASE "):
            case = json.loads(line[5:])
            cases[case.pop("name")] = case
    assert sorted(cases) == sorted(CASES), (r.stdout[-2000:], r.stderr[-2000:])
    return cases


def _case(lowered, name) -> dict:
    case = lowered[name]
    assert "error" not in case, case
    return case


FMHA, FMHA_BWD = "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"

# Attention and MoE sites in the lowered train step of tiny (1 dense + 2 MoE layers, MTP): the dense layer, the body
# of the scan over the MoE layers and the MTP block attend; the scan body and the MTP block route experts.
SITES, MOE_SITES = 3, 2

# Per MoE site: rows out, their expert ids out, rows back, and the transposes of the two row exchanges in the
# gradient; the rows travel in bf16 under impl.precision=bf16
EXCHANGES = {"bf16": 4 * MOE_SITES, "i32": MOE_SITES}


def test_cuda_bf16_train_step_runs_cudnn_attention_both_ways_and_blocked_experts(lowered):
    case = _case(lowered, "cuda-bf16")
    calls = case["calls"]
    # one forward and one backward cuDNN call per attention site (the dense layer, the body of the scan over the MoE
    # layers, the MTP block), bf16 operands
    assert calls.get(FMHA) == {"bf16": SITES} and calls.get(FMHA_BWD) == {"bf16": SITES}, calls
    assert case["ragged_dot"] == 0  # `auto` on one GPU: the blocked grouped matmul (ragged_dot pads there)
    assert not [d for d in case["dots"] if "f8" in d], case["dots"]
    assert case["dots"].get("bf16 bf16 f32", 0) > 0, case["dots"]  # bf16 operands, float32 accumulation


def test_cuda_fp8_train_step_multiplies_e4m3_operands_into_float32(lowered):
    case = _case(lowered, "cuda-fp8")
    f8 = {d: n for d, n in case["dots"].items() if "f8" in d}
    # forward, activation-gradient and weight-gradient GEMMs take E4M3 on both sides and accumulate in float32
    assert set(f8) == {"f8E4M3FN f8E4M3FN f32"}, case["dots"]
    assert f8["f8E4M3FN f8E4M3FN f32"] >= 3 * 10, f8  # 3 GEMMs per linear layer, more than 10 linear layers
    assert FMHA in case["calls"] and FMHA_BWD in case["calls"], case["calls"]  # attention stays on cuDNN in bf16


def test_cuda_expert_parallel_step_exchanges_rows_by_ragged_all_to_all(lowered):
    case = _case(lowered, "cuda-bf16-ep")
    calls = case["calls"]
    assert calls.get("ragged_all_to_all") == EXCHANGES, calls
    # cuDNN attention under the mesh: custom_partitioning around the fused call, forward and backward per site
    assert calls.get("CustomSPMDPartitioning") == {"bf16": 2 * SITES}, calls
    assert case["ragged_dot"] == 0


def test_tpu_train_step_runs_splash_attention_and_ragged_dot(lowered):
    case = _case(lowered, "tpu-bf16")
    assert sum(case["calls"].get("tpu_custom_call", {}).values()) == 2 * SITES, case["calls"]  # splash fwd + bwd
    assert not [c for c in case["calls"] if "cudnn" in c], case["calls"]
    assert case["ragged_dot"] > 0  # `auto` on TPU: native grouped matmul


def test_tpu_expert_parallel_step_exchanges_rows_and_runs_ragged_dot(lowered):
    case = _case(lowered, "tpu-bf16-ep-blocked-attention")
    assert case["calls"].get("ragged_all_to_all") == EXCHANGES, case["calls"]
    assert case["ragged_dot"] > 0  # the local experts after the exchange


@pytest.mark.xfail(strict=True, reason="splash attention inside the train step's data-parallel region: its Pallas "
                   "call's outputs carry no varying-manual-axes type (check_vma), so the TPU step on a mesh that "
                   "splits the batch does not trace with impl.attention=auto; blocked attention does (test above)")
def test_tpu_expert_parallel_step_with_auto_attention(lowered):
    _case(lowered, "tpu-bf16-ep")


@pytest.mark.parametrize("plat", ["cuda", "tpu"])
def test_decode_programs_attend_over_the_latent_cache_in_bf16(lowered, plat):
    case = _case(lowered, f"decode-{plat}")
    for program in ("prefill", "loop"):
        lowered_program = case[program]
        # prompt and new tokens attend over the latent cache (absorbed MLA), which no self-attention kernel takes:
        # no custom call on either platform, and the decode MoE gathers its experts (no ragged_dot)
        assert lowered_program["calls"] == {} and lowered_program["ragged_dot"] == 0, (program, lowered_program)
        assert lowered_program["dots"].get("bf16 bf16 f32", 0) > 0, (program, lowered_program["dots"])
    assert case["loop"]["while"] >= 1  # the decode steps run in one compiled loop
