"""The planner's view of the datasheet table (dsv3_jax/hardware.py, which training's MFU reads too): the rows with
memory and link figures, looked up by `--hardware` name, and the roofline step-time estimate the planner ranks
meshes by. The table's public names are re-exported here for the planner and its tests.
"""

from __future__ import annotations

from dsv3_jax import hardware as _table
from dsv3_jax.errors import ConfigError
from dsv3_jax.hardware import ALIASES, G, Hardware, T, peak_flops

__all__ = ["ALIASES", "G", "Hardware", "T", "TABLE", "get", "peak_flops", "roofline"]

# the rows a roofline can use: those listed only for MFU (no memory or link figures) are left out
TABLE: dict[str, Hardware] = {name: h for name, h in _table.TABLE.items() if h.plannable}


def get(name: str) -> Hardware:
    """A plannable row by name (case and spaces ignored: `h100`, `tpu-v5p`, `v6e`, `ironwood`); a row listed only
    for MFU is a one-line error saying what it lacks."""
    try:
        hw = _table.get(name)
    except ConfigError:
        return _table.get(name, TABLE)  # the one-line error, naming the close match and the plannable rows
    if not hw.plannable:
        raise ConfigError(f"--hardware {hw.name}: the table holds only its matmul peak (for MFU), not the memory and "
                          f"link figures a plan needs; plannable rows known: {', '.join(TABLE)}")
    return hw


def roofline(hw: Hardware, precision: str, flops: float, hbm_traffic: float, intra_link_bytes: float,
             inter_link_bytes: float) -> dict:
    """Step time per device from compute, HBM traffic and the two links' bytes (inside the scale-up domain, and
    across domains), each resource at its peak rate, two ways: `step_s` = their max (perfect overlap, the two links
    busy at once as DeepSeek's dispatch keeps NVLink and InfiniBand: the optimistic roofline; names the bound) and
    `serial_step_s` = their sum (no overlap at all). A real step lands between the two. `collectives_s` is the two
    links' time one after the other."""
    times = {
        "compute": flops / peak_flops(hw, precision),
        "memory": hbm_traffic / hw.hbm_bw,
        "intra_link": intra_link_bytes / hw.link_bw,
        "inter_link": inter_link_bytes / hw.net_bw,
    }
    bound = max(times, key=times.get)
    return {"step_s": times[bound], "serial_step_s": sum(times.values()), "bound": bound,
            "collectives_s": times["intra_link"] + times["inter_link"], **{f"{k}_s": v for k, v in times.items()}}
