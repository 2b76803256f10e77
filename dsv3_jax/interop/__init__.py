"""The released DeepSeek-V3 format: HF config mapping, safetensors load and save (sliced per device), FP8 blocks."""
