"""Accelerator datasheet figures and the roofline step-time estimate the planner ranks meshes by.

Every figure is a vendor number for ONE device (dense, i.e. without the 2:4 sparsity that NVIDIA's headline figures
assume), with its source beside it. Link bandwidths are per device and per direction (half of the bidirectional
figure vendors print): what one device can send while it also receives. `node` is the scale-up domain (an NVLink
node, a TPU pod's ICI torus); collectives whose groups leave it run at the scale-out (`net_bw`) rate.
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
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    link_bw: float  # bytes/s per direction inside the scale-up domain (NVLink, ICI)
    net_bw: float  # bytes/s per direction per device across scale-up domains (InfiniBand / DCN)
    node: int  # devices per scale-up domain


T, G = 1e12, 1e9


TABLE: dict[str, Hardware] = {h.name: h for h in (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 / FP8 3,958 TFLOPS with sparsity, 80 GB HBM3 at
    # 3.35 TB/s, NVLink 900 GB/s; NVIDIA DGX H100 datasheet: 8 GPUs, one 400 Gb/s ConnectX-7 port per GPU.
    Hardware("H100", 989.5 * T, 1979 * T, 80 * G, 3350 * G, 450 * G, 50 * G, 8),
    # H800 SXM5: the H100 die with NVLink cut to 400 GB/s. DeepSeek-V3 technical report section 3.2.2: nodes of 8
    # H800 on NVLink (about 160 GB/s achieved) and NVSwitch, InfiniBand 50 GB/s between nodes. We use the achieved
    # 160 GB/s that the report plans with.
    Hardware("H800", 989.5 * T, 1979 * T, 80 * G, 3350 * G, 160 * G, 50 * G, 8),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 / FP8 3,958 TFLOPS with sparsity, 141 GB HBM3e at
    # 4.8 TB/s, NVLink 900 GB/s; NVIDIA DGX H200 datasheet: one 400 Gb/s ConnectX-7 port per GPU.
    Hardware("H200", 989.5 * T, 1979 * T, 141 * G, 4800 * G, 450 * G, 50 * G, 8),
    # NVIDIA DGX B200 datasheet: 8 GPUs, 1,440 GB HBM3e at 64 TB/s in total, NVLink 5 at 1.8 TB/s per GPU,
    # 8 x 400 Gb/s ConnectX-7; NVIDIA HGX B200 spec (1,000 W): per GPU BF16 4.5 / FP8 9 PFLOPS with sparsity.
    Hardware("B200", 2250 * T, 4500 * T, 180 * G, 8000 * G, 900 * G, 50 * G, 8),
    # Google Cloud TPU docs, "TPU v5p" system architecture table: 459 TFLOPs bf16 (fp8 also 459: no faster fp8 path),
    # 95 GiB HBM2e at 2,765 GBps, bidirectional ICI 1,200 GBps per chip, DCN 50 Gbps per chip, 3D torus; the
    # largest slice one job can use is 6,144 chips (a pod has 8,960).
    Hardware("TPU v5p", 459 * T, None, 95 * 2**30, 2765 * G, 600 * G, 6.25 * G, 6144),
    # Google Cloud TPU docs, "TPU v6e" system architecture table: 918 TFLOPs bf16 (int8 1,836 TOPs, no fp8),
    # 32 GB HBM at 1,638 GBps, bidirectional ICI 800 GBps per chip, 256 chips per pod (2D torus).
    Hardware("TPU v6e", 918 * T, None, 32 * G, 1638 * G, 400 * G, 400 * G, 256),
    # Google Cloud TPU docs, "TPU7x (Ironwood)" table: 2,307 TFLOPs bf16, 4,614 fp8, 192 GiB HBM, 9,216 chips per
    # pod; Google's Ironwood announcement (April 2025): 7.37 TB/s HBM, bidirectional ICI 1.2 TB/s per chip. DCN per
    # chip not published: v5p's 50 Gbps (only slices past one pod reach it).
    Hardware("TPU7x", 2307 * T, 4614 * T, 192 * 2**30, 7370 * G, 600 * G, 6.25 * G, 9216),
)}

ALIASES = {"ironwood": "TPU7x", "v7x": "TPU7x"}


def get(name: str) -> Hardware:
    """A table entry by name (case and spaces ignored: `h100`, `tpu-v5p`, `v6e`, `ironwood`)."""
    def key(s: str) -> str:
        return s.lower().replace(" ", "").replace("-", "").replace("_", "").removeprefix("tpu")

    name = ALIASES.get(key(name), name)
    for h in TABLE.values():
        if key(h.name) == key(name):
            return h
    close = difflib.get_close_matches(name, list(TABLE), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"unknown --hardware {name!r}{hint} (known: {', '.join(TABLE)})")


def peak_flops(hw: Hardware, precision: str) -> float:
    """The matrix-unit peak for the config's `impl.precision` (fp8 falls back to bf16 where there is no fp8 unit)."""
    if precision == "fp8" and hw.fp8_flops:
        return hw.fp8_flops
    return hw.bf16_flops


def roofline(hw: Hardware, precision: str, flops: float, hbm_traffic: float, intra_link_bytes: float,
             inter_link_bytes: float) -> dict:
    """Step time per device from compute, HBM traffic and collectives, each at its peak rate, two ways: `step_s`
    = their max (perfect overlap: the optimistic roofline; names the bound) and `serial_step_s` = their sum (no
    overlap at all). A real step lands between the two. Collective time adds the intra- and inter-domain bytes at
    their own rates (no overlap between the two links)."""
    times = {
        "compute": flops / peak_flops(hw, precision),
        "memory": hbm_traffic / hw.hbm_bw,
        "collectives": intra_link_bytes / hw.link_bw + inter_link_bytes / hw.net_bw,
    }
    bound = max(times, key=times.get)
    return {"step_s": times[bound], "serial_step_s": sum(times.values()), "bound": bound,
            **{f"{k}_s": v for k, v in times.items()}}
