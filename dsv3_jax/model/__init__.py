"""The network: layers, YaRN rope, MLA, routing and its bias rule, the MoE layer and its backends, the transformer
with its MTP modules, and parameter counts.
"""
