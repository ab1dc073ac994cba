"""common/energy.py: RAPL counters (a fake powercap tree), the labelled CPU-time estimate, /proc reading."""
import os
import subprocess
import sys
import time

import pytest

from polarprune.common.energy import (WATTS_ENV, EnergyMeter, EnergyReading, process_tree, rapl_zones, tree_cpu_seconds,
                           tree_rss_bytes, watts_per_core)


def fake_rapl(root, zones):
    """zones: name -> (energy_uj, max_energy_range_uj), laid out like /sys/class/powercap."""
    for name, (energy, max_range) in zones.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "energy_uj").write_text(f"{energy}\n")
        (root / name / "max_energy_range_uj").write_text(f"{max_range}\n")


def busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_rapl_reads_package_zones_only_and_survives_a_counter_wrap(tmp_path):
    fake_rapl(tmp_path, {"intel-rapl:0": (900_000, 1_000_000), "intel-rapl:1": (5_000_000, 10**9),
                         "intel-rapl:0:0": (1, 10**9)})  # a subzone: already inside package 0
    assert [z.path.name for z in rapl_zones(tmp_path)] == ["intel-rapl:0", "intel-rapl:1"]
    meter = EnergyMeter(rapl_root=tmp_path, use_nvml=False).start()
    # package 0 wraps: 900000 -> 1000000 (max) -> 0 -> 150000 = 250001 uJ; package 1 adds 2 J
    fake_rapl(tmp_path, {"intel-rapl:0": (150_000, 1_000_000), "intel-rapl:1": (7_000_000, 10**9)})
    reading = meter.stop()
    assert reading.sources == {"cpu": "rapl"} and not reading.estimated
    assert reading.joules == pytest.approx(0.250001 + 2.0)
    assert "whole CPU packages" in reading.assumptions[0]


def test_without_counters_the_estimate_is_cpu_time_times_the_assumed_watts(tmp_path, monkeypatch):
    monkeypatch.setenv(WATTS_ENV, "10")
    meter = EnergyMeter(rapl_root=tmp_path / "none", use_nvml=False).start()
    busy(0.2)
    reading = meter.stop()
    assert reading.estimated and reading.sources == {"cpu": "estimate"}
    assert reading.cpu_seconds >= 0.15
    assert reading.joules == pytest.approx(10 * reading.cpu_seconds)
    assert "estimate: 10 W per busy core" in reading.assumptions[0]


@pytest.mark.parametrize("value", ["abc", "0", "-3", "nan"])
def test_a_bad_watts_override_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv(WATTS_ENV, value)
    with pytest.raises(ValueError, match=WATTS_ENV):
        watts_per_core()


def test_readings_add_up_and_round_trip_through_json_dicts():
    a = EnergyReading(2.0, 1.0, 0.5, {"cpu": "estimate"}, {"cpu": 2.0}, True, "x", ["note"])
    b = EnergyReading(3.0, 2.0, 0.7, {"cpu": "estimate", "gpu": "nvml"}, {"cpu": 1.0, "gpu": 2.0}, True, "y", ["other"])
    total = a + b
    assert total.joules == 5.0 and total.component_joules == {"cpu": 3.0, "gpu": 2.0}
    assert total.seconds == 3.0 and total.cpu_seconds == pytest.approx(1.2)
    assert total.assumptions == ["note", "other"] and total.scope == "x, then y"
    assert EnergyReading.from_dict(total.to_dict()) == total


def test_process_tree_counts_the_cpu_time_and_memory_of_children():
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.5\n"
                              "while time.process_time() < end: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while tree_cpu_seconds(child.pid) < 0.4:
            assert time.monotonic() < deadline, "child never used its 0.5 s of CPU"
            time.sleep(0.05)
        assert child.pid in process_tree(os.getpid())
        assert tree_cpu_seconds(os.getpid()) >= tree_cpu_seconds(child.pid) >= 0.4
        assert tree_rss_bytes(os.getpid()) > tree_rss_bytes(child.pid) > 1_000_000
    finally:
        child.kill()
        child.wait()
    assert child.pid not in process_tree(os.getpid())


def test_nvml_counter_is_used_where_a_gpu_exposes_one():
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py not installed (GPU extras: make venv GPU=1)")
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as error:
        pytest.skip(f"no NVIDIA driver here: {error}")
    if count == 0:
        pytest.skip("NVML sees no GPU")
    meter = EnergyMeter(use_nvml=True).start()
    busy(0.1)
    reading = meter.stop()
    assert reading.sources.get("gpu") == "nvml" and reading.component_joules["gpu"] >= 0
