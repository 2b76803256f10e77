"""Analytic HBM traffic of one training step per device: what a fused GPU/TPU program moves, beside the planner's
count from the CPU-compiled HLO (which has no fusion and charges every elementwise op its operands).

The model, per micro-batch: every weight a device multiplies is read once per GEMM pass (forward, the rematerialised
forward under `impl.remat: full`, and the input-gradient GEMM) at the matmul operand width, and its f32 gradient
accumulator is read and written once (the weight-gradient GEMM's epilogue); every activation at a kernel boundary
(a GEMM's output, a norm, the attention output, the dispatched expert rows) is written once and read once in each
of the forward, recomputed forward and two backward passes; the blocked attention kernel reads the keys and values
once per query block (its scores stay on chip); the logits are f32. Per step: the optimizer reads the gradient and
reads and writes the parameters and moments of this device's shard. Left out: small elementwise tensors (router
scores, masks), sorting and gather indices, the collectives' staging buffers, and any caching in L2 / VMEM.
"""

from __future__ import annotations

import math

from dsv3_jax.config import Config
from dsv3_jax.model.params import count_params

_WIDTH = {"fp32": 4, "bf16": 2, "fp8": 1}
_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}


def routed_params(cfg: Config) -> int:
    """Parameters of the routed experts, MTP layers included (each MTP layer is a MoE layer)."""
    m = cfg.model
    moe_layers = m.num_hidden_layers - m.first_k_dense_replace + m.num_nextn_predict_layers
    return moe_layers * m.n_routed_experts * 3 * m.hidden_size * m.moe_intermediate_size


def activation_elems_per_token(cfg: Config, tensor: int) -> dict[str, float]:
    """Elements written at kernel boundaries per token, per layer kind, with `tensor`-split widths divided."""
    m = cfg.model
    h, d, t = m.num_attention_heads, m.hidden_size, tensor
    attention = (2 * d + 2 * (m.q_lora_rank or 0) + 2 * (m.kv_lora_rank + m.qk_rope_head_dim)
                 + h * (2 * m.qk_head_dim + m.qk_nope_head_dim + 2 * m.v_head_dim) / t)
    routed = (m.n_routed_experts + 2 * m.num_experts_per_tok * d
              + 3 * m.num_experts_per_tok * m.moe_intermediate_size / t)
    shared = 3 * m.n_shared_experts * m.moe_intermediate_size / t
    return {"attention": attention, "moe": 2 * d + routed + shared, "dense_ffn": 2 * d + 3 * m.intermediate_size / t,
            "logits_f32": m.vocab_size / t}


def step_traffic(cfg: Config, tensor: int, experts_split: int, batch_split: int, params_bytes: float,
                 opt_bytes: float) -> dict:
    """HBM bytes one device moves per step. `tensor`: ways the head/FFN widths are split; `experts_split`: ways
    the routed experts are split (each device multiplies 1/experts_split of them, whole); `batch_split`: ways the
    global batch is split; `params_bytes`, `opt_bytes`: this device's parameter and optimizer-state shards."""
    m, impl = cfg.model, cfg.impl
    w = _WIDTH[impl.precision]
    act = _DTYPE.get(impl.dtype, 4)
    passes = 1 + (impl.remat == "full")  # forward GEMM passes; the backward adds one input-gradient pass
    mtp = m.num_nextn_predict_layers
    counts = count_params(m)
    embed = m.vocab_size * m.hidden_size
    routed = routed_params(cfg)
    non_expert = counts["total_with_mtp"] - routed - embed  # the embedding is a lookup: rows, not the table
    weights_dev = non_expert / tensor + routed / experts_split
    micro = cfg.train.micro_batches
    tokens_mb = cfg.train.global_batch_size * cfg.data.seq_len / batch_split / micro  # this device's tokens
    weights = micro * weights_dev * ((passes + 1) * w + 2 * 4)

    e = activation_elems_per_token(cfg, tensor)
    layers = m.num_hidden_layers + mtp
    moe_layers = m.num_hidden_layers - m.first_k_dense_replace + mtp
    per_token = (layers * e["attention"] + moe_layers * e["moe"] + m.first_k_dense_replace * e["dense_ffn"]) * act
    per_token += (1 + mtp) * e["logits_f32"] * 4
    activations = micro * tokens_mb * per_token * 2 * (passes + 2)
    # keys and values (H x (qk + v) per token) read once per query block; causal: half the blocks on average
    q_blocks = max(1, math.ceil(cfg.data.seq_len / impl.attention_block_size))
    kv = m.num_attention_heads * (m.qk_head_dim + m.v_head_dim) / tensor * act
    attention = micro * tokens_mb * layers * kv * q_blocks / 2 * (passes + 2)
    optimizer = 3 * params_bytes + 2 * opt_bytes  # read + write params and moments, read the gradient
    total = weights + activations + attention + optimizer
    return {"weights": weights, "activations": activations, "attention_kv": attention, "optimizer": optimizer,
            "total": total}
