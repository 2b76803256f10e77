"""The MFU denominator: on a device kind the datasheet table (dsv3_jax/hardware.py, shared with the planner) names,
that row's bf16 dense peak; on a machine without one (CPU), one matmul measurement per machine (the median of
repeats, with its spread), cached, so every run on the machine divides by the same number and says so."""

import dataclasses
import json
import types

import jax
import pytest

from dsv3_jax.train import metrics


def test_cpu_peak_is_measured_once_and_reused(tmp_path):
    devices = jax.devices("cpu")
    first, source = metrics.peak_flops(None, devices, tmp_path)
    (cache,) = tmp_path.glob("peak_cpu_*.json")
    saved = json.loads(cache.read_text())
    assert saved["low"] <= saved["median"] <= saved["high"] and saved["repeats"] == metrics.MATMUL_REPEATS
    assert first == saved["median"] * 1e12 and f"median of {metrics.MATMUL_REPEATS} runs" in source
    assert "measured now" in source and str(tmp_path) in source
    again, source_again = metrics.peak_flops(None, devices, tmp_path)
    assert again == first and "cached" in source_again and saved["measured"] in source_again


def test_configured_and_datasheet_peaks_name_their_source(tmp_path):
    assert metrics.peak_flops(2.0, jax.devices("cpu")[:1], tmp_path) == (2e12, "train.peak_tflops")
    assert not list(tmp_path.iterdir())  # nothing measured, nothing cached


def _devices(kind: str, n: int = 1) -> list:
    return [types.SimpleNamespace(device_kind=kind, platform="gpu" if "NVIDIA" in kind else "tpu")] * n


@pytest.mark.parametrize("kind, row, datasheet_tflops", [
    ("NVIDIA H100 80GB HBM3", "H100", 1979 / 2),  # NVIDIA H100 datasheet: 1,979 bf16 TFLOPS with 2:4 sparsity
    ("NVIDIA GH200 480GB", "GH200", 1979 / 2),  # not the H200 row, though its name holds "h200"
    ("NVIDIA A100-SXM4-80GB", "A100", 312),  # A100 datasheet, dense
    ("TPU v5 lite", "TPU v5e", 197),  # Cloud TPU docs; jax's name for v5e; not the v5p row ("TPU v5")
    ("TPU v5", "TPU v5p", 459),
    ("TPU v6 lite", "TPU v6e", 918),
])
def test_a_device_kinds_peak_is_its_datasheet_row(kind, row, datasheet_tflops, tmp_path):
    """Training's MFU peak for a device kind is the bf16 dense figure of the one datasheet table's row, per device,
    and the source printed with it names the row."""
    peak, source = metrics.peak_flops(None, _devices(kind, 8), tmp_path)
    assert peak == pytest.approx(8 * datasheet_tflops * 1e12, rel=1e-9)
    assert source.startswith(f"datasheet table, {row} bf16 dense") and kind in source
    assert not list(tmp_path.iterdir())  # nothing measured


def test_training_and_the_planner_read_one_table(monkeypatch, tmp_path):
    """metrics reads dsv3_jax/hardware.py's rows (no copy of its own): a changed row changes the MFU peak; the
    planner's names are the same rows."""
    from dsv3_jax import hardware
    from dsv3_jax.tools import hardware as planner

    assert all(planner.TABLE[name] is hardware.TABLE[name] for name in planner.TABLE)
    assert planner.get("h100") is hardware.TABLE["H100"] and planner.peak_flops is hardware.peak_flops
    changed = dataclasses.replace(hardware.TABLE["H100"], bf16_flops=123e12)
    monkeypatch.setitem(hardware.TABLE, "H100", changed)
    assert metrics.peak_flops(None, _devices("NVIDIA H100 80GB HBM3", 2), tmp_path)[0] == 2 * 123e12
    assert hardware.for_device_kind("cpu") is None and hardware.for_device_kind("NVIDIA A10")
    assert hardware.for_device_kind("NVIDIA A10").name == "A10G" != hardware.for_device_kind("NVIDIA A100").name


def test_a_row_listed_only_for_mfu_is_refused_by_the_planner_in_one_line():
    from dsv3_jax.errors import ConfigError
    from dsv3_jax.tools import hardware as planner

    with pytest.raises(ConfigError, match=r"--hardware L40S: the table holds only its matmul peak") as e:
        planner.get("l40s")
    assert "\n" not in str(e.value) and "L40S" not in planner.TABLE
