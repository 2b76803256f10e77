"""The MFU denominator on a machine without a datasheet entry (CPU): one matmul measurement per machine (the median
of repeats, with its spread), cached, so every run on the machine divides by the same number and says so."""

import json

import jax

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
