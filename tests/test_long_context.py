"""Long context: the compiled train step's memory is linear in the sequence length with the blocked attention
backend (no buffer holds every (query block, key block) pair), and the context-parallel step equals the unsplit one.

Memory tests compile the real `small` train step (MTP on, two micro-batches) on one device and read XLA's memory
analysis and HLO; nothing runs. The block size is chosen so that the block count (`T / block`) is a number no other
dimension of the small model has, so a shape with two block-count dimensions is the pairs buffer and nothing else."""

from __future__ import annotations

import re
import textwrap

import jax
import pytest

from dsv3_jax.parallel.sharding import make_mesh, rules_for, use_rules
from dsv3_jax.presets import load_config
from dsv3_jax.tools.plan import abstract_inputs
from dsv3_jax.train.step import jit_train_step
from tests import xla_env

BLOCK = 128


def _compiled_step(t: int, remat: str, layers: int = 4):
    """The small train step at sequence length t (blocked attention, blocks of BLOCK), compiled for one device; the
    layers unrolled without remat (the small preset's setting), scanned under it (the large presets')."""
    cfg = load_config("small", [f"data.seq_len={t}", f"model.max_position_embeddings={t}", "train.global_batch_size=2",
                                "train.micro_batches=2", "impl.attention=blocked", f"impl.attention_block_size={BLOCK}",
                                f"impl.remat={remat}", f"model.num_hidden_layers={layers}",
                                f"impl.scan_layers={'true' if remat != 'none' else 'false'}"])
    assert cfg.model.num_nextn_predict_layers == 1
    mesh = make_mesh(cfg.mesh)
    with use_rules(rules_for(cfg.mesh)):
        state, batch, graphdef, tx = abstract_inputs(cfg, mesh)
    step = jit_train_step(cfg, graphdef, tx, mesh, state)
    with jax.set_mesh(mesh), use_rules(rules_for(cfg.mesh)):
        return step.lower(state, batch).compile()


def pair_shapes(hlo: str, blocks: int) -> set[str]:
    """Array shapes in `hlo` with at least two dimensions equal to the block count `blocks`."""
    shapes = set(re.findall(r"\b(?:f32|bf16|f16|pred|s32|u32|s8|u8)\[[0-9,]+\]", hlo))
    return {s for s in shapes if [int(d) for d in s[s.index("[") + 1:-1].split(",")].count(blocks) >= 2}


def test_pair_shapes_finds_two_block_count_dimensions():
    hlo = "%a = f32[13,13,1,4,64,64]{5,4,3,2,1,0} x, %b = pred[13,2,13] y, %c = f32[13,64] z, %d = s32[130,13] w"
    assert pair_shapes(hlo, 13) == {"f32[13,13,1,4,64,64]", "pred[13,2,13]"}


# 13 blocks (the small model's dims are 1, 2, 4, 16, 32, 48, 64, 192, 258, ...; 13 is none of them)
@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "none"])
def test_compiled_step_holds_no_buffer_over_block_pairs(remat):
    t = 13 * BLOCK
    hlo = _compiled_step(t, remat, layers=2).as_text()
    assert pair_shapes(hlo, t // BLOCK) == set()


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_compiled_step_temporaries_grow_linearly_with_length(remat):
    """Bytes per extra token from 1K to 4K at most 1.2x those from one block to 1K. The temporaries have a large
    length-independent part (gradients and optimizer update of the whole model), so the ratio of the totals would
    hide a quadratic term; the per-token growth does not: the pairs buffers made it 1.6x (remat none) and 5.3x
    (remat full) here."""
    lengths = (BLOCK, 1024, 4096)
    temp = [_compiled_step(t, remat).memory_analysis().temp_size_in_bytes for t in lengths]
    per_token = [(temp[i + 1] - temp[i]) / (lengths[i + 1] - lengths[i]) for i in range(2)]
    assert per_token[1] <= 1.2 * per_token[0], (lengths, temp)


# ----------------------------------------------------------------------------------------------------------------
# Context parallelism: the sequence split over `context` on 8 fake devices against the unsplit step on one device.

CONTEXT_SCRIPT = textwrap.dedent(r"""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding
    from tests.checks import outcome
    from dsv3_jax.presets import load_config
    from dsv3_jax.parallel.expert_parallel import DENSE_EXCHANGE
    from dsv3_jax.parallel.sharding import logical_spec, make_mesh, rules_for, use_rules
    from dsv3_jax.tools import hlo
    from dsv3_jax.train import losses
    from dsv3_jax.train.state import init_state
    from dsv3_jax.train.step import _accumulate, jit_train_step, mtp_lambda

    SEQ, B, C, R = 64, 4, 20, 6  # tiny: kv_lora_rank 20, qk_rope_head_dim 6
    # one dense and one MoE layer besides the MTP module's (tiny has two MoE layers): every kind of layer, less compile
    BASE = [f"data.seq_len={SEQ}", f"train.global_batch_size={B}", "train.micro_batches=2", "train.bias_gamma=0.01",
            "train.balance_alpha=0.01", "train.warmup_steps=1", "impl.attention=blocked",
            "impl.attention_block_size=8", "model.num_hidden_layers=2"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 258, size=(B, SEQ + 1)).astype(np.int32)
    seg = np.ones((B, SEQ + 1), np.int32)
    pos = np.tile(np.arange(SEQ + 1, dtype=np.int32), (B, 1))
    for r in range(B):  # packed documents crossing the chunk borders (chunks of 8 or 16 tokens); padding at the end
        for k, cut in enumerate((5 + 3 * r, 23 + r, 41 - 2 * r)):
            seg[r, cut:] = k + 2
            pos[r, cut:] = np.arange(SEQ + 1 - cut)
    seg[-1, -6:] = 0
    BATCH = {"tokens": tokens, "segment_ids": seg, "positions": pos}

    def sums(cfg, graphdef):  # the step's (loss, aux, gradients) before the optimizer, as train_step computes them
        def f(state, batch):
            m, depth, s = cfg.train.micro_batches, cfg.model.num_nextn_predict_layers, batch["segment_ids"]
            n_tok = jnp.maximum(losses.same_document_mask(s, 0).sum(), 1).astype(jnp.float32)
            n_mtp = jnp.stack([losses.same_document_mask(s, k).sum() for k in range(1, depth + 1)])
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1), batch)
            return _accumulate(state.params, state.bias, micro, n_tok, jnp.maximum(n_mtp, 1).astype(jnp.float32),
                               mtp_lambda(state.step, cfg.train), graphdef=graphdef, cfg=cfg)
        return f

    def run(overrides, devices=None):
        cfg = load_config("tiny", [*BASE, *overrides])
        mesh = make_mesh(cfg.mesh, devices=devices)
        with use_rules(rules_for(cfg.mesh)):
            state, graphdef, tx = init_state(cfg, mesh)
            placed = {k: jax.device_put(v, NamedSharding(mesh, logical_spec(("batch",)))) for k, v in BATCH.items()}
        step = jit_train_step(cfg, graphdef, tx, mesh, state, donate=False)
        with jax.set_mesh(mesh), use_rules(rules_for(cfg.mesh)):
            grads = jax.jit(sums(cfg, graphdef)).lower(state, placed).compile()  # compiled once: run and read
            out = jax.device_get(grads(state, placed))
            new, metrics = step(state, placed)
        return out, jax.device_get(metrics), jax.device_get(new.bias), grads.as_text(), mesh, cfg

    def check_equal(ref, got):
        (total, aux, grads), metrics, bias = ref[:3]
        (g_total, g_aux, g_grads), g_metrics, g_bias = got[:3]
        np.testing.assert_allclose(g_total, total, rtol=1e-6)
        for k in ("counts", "mtp_counts", "router_counts"):  # expert counts exact
            for a, b in zip(jax.tree.leaves(aux[k]), jax.tree.leaves(g_aux[k])):
                np.testing.assert_array_equal(b, a, err_msg=k)
        for k in ("ce", "mtp_ce", "balance"):
            np.testing.assert_allclose(g_aux[k], aux[k], rtol=1e-6, err_msg=k)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(g_grads)):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))
        for k in ("loss", "total_loss", "mtp_loss", "balance_loss", "grad_norm", "maxvio"):
            np.testing.assert_allclose(g_metrics[k], metrics[k], rtol=1e-6, err_msg=k)
        for a, b in zip(jax.tree.leaves(bias), jax.tree.leaves(g_bias)):
            np.testing.assert_allclose(b, a, atol=1e-6, err_msg="router bias after the step")

    def collectives(got):
        text, mesh = got[3], got[4]
        return hlo.analyze(text, mesh.size, None, mesh.device_ids, mesh.axis_names)["collective_ops"]

    def check_latent_only(got):
        # (the all-reduces that name it sum kv_b_proj's gradient over the chunks, merged with the other weights')
        ops = [o for o in collectives(got) if "context_parallel" in o["op_name"] and o["kind"] != "all-reduce"]
        # forward all-gathers, and in the backward their transposes as all-to-alls (context_parallel.gather_chunks)
        assert {(o["kind"], o["axes"]) for o in ops} == {("all-gather", ("context",)),
                                                         ("all-to-all", ("context",))}, ops
        # every array moved is the latent (B, ., c) or (B, ., r) ((B, 1, t, .) parts in the all-to-all), or the
        # segment ids (B, T): no per-head K or V
        for o in ops:
            for dtype, dims in hlo.arrays(o["shape"]):
                assert (len(dims) in (3, 4) and dims[-1] in (C, R)) or (dims[-1] == SEQ and dtype == "s32"), o

    def check_moe_own_chunk(got):
        # the MoE layers route their own chunk's tokens: no collective over `context` moves hidden states (B, ., D)
        # but the expert-parallel exchange, which moves routed rows to their experts' devices and back by design
        # (the all-reduces sum weight gradients, whose dims may include D)
        d = got[5].model.hidden_size
        moved = [o for o in collectives(got) if "context" in o["axes"] and o["kind"] != "all-reduce"
                 and DENSE_EXCHANGE not in o["op_name"] and any(dims[-1] == d for _, dims in hlo.arrays(o["shape"]))]
        assert not moved, moved

    results = {}
    ref = run(["mesh.data=1"], devices=jax.devices()[:1])
    split8 = run(["mesh.data=1", "mesh.context=8"])
    results["context8"] = outcome(check_equal, ref, split8)
    results["latent8"] = outcome(check_latent_only, split8)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref[0][2]), jax.tree.leaves(split8[0][2])))
    print("CP_FIGURES", json.dumps({"loss_unsplit": float(ref[0][0]), "loss_context8": float(split8[0][0]),
                                    "max_grad_diff": diff,
                                    "max_grad": max(float(np.abs(a).max()) for a in jax.tree.leaves(ref[0][2]))}))
    results["moe8"] = outcome(check_moe_own_chunk, split8)
    results["data2-context4"] = outcome(check_equal, ref, run(["mesh.data=2", "mesh.context=4"]))
    # expert parallel over expert x context: the exchange carries each context rank's own tokens
    ep = run(["mesh.data=1", "mesh.expert=2", "mesh.context=4", "mesh.rules={experts: [expert, context]}"])
    results["expert2-context4"] = outcome(check_equal, ref, ep)
    results["moe-ep"] = outcome(check_moe_own_chunk, ep)
    print("CP_RESULTS", json.dumps(results))
""")


@pytest.fixture(scope="module")
def context_results():
    return xla_env.script_results(CONTEXT_SCRIPT, "CP_RESULTS", timeout=1200)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["context8", "data2-context4", "expert2-context4"])
def test_context_split_step_equals_the_unsplit_step(context_results, case):
    """Loss, gradients, expert counts and the router bias update: packed documents crossing the chunk borders, MTP
    on, two micro-batches, blocked attention in blocks of 8 (one query block a device at context 8)."""
    assert context_results[case] == "ok", context_results[case]


@pytest.mark.slow
def test_context_split_attention_moves_only_the_latent(context_results):
    assert context_results["latent8"] == "ok", context_results["latent8"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["moe8", "moe-ep"])
def test_context_split_moe_routes_only_its_chunk(context_results, case):
    """Each context rank routes and computes its own chunk's tokens (context x batch split the MoE's tokens): no
    hidden state crosses `context`. Before, every rank gathered the whole sequence and computed its experts C-fold."""
    assert context_results[case] == "ok", context_results[case]


BF16_SCRIPT = textwrap.dedent(r"""
    import json, re
    import jax
    from tests.checks import outcome
    from dsv3_jax.presets import load_config
    from dsv3_jax.parallel.sharding import make_mesh, rules_for, use_rules
    from dsv3_jax.tools import hlo
    from dsv3_jax.tools.plan import abstract_inputs
    from dsv3_jax.train.step import jit_train_step

    cfg = load_config("tiny", ["data.seq_len=32", "train.global_batch_size=2", "train.micro_batches=1",
                               "impl.attention=blocked", "impl.attention_block_size=8", "impl.dtype=bfloat16",
                               "impl.precision=bf16", "mesh.data=1", "mesh.context=2"])
    mesh = make_mesh(cfg.mesh)
    with use_rules(rules_for(cfg.mesh)):
        state, batch, graphdef, tx = abstract_inputs(cfg, mesh)
    with jax.set_mesh(mesh), use_rules(rules_for(cfg.mesh)):  # compiled as the planner compiles it
        lowered = jit_train_step(cfg, graphdef, tx, mesh, state).lower(state, batch)
        lowered.compile()
    text = lowered.compiler_ir("hlo").as_hlo_text()  # as written (XLA:CPU widens bf16 collectives to f32)

    def check():
        # before partitioning, the all-gathers and all-to-alls are the attention shard_map's (the MoE's are local
        # here): the latent travels in bf16 both ways (the planned step is the bf16 one), the segment ids as s32
        ops = re.findall(r"= (.*?) (all-gather|all-to-all)\(", text)
        assert {kind for _, kind in ops} == {"all-gather", "all-to-all"}, ops
        assert {dt for shape, _ in ops for dt, _ in hlo.arrays(shape)} == {"bf16", "s32"}, ops

    print("BF16_RESULTS", json.dumps({"bf16": outcome(check)}))
""")


@pytest.mark.slow
def test_bf16_step_with_context_compiles():
    """The bf16 train step with the sequence split over `context=2` compiles on XLA:CPU: a reduction inside the
    partly manual attention shard_map made XLA:CPU's all-reduce promotion abort the process ("Invalid binary
    instruction opcode copy"). XLA:CPU cannot run its bf16 x bf16 = f32 dots, so it is compiled, not run."""
    results = xla_env.script_results(BF16_SCRIPT, "BF16_RESULTS", timeout=600, devices=2)
    assert results["bf16"] == "ok", results["bf16"]
