"""The decode plan (`plan --mode decode`): its abstract FP8 decode state and compiled program are those that
sampling a real FP8 checkpoint on the same mesh produces, byte for byte; the command's one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsv3_jax.tools import plan
from tests import xla_env
from tests.test_sharded_decode import OVERRIDES

CONTEXT = 128
SCRIPT = r"""
import argparse, json, sys
import jax, numpy as np
from dsv3_jax.infer import sampling
from dsv3_jax.interop import hf
from dsv3_jax.model.transformer import create
from dsv3_jax.presets import load_config
from dsv3_jax.tools import plan_decode

overrides, context, ckpt = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
args = plan_decode.parse_args(["--mode", "decode", "--config", "tiny", "--devices", "8", "--mesh", "expert=4,tensor=2",
                               "--batch", "13", "--context", str(context), *overrides])
p = plan_decode.plan(args)
deeper = plan_decode.plan(plan_decode.parse_args(["--mode", "decode", "--config", "tiny", "--devices", "8",
                                                  "--mesh", "expert=4,tensor=2", "--batch", "13",
                                                  "--context", str(context), *overrides,
                                                  "model.num_hidden_layers=6"]))
hf.save(create(load_config("tiny", overrides).model, seed=0), ckpt, fp8=True)
mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, 1, 4, 2), ("data", "fsdp", "expert", "tensor"))
model = hf.load(ckpt, mesh=mesh, keep_fp8=True, rules=sampling.DECODE_RULES, dtype="bfloat16")
programs = sampling.Programs()
state = programs.decode_state(model)[1]
real_weights = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
prompts = [[1 + i] * (1 + i) for i in range(13)]  # 13 rows, longest 13: one 16-token bucket as the plan assumes
sampling.generate(model, prompts, context - 17, mesh=mesh, programs=programs)
loop = [exe for key, exe in programs.executables.items() if key[0] is sampling._chunk_fn][0].memory_analysis()
print(json.dumps({"plan": p, "deeper": deeper, "real_weights": real_weights,
                  "real_arguments": loop.argument_size_in_bytes, "real_temporaries": loop.temp_size_in_bytes}))
"""


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("plan") / "fp8"
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(OVERRIDES), str(CONTEXT), str(ckpt)],
                         env=xla_env.env(8), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_plan_bytes_are_those_of_the_real_fp8_decode(planned):
    """Weights per device (E4M3 values, scales, bf16 rest) from the plan's abstract state equal the real loaded
    decode view's shards; the planned program takes the real program's argument bytes and temporaries."""
    p = planned["plan"]
    b = p["bytes_per_device"]
    assert p["batch"] == 16 and p["mesh"] == {"data": 1, "fsdp": 1, "expert": 4, "tensor": 2}  # 13 rows padded
    assert b["weights"]["total"] == planned["real_weights"]
    assert b["weights"]["fp8_values"] > b["weights"]["other"] > 0
    assert b["xla_arguments"] == planned["real_arguments"]
    assert b["temporaries"] == planned["real_temporaries"]
    assert p["fits"]
    est = {e["batch"]: e for e in p["estimate"]}
    assert est[1]["rows_per_device"] == 1 and est[256]["rows_per_device"] == 64
    for e in est.values():  # tokens/s = rows / (bytes read per step / bandwidth)
        assert e["tokens_per_s"] == pytest.approx(e["batch"] * 4.8e12 / e["step_bytes"])


@pytest.mark.parametrize("argv, match", [
    (["--mode", "decode", "--devices", "8", "--config", "tiny", "--hardware", "Z80"], "Z80"),
    (["--mode", "decode", "--devices", "8", "--config", "tiny", "--mesh", "pipe=2"], "--mesh takes axis=size"),
    (["--mode", "decode", "--devices", "0", "--config", "tiny"], "must be positive"),
    (["--mode", "decode", "--devices", "8", "--config", "nope"], "nope"),
])
def test_bad_decode_plan_input_is_one_line(argv, match, capsys):
    assert plan.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err


@pytest.mark.slow
def test_temporaries_do_not_grow_with_depth(planned):
    """Three more layers add their weights but hardly any temporaries: each layer's dequantised copies live only
    while it runs (with the E4M3 conversions hoisted out of the loops they would add ~2.4x their weights)."""
    a, b = planned["plan"]["bytes_per_device"], planned["deeper"]["bytes_per_device"]
    assert planned["plan"]["batch"] == planned["deeper"]["batch"]
    more_weights = b["weights"]["total"] - a["weights"]["total"]
    assert more_weights > 0
    assert b["temporaries"] - a["temporaries"] < 0.5 * more_weights, (a, b)
