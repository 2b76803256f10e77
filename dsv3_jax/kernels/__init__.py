"""How the matmuls and attention are computed: the precision policy and its one einsum, FP8 GEMMs, attention
backends, latent decode attention and the grouped matmul of the MoE.
"""
