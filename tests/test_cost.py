"""Cost accounting: energy measured (NVML, zeus, RAPL) or estimated, time per phase."""
import sys
import time
import types

import pytest

from dance.engine import cost
from dance.engine.cost import (
    J_PER_BYTE,
    J_PER_FLOP,
    EnergyMeter,
    PhaseTimer,
    estimate_energy_joules,
)
from dance.errors import DanceError


def write_zone(root, name, energy_uj, max_range_uj=1_000_000):
    zone = root / name
    zone.mkdir(exist_ok=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range_uj}\n")


@pytest.fixture
def no_counters(monkeypatch, tmp_path):
    """A machine with no energy counter at all: no RAPL, no pynvml, no zeus."""
    monkeypatch.setattr(cost, "RAPL_ROOT", tmp_path / "no-powercap")
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "zeus", None)
    monkeypatch.setitem(sys.modules, "zeus.monitor", None)


def test_estimate_is_linear_in_gflops_and_bytes():
    one = estimate_energy_joules(1.0, 0.0, "cpu")
    assert one == pytest.approx(1e9 * J_PER_FLOP["cpu"])
    assert estimate_energy_joules(250.0, 0.0, "cpu") == pytest.approx(250 * one)
    assert estimate_energy_joules(0.0, 1e9, "cuda") == pytest.approx(1e9 * J_PER_BYTE["cuda"])
    assert estimate_energy_joules(10.0, 1e6, "cuda:1") == pytest.approx(
        10e9 * J_PER_FLOP["cuda"] + 1e6 * J_PER_BYTE["cuda"])
    # A GPU spends far less energy per FLOP than a CPU.
    assert J_PER_FLOP["cuda"] < J_PER_FLOP["cpu"]
    with pytest.raises(DanceError, match="tpu"):
        estimate_energy_joules(1.0, 0.0, "tpu")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_meter_falls_back_to_estimate_without_counters(no_counters, device):
    meter = EnergyMeter(device)
    assert meter.kind == "estimated"
    meter.start()
    meter.add_estimate(gflops=100.0, bytes_moved=2e9)
    meter.add_estimate(gflops=50.0)
    meter.stop()
    expected = estimate_energy_joules(150.0, 2e9, device)
    assert meter.joules == pytest.approx(expected)
    assert meter.to_json() == {"energy_joules": pytest.approx(expected),
                               "energy_kind": "estimated", "energy_source": "estimate",
                               "estimated_joules": pytest.approx(expected)}


def test_rapl_counts_packages_across_phases_and_wrap_around(monkeypatch, tmp_path):
    monkeypatch.setattr(cost, "RAPL_ROOT", tmp_path)
    write_zone(tmp_path, "intel-rapl:0", 990_000)  # near the 1 J wrap point
    write_zone(tmp_path, "intel-rapl:1", 100_000)
    write_zone(tmp_path, "intel-rapl:0:0", 5_000)  # a sub-zone of package 0: not added again
    meter = EnergyMeter("cpu")
    assert (meter.kind, meter.source) == ("measured", "rapl")

    meter.start()
    write_zone(tmp_path, "intel-rapl:0", 40_000)  # wrapped: 10_000 + 40_000 uJ spent
    write_zone(tmp_path, "intel-rapl:1", 300_000)  # 200_000 uJ
    write_zone(tmp_path, "intel-rapl:0:0", 900_000)
    meter.stop()
    assert meter.joules == pytest.approx(0.25)

    write_zone(tmp_path, "intel-rapl:0", 500_000)  # spent between phases: not counted
    meter.start()
    write_zone(tmp_path, "intel-rapl:0", 600_000)  # 0.1 J in the second phase
    meter.stop()
    assert meter.joules == pytest.approx(0.35)

    # Estimates are still kept beside the measurement, but joules is what was measured.
    meter.add_estimate(gflops=1000.0)
    assert meter.joules == pytest.approx(0.35)
    assert meter.estimated_joules == pytest.approx(estimate_energy_joules(1000.0, 0.0, "cpu"))


def test_rapl_polling_thread_catches_every_wrap(monkeypatch, tmp_path):
    # Three wraps during one phase: start/stop alone would see one; polling sees each.
    monkeypatch.setattr(cost, "RAPL_ROOT", tmp_path)
    write_zone(tmp_path, "intel-rapl:0", 0)
    meter = EnergyMeter("cpu", poll_seconds=0.01)
    meter.start()
    spent = 0.0
    for reading, joules in ((600_000, 0.6), (100_000, 0.5), (700_000, 0.6), (200_000, 0.5)):
        write_zone(tmp_path, "intel-rapl:0", reading)
        spent += joules
        deadline = time.monotonic() + 10.0  # wait for the poller to see this reading
        while meter.measured_joules < spent - 1e-9 and time.monotonic() < deadline:
            time.sleep(0.005)
    meter.stop()
    assert meter.joules == pytest.approx(2.2)


def test_unreadable_rapl_falls_back_to_estimate(monkeypatch, tmp_path):
    monkeypatch.setattr(cost, "RAPL_ROOT", tmp_path)
    write_zone(tmp_path, "intel-rapl:0", 100)
    # What a kernel that hides energy_uj from non-root users looks like to us.
    (tmp_path / "intel-rapl:0" / "energy_uj").unlink()
    (tmp_path / "intel-rapl:0" / "energy_uj").mkdir()
    meter = EnergyMeter("cpu")
    assert meter.kind == "estimated"


def fake_pynvml(readings_mj, fail=False):
    """A stand-in for nvidia-ml-py: a total-energy counter that returns ``readings_mj`` in turn."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def energy(handle):
        assert handle == ("handle", 1)
        if fail:
            raise NVMLError("Not Supported")
        return readings_mj.pop(0)

    def by_uuid(uuid):
        raise NVMLError("Not Found")

    mod.NVMLError = NVMLError
    mod.nvmlInit = lambda: None
    mod.nvmlDeviceGetHandleByUUID = by_uuid
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    mod.nvmlDeviceGetTotalEnergyConsumption = energy
    return mod


def test_nvml_energy_counter_on_cuda(monkeypatch):
    # Readings: at construction, start, stop, start, stop (mJ since the driver loaded).
    readings = [1_000, 2_000, 7_000, 9_000, 9_500]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(readings))
    meter = EnergyMeter("cuda:1")
    assert (meter.kind, meter.source) == ("measured", "nvml")
    meter.start()
    meter.stop()
    assert meter.joules == pytest.approx(5.0)
    meter.start()
    meter.stop()
    assert meter.joules == pytest.approx(5.5)
    assert not readings


def test_nvml_not_supported_falls_back_to_estimate(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], fail=True))
    monkeypatch.setitem(sys.modules, "zeus", None)
    monkeypatch.setitem(sys.modules, "zeus.monitor", None)
    meter = EnergyMeter("cuda:1")
    assert meter.kind == "estimated"
    meter.start()
    meter.add_estimate(gflops=20.0)
    meter.stop()
    assert meter.joules == pytest.approx(estimate_energy_joules(20.0, 0.0, "cuda"))


def test_zeus_when_pynvml_is_missing(monkeypatch):
    windows = []

    class Measurement:
        def __init__(self, joules):
            self.gpu_energy = {0: joules}

    class ZeusMonitor:
        def __init__(self, gpu_indices):
            assert gpu_indices == [0]

        def begin_window(self, key):
            windows.append(key)

        def end_window(self, key):
            assert windows.pop() == key
            return Measurement(3.0)

    zeus = types.ModuleType("zeus")
    monitor = types.ModuleType("zeus.monitor")
    monitor.ZeusMonitor = ZeusMonitor
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "zeus", zeus)
    monkeypatch.setitem(sys.modules, "zeus.monitor", monitor)
    meter = EnergyMeter("cuda")
    assert (meter.kind, meter.source) == ("measured", "zeus")
    meter.start()
    meter.stop()
    assert meter.joules == pytest.approx(3.0)


def test_phase_timer_sums_each_phase():
    timer = PhaseTimer()
    for _ in range(2):
        with timer.phase("data"):
            time.sleep(0.02)
        with timer.phase("forward_backward"):
            time.sleep(0.05)
    with pytest.raises(ValueError), timer.phase("eval"):
        raise ValueError("a failing phase is still timed")
    seconds = timer.to_json()
    assert list(seconds) == ["data", "forward_backward", "eval"]
    assert 0.04 <= seconds["data"] < 0.5
    assert 0.10 <= seconds["forward_backward"] < 0.6
    assert seconds["eval"] < 0.1


def test_a_run_off_its_plan_says_why_in_numbers():
    from dance.engine.cost import CostLedger
    on = CostLedger(train_gflops=50.5, full_gflops=100.0, train_mpixels=5.0, full_mpixels=10.0)
    assert on.off_plan(0.5) is None
    off = CostLedger(train_gflops=52.9, full_gflops=100.0, train_mpixels=5.0, full_mpixels=10.0)
    note = off.off_plan(0.5)
    assert note.startswith("realised cost 0.529 is +5.8% off the plan 0.500")
    assert "in input pixels it is 0.500 (+0.0%" in note and "1.058x what pixels predict" in note
