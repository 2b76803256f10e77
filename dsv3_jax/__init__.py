"""dsv3_jax: DeepSeek-V3 in JAX / Flax NNX (train and sample).

Shape letters, one meaning each across the package (names end in their shape: `x_btd`, `idx_nk`; einsum strings use
the same letters in lower case):

    B  batch rows                 T  tokens per row (query positions)   S  cache slots (key positions)
    D  hidden size                V  vocabulary                        H  attention heads
    L  stacked layers             M  MTP depth (num_nextn_predict_layers)
    E  routed experts             K  experts per token                 G  expert groups
    F  expert hidden size         N  flattened tokens (B * T)          R  routed rows (N * K)
    P  padded rows (expert-aligned blocks)   U  new-token budget of a generation call

Attention adds its own head dims (n qk_nope, r qk_rope, v value, c kv_lora) in `attention.py`. Quantities that
are not shapes spell their unit out (`compile_s` seconds, `tokens_per_s`).
"""
