"""Long context: the compiled train step's memory is linear in the sequence length with the blocked attention
backend (no buffer holds every (query block, key block) pair), and the context-parallel step equals the unsplit one.

Memory tests compile the real `small` train step (MTP on, two micro-batches) on one device and read XLA's memory
analysis and HLO; nothing runs. The block size is chosen so that the block count (`T / block`) is a number no other
dimension of the small model has, so a shape with two block-count dimensions is the pairs buffer and nothing else."""

from __future__ import annotations

import re

import jax
import pytest

from dsv3_jax.parallel.sharding import make_mesh, rules_for, use_rules
from dsv3_jax.presets import load_config
from dsv3_jax.tools.plan import abstract_inputs
from dsv3_jax.train.step import jit_train_step

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
    hide a quadratic term; the per-token growth does not: the pairs buffers made it 1.6x (remat none) and 18x
    (remat full) here."""
    lengths = (BLOCK, 1024, 4096)
    temp = [_compiled_step(t, remat).memory_analysis().temp_size_in_bytes for t in lengths]
    per_token = [(temp[i + 1] - temp[i]) / (lengths[i + 1] - lengths[i]) for i in range(2)]
    assert per_token[1] <= 1.2 * per_token[0], (lengths, temp)
