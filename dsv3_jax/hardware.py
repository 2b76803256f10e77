"""Accelerator datasheet figures: the one table that training's MFU (train/metrics.py) and the planner's roofline
(tools/hardware.py) both read.

Every figure is a vendor number for ONE device (dense, i.e. without the 2:4 sparsity that NVIDIA's headline figures
assume), with its source beside it. Link bandwidths are per device and per direction (half of the bidirectional
figure vendors print): what one device can send while it also receives. `node` is the scale-up domain (an NVLink
node, a TPU pod's ICI torus); collectives whose groups leave it run at the scale-out (`net_bw`) rate. Rows listed
only for MFU carry the matmul peak alone (the memory and link fields None); the planner refuses them by name.
`device_kinds` are lowercased substrings of jax's `device.device_kind` that name the chip (the longest match wins,
so "TPU v5 lite" is v5e, not v5p, and "GH200" is not H200).
"""

from __future__ import annotations

import dataclasses
import difflib

from dsv3_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    bf16_flops: float  # dense peak FLOP/s
    fp8_flops: float | None  # dense peak FLOP/s with fp8 operands (None: no fp8 matrix unit)
    hbm_bytes: float | None = None
    hbm_bw: float | None = None  # bytes/s
    link_bw: float | None = None  # bytes/s per direction inside the scale-up domain (NVLink, ICI)
    net_bw: float | None = None  # bytes/s per direction per device across scale-up domains (InfiniBand / DCN)
    node: int | None = None  # devices per scale-up domain
    device_kinds: tuple[str, ...] = ()  # lowercased substrings of jax's device.device_kind

    @property
    def plannable(self) -> bool:
        """Whether the row has the memory and link figures a roofline needs (not only the matmul peak)."""
        return None not in (self.hbm_bytes, self.hbm_bw, self.link_bw, self.net_bw, self.node)


T, G = 1e12, 1e9


TABLE: dict[str, Hardware] = {h.name: h for h in (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 / FP8 3,958 TFLOPS with sparsity, 80 GB HBM3 at
    # 3.35 TB/s, NVLink 900 GB/s; NVIDIA DGX H100 datasheet: 8 GPUs, one 400 Gb/s ConnectX-7 port per GPU.
    Hardware("H100", 989.5 * T, 1979 * T, 80 * G, 3350 * G, 450 * G, 50 * G, 8, ("h100",)),
    # H800 SXM5: the H100 die with NVLink cut to 400 GB/s. DeepSeek-V3 technical report section 3.2.2: nodes of 8
    # H800 on NVLink (about 160 GB/s achieved) and NVSwitch, InfiniBand 50 GB/s between nodes. We use the achieved
    # 160 GB/s that the report plans with.
    Hardware("H800", 989.5 * T, 1979 * T, 80 * G, 3350 * G, 160 * G, 50 * G, 8, ("h800",)),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 / FP8 3,958 TFLOPS with sparsity, 141 GB HBM3e at
    # 4.8 TB/s, NVLink 900 GB/s; NVIDIA DGX H200 datasheet: one 400 Gb/s ConnectX-7 port per GPU.
    Hardware("H200", 989.5 * T, 1979 * T, 141 * G, 4800 * G, 450 * G, 50 * G, 8, ("h200",)),
    # NVIDIA GH200 Grace Hopper Superchip datasheet: the H100's tensor cores (BF16 1,979 / FP8 3,958 TFLOPS with
    # sparsity); MFU only.
    Hardware("GH200", 989.5 * T, 1979 * T, device_kinds=("gh200",)),
    # NVIDIA DGX B200 datasheet: 8 GPUs, 1,440 GB HBM3e at 64 TB/s in total, NVLink 5 at 1.8 TB/s per GPU,
    # 8 x 400 Gb/s ConnectX-7; NVIDIA HGX B200 spec (1,000 W): per GPU BF16 4.5 / FP8 9 PFLOPS with sparsity.
    Hardware("B200", 2250 * T, 4500 * T, 180 * G, 8000 * G, 900 * G, 50 * G, 8, ("b200",)),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): BF16 312 TFLOPS (624 with sparsity), no FP8, 80 GB HBM2e at
    # 2,039 GB/s, NVLink 600 GB/s; NVIDIA DGX A100 datasheet: 8 GPUs, one 200 Gb/s ConnectX-6 port per GPU.
    Hardware("A100", 312 * T, None, 80 * G, 2039 * G, 300 * G, 25 * G, 8, ("a100",)),
    # A800: the A100 with NVLink cut to 400 GB/s (NVIDIA A800 datasheet); the rest as A100.
    Hardware("A800", 312 * T, None, 80 * G, 2039 * G, 200 * G, 25 * G, 8, ("a800",)),
    # NVIDIA L40S datasheet: BF16 362.05 / FP8 733 TFLOPS (733 / 1,466 with sparsity); MFU only.
    Hardware("L40S", 362 * T, 733 * T, device_kinds=("l40s",)),
    # NVIDIA A10 datasheet: BF16 125 TFLOPS (250 with sparsity); AWS's A10G taken at the A10's figure; MFU only.
    Hardware("A10G", 125 * T, None, device_kinds=("a10g", "a10 ")),
    # NVIDIA V100 datasheet (SXM2): 125 TFLOPS tensor (FP16; V100 has no bf16 unit); MFU only.
    Hardware("V100", 125 * T, None, device_kinds=("v100",)),
    # Google Cloud TPU docs, "TPU v5p" system architecture table: 459 TFLOPs bf16 (fp8 also 459: no faster fp8 path),
    # 95 GiB HBM2e at 2,765 GBps, bidirectional ICI 1,200 GBps per chip, DCN 50 Gbps per chip, 3D torus; the
    # largest slice one job can use is 6,144 chips (a pod has 8,960). jax names it "TPU v5" or "TPU v5p".
    Hardware("TPU v5p", 459 * T, None, 95 * 2**30, 2765 * G, 600 * G, 6.25 * G, 6144, ("tpu v5p", "tpu v5")),
    # Google Cloud TPU docs, "TPU v5e" table: 197 TFLOPs bf16, 16 GB HBM2 at 819 GBps, bidirectional ICI 400 GBps
    # per chip, 256 chips per pod (2D torus), 2 x 100 Gbps NICs per host of 8 chips. jax names it "TPU v5 lite".
    Hardware("TPU v5e", 197 * T, None, 16 * G, 819 * G, 200 * G, 3.125 * G, 256, ("tpu v5 lite", "tpu v5e")),
    # Google Cloud TPU docs, "TPU v6e" system architecture table: 918 TFLOPs bf16 (int8 1,836 TOPs, no fp8),
    # 32 GB HBM at 1,638 GBps, bidirectional ICI 800 GBps per chip, 256 chips per pod (2D torus). jax names it
    # "TPU v6 lite".
    Hardware("TPU v6e", 918 * T, None, 32 * G, 1638 * G, 400 * G, 400 * G, 256, ("tpu v6",)),
    # Google Cloud TPU docs, "TPU7x (Ironwood)" table: 2,307 TFLOPs bf16, 4,614 fp8, 192 GiB HBM, 9,216 chips per
    # pod; Google's Ironwood announcement (April 2025): 7.37 TB/s HBM, bidirectional ICI 1.2 TB/s per chip. DCN per
    # chip not published: v5p's 50 Gbps (only slices past one pod reach it).
    Hardware("TPU7x", 2307 * T, 4614 * T, 192 * 2**30, 7370 * G, 600 * G, 6.25 * G, 9216, ("tpu7x", "tpu 7x")),
    # Google Cloud TPU docs, "TPU v4" table: 275 TFLOPs bf16 per chip; MFU only.
    Hardware("TPU v4", 275 * T, None, device_kinds=("tpu v4",)),
    # Google Cloud TPU docs, "TPU v3" table: 123 TFLOPs bf16 per chip; MFU only.
    Hardware("TPU v3", 123 * T, None, device_kinds=("tpu v3",)),
)}

ALIASES = {"ironwood": "TPU7x", "v7x": "TPU7x"}


def _key(s: str) -> str:
    return s.lower().replace(" ", "").replace("-", "").replace("_", "").removeprefix("tpu")


def get(name: str, table: dict[str, Hardware] | None = None) -> Hardware:
    """A row by name (case and spaces ignored: `h100`, `tpu-v5p`, `v6e`, `ironwood`); a one-line ConfigError naming
    the close match and the known names otherwise."""
    table = TABLE if table is None else table
    name = ALIASES.get(_key(name), name)
    for h in table.values():
        if _key(h.name) == _key(name):
            return h
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"unknown --hardware {name!r}{hint} (known: {', '.join(table)})")


def for_device_kind(device_kind: str) -> Hardware | None:
    """The row whose `device_kinds` entry is the longest substring of jax's `device.device_kind` (None: no row)."""
    kind = device_kind.lower() + " "  # "NVIDIA A10" ends the name: its key "a10 " must not match "A100"
    hits = [(len(k), h) for h in TABLE.values() for k in h.device_kinds if k in kind]
    return max(hits, key=lambda hit: hit[0])[1] if hits else None


def peak_flops(hw: Hardware, precision: str) -> float:
    """The matrix-unit peak for the config's `impl.precision` (fp8 falls back to bf16 where there is no fp8 unit)."""
    if precision == "fp8" and hw.fp8_flops:
        return hw.fp8_flops
    return hw.bf16_flops
