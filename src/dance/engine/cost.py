"""Cost accounting (docs/method.md#cost-accounting): wall-clock per phase and energy, every number labelled.

Energy is *measured* where the machine exposes a counter and *estimated* from FLOPs and bytes
moved everywhere else; ``EnergyMeter.kind`` says which, and a report must carry that label.

* CUDA: NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules since
  the driver loaded; Volta and newer) through ``pynvml`` (the ``nvidia-ml-py`` package, extra
  ``dance[gpu]``), or ``zeus`` (``ZeusMonitor``) where that is installed and ``pynvml`` is not.
  It counts the whole board, so other processes on the same GPU are included; host CPU and DRAM
  energy are not.
* CPU: Linux RAPL (``/sys/class/powercap/intel-rapl:N/energy_uj``, also used by AMD), summed over
  packages; sub-zones (``intel-rapl:N:M``: core, uncore, dram) are parts of a package and are
  not added again. The counter wraps at ``max_energy_range_uj`` (a few hundred kJ, i.e. tens of
  minutes at full load), so a background thread samples it every ``poll_seconds`` and every
  sample adds the wrap-corrected difference. It counts the whole package (every process on it):
  under DDP on one CPU host, measure on one rank only.

Missing library, unsupported GPU or unreadable sysfs (``energy_uj`` is root-only on kernels
patched for CVE-2020-8694) all fall back to the estimate silently, with a debug log line.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from dance.errors import DanceError
from dance.network.flops import count_gflops

log = logging.getLogger(__name__)

# Energy per FLOP (a multiply-add counts as 2 FLOPs, as FlopCounterMode counts), whole device
# included, at the utilisation segmentation training actually reaches:
# - cuda: measured with NVML on one H200 (training steps, batch 8 at 512x512, idle power
#   included): DeepLabV3-ResNet50 bf16 3.5 pJ/FLOP (133 TFLOP/s); DeepLabV3-MobileNetV3 bf16
#   17 pJ/FLOP, fp32 22 pJ/FLOP (15 TFLOP/s); LR-ASPP-MobileNetV3 bf16 64 pJ/FLOP (5 TFLOP/s);
#   for scale, a bf16 8192^3 matmul at 662 TFLOP/s costs 1.0 pJ/FLOP. Small models are bound by
#   launches and memory, not arithmetic; 10 pJ/FLOP sits between the ResNet and MobileNet
#   numbers, so expect an estimate within about 3x for the built-in models.
# - cpu (not measured here: no RAPL on the machines we had): a 16-32 core AVX-512/AVX2 server
#   part peaks near 1-2 TFLOP/s fp32 at 150-250 W (~0.1-0.15 nJ/FLOP); PyTorch convolutions
#   sustain 30-50 % of that, so about 0.3 nJ/FLOP.
J_PER_FLOP: dict[str, float] = {"cpu": 3.0e-10, "cuda": 1.0e-11}
# Energy per byte moved to or from off-chip memory (Horowitz, ISSCC 2014, "Computing's energy
# problem": DRAM ~1.3-2.6 nJ per 64-bit access; DDR4 today ~15-20 pJ/bit; HBM2 ~4-7 pJ/bit):
# - cpu: DDR4/DDR5 at ~19 pJ/bit = 150 pJ/byte; cuda: HBM2e/HBM3 at ~6 pJ/bit = 50 pJ/byte.
# The per-FLOP numbers above already hold a model's own memory traffic (they are whole-device
# measurements); ``bytes_moved`` is for traffic beyond it (e.g. moving the data set).
J_PER_BYTE: dict[str, float] = {"cpu": 1.5e-10, "cuda": 5.0e-11}

# Root of the Linux power-capping sysfs tree; a module attribute so tests can point it elsewhere.
RAPL_ROOT = Path("/sys/class/powercap")


def _device_kind(device: str | torch.device) -> str:
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind not in J_PER_FLOP:
        raise DanceError(
            f"device {str(device)!r}: no energy constants for it; known: {sorted(J_PER_FLOP)}"
        )
    return kind


def estimate_energy_joules(gflops: float, bytes_moved: float, device_kind: str) -> float:
    """Estimated energy of ``gflops`` GFLOPs and ``bytes_moved`` bytes of memory traffic."""
    kind = _device_kind(device_kind)
    return gflops * 1e9 * J_PER_FLOP[kind] + bytes_moved * J_PER_BYTE[kind]


class _Counter(Protocol):
    """An energy counter: ``sample()`` returns the joules spent since its previous call."""

    source: str
    needs_polling: bool

    def sample(self) -> float: ...


class _NvmlCounter:
    source = "nvml"
    needs_polling = False  # a 64-bit millijoule counter does not wrap in practice

    def __init__(self, index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = _nvml_handle(pynvml, index)
        self._last_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def sample(self) -> float:
        now_mj = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        delta_mj, self._last_mj = now_mj - self._last_mj, now_mj
        return delta_mj / 1000.0


def _nvml_handle(pynvml, index: int):
    """The NVML handle of CUDA device ``index``: by UUID, since CUDA_VISIBLE_DEVICES renumbers
    devices and NVML does not; by index where torch cannot tell the UUID."""
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception as e:  # noqa: BLE001 -- no CUDA runtime, old driver: use NVML's order
        log.debug("energy: NVML handle by UUID failed (%s); using index %d", e, index)
        return pynvml.nvmlDeviceGetHandleByIndex(index)


class _ZeusCounter:
    source = "zeus"
    needs_polling = False
    _WINDOW = "dance-energy"

    def __init__(self, index: int) -> None:
        from zeus.monitor import ZeusMonitor

        self._index = index
        self._monitor = ZeusMonitor(gpu_indices=[index])
        self._monitor.begin_window(self._WINDOW)

    def sample(self) -> float:
        measurement = self._monitor.end_window(self._WINDOW)
        self._monitor.begin_window(self._WINDOW)
        return float(sum(measurement.gpu_energy.values()))


class _RaplCounter:
    source = "rapl"
    needs_polling = True

    def __init__(self, root: Path) -> None:
        # Top-level zones are packages ("intel-rapl:0"); "intel-rapl:0:1" are parts of one.
        zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not zones:
            raise OSError(f"no RAPL package zones under {root}")
        self._energy_files = [z / "energy_uj" for z in zones]
        self._ranges_uj = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        self._last_uj = self._read()

    def _read(self) -> list[int]:
        return [int(f.read_text()) for f in self._energy_files]

    def sample(self) -> float:
        now = self._read()
        delta_uj = 0
        for last, cur, wrap in zip(self._last_uj, now, self._ranges_uj):
            # The counter restarts from 0 after max_energy_range_uj.
            delta_uj += cur - last if cur >= last else cur + wrap - last
        self._last_uj = now
        return delta_uj / 1e6


def _open_counter(device: torch.device) -> _Counter | None:
    """The first energy counter this machine offers for ``device``, or None."""
    if device.type == "cuda":
        index = device.index if device.index is not None else 0
        for counter in (_NvmlCounter, _ZeusCounter):
            try:
                return counter(index)
            except Exception as e:  # noqa: BLE001 -- ImportError, NVMLError (unsupported, ...)
                log.debug("energy: %s unavailable for %s: %s", counter.source, device, e)
    elif device.type == "cpu":
        try:
            return _RaplCounter(RAPL_ROOT)
        except (OSError, ValueError) as e:
            log.debug("energy: RAPL unavailable: %s", e)
    return None


class EnergyMeter:
    """Energy of the work between ``start()`` and ``stop()``, over any number of phases.

    ``joules`` is the measured total where a counter exists (``kind == "measured"``), else the
    sum of ``add_estimate`` calls (``kind == "estimated"``). Call ``add_estimate`` for every step
    either way: ``estimated_joules`` is then always there to set beside the measurement.
    """

    def __init__(self, device: str | torch.device, poll_seconds: float | None = 10.0) -> None:
        self.device = torch.device(device)
        self.device_kind = _device_kind(self.device.type)
        self.measured_joules = 0.0
        self.estimated_joules = 0.0
        self._counter = _open_counter(self.device)
        self._poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._running = False
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "measured" if self._counter is not None else "estimated"

    @property
    def source(self) -> str:
        return self._counter.source if self._counter is not None else "estimate"

    @property
    def joules(self) -> float:
        return self.measured_joules if self._counter is not None else self.estimated_joules

    def _sample(self) -> float:
        try:
            return self._counter.sample()
        except Exception as e:  # noqa: BLE001 -- a counter that stops answering must not stop a run
            log.debug("energy: %s sample failed: %s", self._counter.source, e)
            return 0.0

    def _accumulate(self) -> None:
        with self._lock:
            self.measured_joules += self._sample()

    def _poll(self) -> None:
        while not self._stop_event.wait(self._poll_seconds):
            self._accumulate()

    def start(self) -> None:
        if self._counter is None or self._running:
            return
        with self._lock:
            self._sample()  # drop what was spent before this phase
        self._running = True
        if self._counter.needs_polling and self._poll_seconds:
            self._stop_event.clear()
            self._thread = threading.Thread(target=self._poll, name="dance-energy", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join()
            self._thread = None
        self._accumulate()

    def add_estimate(self, gflops: float, bytes_moved: float = 0.0) -> None:
        """Add the estimated energy of ``gflops`` GFLOPs and ``bytes_moved`` bytes of traffic."""
        self.estimated_joules += estimate_energy_joules(gflops, bytes_moved, self.device_kind)

    def to_json(self) -> dict:
        return {
            "energy_joules": self.joules,
            "energy_kind": self.kind,
            "energy_source": self.source,
            "estimated_joules": self.estimated_joules,
        }


@dataclass
class CostLedger:
    """Training FLOPs of a run as it ran, and as the plain run would have spent them.

    ``train_gflops`` is what the steps cost on the model as it was at each step (a slimmed
    network's later steps are cheaper). The data plan's cost is priced on the architecture the run
    started with (``reference``), so network slimming does not count towards it:
    ``plan_gflops`` is every step at its real shape on that architecture, ``full_gflops`` every
    step at the full crop scaled to "every image kept" of the ``epochs_trained``, and during a run
    ``realised_cost = plan_gflops / full_gflops`` is its cost so far as a fraction of a plain run
    of as many epochs. ``plain_scale``, the recipe's
    epochs over the epochs trained (the trainer sets it for the final count of a run that
    trained fewer), makes it the fraction of a plain run of the whole recipe
    (see docs/method.md#cost-accounting). ``train_units`` counts what was trained in images at
    the full crop (each image weighted by its FLOPs over the full crop's), the currency in which
    a run is trimmed to its budget. Counting is measurement, not training: its seconds are kept
    apart (``accounting_seconds``) and out of ``train_seconds``.
    """

    train_gflops: float = 0.0
    full_gflops: float = 0.0
    plan_gflops: float | None = None  # None: as train_gflops (older checkpoints priced the
    # plan on the model as it ran)
    images_seen: int = 0
    accounting_seconds: float = 0.0
    # the same two totals in input pixels: where FLOPs and pixels part, the shapes are to blame
    # (strided layers round small inputs up), where pixels and the plan part, the sampling is
    train_mpixels: float = 0.0
    full_mpixels: float = 0.0
    train_units: float = 0.0
    actual_units: float = 0.0  # the same, at the FLOPs of the model as it was (joint budget)
    epochs_trained: float = 0.0  # fractional: a run trimmed to its budget stops mid-epoch
    plain_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.plan_gflops is None:
            self.plan_gflops = self.train_gflops

    def add_step(self, model: torch.nn.Module, batch_shape: tuple[int, ...],
                 full_hw: tuple[int, int], full_factor: float,
                 reference: torch.nn.Module | None = None) -> None:
        """Charge one optimizer step on a batch of ``batch_shape`` (N, C, H, W) of ``model``;
        the plan's cost is priced on ``reference`` (default: ``model``)."""
        t0 = time.perf_counter()
        n, _, h, w = batch_shape
        reference = model if reference is None else reference
        step = count_gflops(model, (1, 3, h, w), backward=True)
        planned = count_gflops(reference, (1, 3, h, w), backward=True)
        full = count_gflops(reference, (1, 3, *full_hw), backward=True)
        self.train_gflops += step * n
        self.plan_gflops += planned * n
        self.full_gflops += full * n * full_factor
        self.train_units += n * planned / full
        self.actual_units += n * step / full
        self.accounting_seconds += time.perf_counter() - t0
        self.images_seen += n
        self.train_mpixels += n * h * w / 1e6
        self.full_mpixels += n * full_hw[0] * full_hw[1] * full_factor / 1e6

    @property
    def realised_cost(self) -> float:
        return self.plan_gflops / max(self.full_gflops * self.plain_scale, 1e-12)

    @property
    def realised_pixel_cost(self) -> float:
        return self.train_mpixels / max(self.full_mpixels * self.plain_scale, 1e-12)

    @property
    def total_cost(self) -> float:
        """The run's training FLOPs as they were (a slimmed network's steps cheaper) over the
        plain run's: what a joint budget bounds."""
        return self.train_gflops / max(self.full_gflops * self.plain_scale, 1e-12)

    def off_plan(self, planned: float, tolerance: float = 0.03) -> str | None:
        """Why the realised cost misses ``planned`` by more than ``tolerance`` (relative), in
        numbers; None when it lands."""
        realised, pixels = self.realised_cost, self.realised_pixel_cost
        if planned <= 0 or abs(realised / planned - 1) <= tolerance:
            return None
        return (f"realised cost {realised:.3f} is {realised / planned - 1:+.1%} off the plan "
                f"{planned:.3f}: in input pixels it is {pixels:.3f} ({pixels / planned - 1:+.1%}: "
                f"crops rounded to multiples of 8 pixels, and the sampling, e.g. small scale "
                f"buckets padded to whole batches), and FLOPs at "
                f"the trained shapes are {realised / max(pixels, 1e-12):.3f}x what pixels "
                f"predict (strided layers round small inputs up)")


class PhaseTimer:
    """Wall-clock seconds per named phase ("data", "forward_backward", "eval", ...), summed over
    every time the phase is entered. On a CUDA device each phase boundary synchronises, so the
    asynchronous kernels of a phase are charged to it and not to the next one."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._cuda = device is not None and torch.device(device).type == "cuda"
        self._device = torch.device(device) if self._cuda else None

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self._device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def to_json(self) -> dict[str, float]:
        return dict(self.seconds)


__all__ = [
    "J_PER_BYTE",
    "J_PER_FLOP",
    "CostLedger",
    "EnergyMeter",
    "PhaseTimer",
    "estimate_energy_joules",
]
