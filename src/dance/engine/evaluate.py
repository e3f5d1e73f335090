"""Evaluation and inference cost (docs/method.md#cost-accounting, docs/cli.md#eval-json).

* ``evaluate``: mIoU / per-class IoU / pixel accuracy over a dataset split, whole-image or
  sliding-window, optionally at a per-image input resolution; DDP-aware.
* ``measure_inference``: params, GFLOPs, median latency and peak activation memory of one
  inference at a given input size.
* ``AdaptiveResolution`` and ``miou_flops_curve``: complexity-guided inference resolution
  (docs/method.md#adaptive-inference-resolution, beyond the paper) and the
  mIoU-vs-inference-FLOPs curve of the report.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dance.data.complexity import IMAGE_INDICATORS, check_indicators, spatial_complexity
from dance.data.labels import IGNORE_INDEX
from dance.data.transforms import EvalTransform
from dance.engine.metrics import ConfusionMatrix
from dance.engine.runtime import autocast, unwrap_model
from dance.errors import DanceError
from dance.network.flops import count_gflops

# Sliding-window tiles run through the model this many at a time.
_WINDOW_BATCH = 4


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[nn.Module]:
    """The bare model (out of DDP/DataParallel/``torch.compile`` wrappers) in eval mode under
    no_grad; its train/eval mode is restored afterwards, so a trainer can evaluate mid-run."""
    # Ranks see different image counts, so a DDP forward (which may sync buffers) could hang.
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield net
    finally:
        net.train(was_training)


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(v), int(v)) if isinstance(v, (int, np.integer)) else tuple(int(x) for x in v)
    if len(pair) != 2 or min(pair) < 1:
        raise DanceError(f"{name} must be a positive int or (height, width), got {v!r}")
    return pair


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Top (or left) edges of the windows covering ``size`` pixels; the last window ends at the
    border. An image smaller than the crop is one window of its own size."""
    if size <= crop:
        return [0]
    n = math.ceil((size - crop) / stride) + 1
    return sorted(set(np.minimum(np.arange(n) * stride, size - crop).tolist()))


def _slide_logits(net: nn.Module, x: torch.Tensor, crop: tuple[int, int],
                  stride: tuple[int, int]) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """Logits of ``x`` (1x3xHxW) from overlapping windows, averaged where they overlap; also the
    number of windows and the window shape (for the FLOPs count)."""
    h, w = x.shape[-2:]
    th, tw = min(crop[0], h), min(crop[1], w)
    boxes = [(y, xx) for y in _window_starts(h, crop[0], stride[0])
             for xx in _window_starts(w, crop[1], stride[1])]
    total = None
    count = torch.zeros((1, 1, h, w), device=x.device)
    for i in range(0, len(boxes), _WINDOW_BATCH):
        chunk = boxes[i:i + _WINDOW_BATCH]
        tiles = torch.cat([x[..., y:y + th, xx:xx + tw] for y, xx in chunk])
        out = net(tiles).float()
        if out.shape[-2:] != (th, tw):  # a model that predicts at a stride of its input
            out = F.interpolate(out, size=(th, tw), mode="bilinear", align_corners=False)
        if total is None:
            total = torch.zeros((1, out.shape[1], h, w), device=x.device)
        for (y, xx), o in zip(chunk, out):
            total[0, :, y:y + th, xx:xx + tw] += o
            count[..., y:y + th, xx:xx + tw] += 1
    return total / count, len(boxes), (th, tw)


def _predict(net: nn.Module, x: torch.Tensor, mode: str, crop: tuple[int, int] | None,
             stride: tuple[int, int] | None) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """Logits of ``x`` (1x3xHxW), the number of forward windows and their shape."""
    if mode == "whole":
        return net(x).float(), 1, tuple(x.shape[-2:])
    return _slide_logits(net, x, crop, stride)


def default_stride(crop: tuple[int, int]) -> tuple[int, int]:
    """Sliding windows every two thirds of the crop, as mmsegmentation does."""
    return max(1, math.ceil(crop[0] * 2 / 3)), max(1, math.ceil(crop[1] * 2 / 3))


def infer_image(net: nn.Module, x: torch.Tensor, mode: str, crop: tuple[int, int] | None,
                stride: tuple[int, int] | None, scale: float = 1.0, what: str = "the image"
                ) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """Logits of one image ``x`` (1x3xHxW) at its own size: run at ``scale`` (bilinear,
    antialiased) whole or by windows, then upsampled back; also the number of forward windows
    and their shape."""
    if scale <= 0:
        raise DanceError(f"resolution policy gave scale {scale} for {what}; "
                         "scales must be positive")
    h, w = x.shape[-2:]
    if scale != 1.0:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    logits, windows, window = _predict(net, x, mode, crop, stride)
    if logits.shape[-2:] != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits, windows, window


def evaluate(model: nn.Module, dataset, device: str | torch.device = "cpu", mode: str = "whole",
             crop: int | Sequence[int] | None = None, stride: int | Sequence[int] | None = None,
             amp: bool = False, progress: bool = True, rank: int = 0, world_size: int = 1,
             resolution: Callable[[np.ndarray], float] | None = None) -> dict:
    """mIoU (points), per-class IoU and pixel accuracy of ``model`` on ``dataset``.

    ``mode``: "whole" runs each image in one pass; "slide" runs windows of ``crop`` (int or
    (h, w)) every ``stride`` pixels (default two thirds of the crop, as mmsegmentation does),
    averaging the logits where windows overlap. Under DDP each rank evaluates images
    ``rank::world_size`` and the confusion matrix is all-reduced, so every rank returns the
    same numbers.

    ``resolution`` (docs/method.md#adaptive-inference-resolution): a callable
    ``image (HxWx3 uint8) -> scale``, e.g.
    ``AdaptiveResolution``. The image is resized by that scale (bilinear, antialiased), the
    logits are upsampled back to full size before the argmax, and the result gains
    ``mean_gflops`` (model FLOPs per image at the scaled size; the indicator's own cost, a Sobel
    pass, is not counted) and ``scales`` (histogram "scale" -> number of images).
    """
    if mode not in ("whole", "slide"):
        raise DanceError(f"evaluation mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide":
        if crop is None:
            raise DanceError("sliding-window evaluation needs a crop size")
        crop = _pair(crop, "crop")
        stride = _pair(stride, "stride") if stride is not None else default_stride(crop)
    device = torch.device(device)
    model.to(device)
    transform = EvalTransform()
    cm = ConfusionMatrix(dataset.num_classes, ignore_index=IGNORE_INDEX, device=device)
    scales: list[float] = []
    gflops: list[float] = []
    indices = range(rank, len(dataset), world_size)
    bar = tqdm(indices, desc="eval", unit="img", disable=True if not progress or rank else None)
    with _inference(model) as net:
        for i in bar:
            image, mask = dataset.load(i)
            x, target = transform(image, mask)
            x = x.unsqueeze(0).to(device)
            scale = float(resolution(image)) if resolution is not None else 1.0
            with autocast(device, amp):
                logits, windows, (th, tw) = infer_image(net, x, mode, crop, stride, scale,
                                                        f"image {i}")
            if resolution is not None:  # a plain evaluation does not pay for counting
                gflops.append(windows * count_gflops(net, (1, 3, th, tw)))
            cm.update(logits.argmax(1), target.unsqueeze(0).to(device))
            scales.append(scale)
    if world_size > 1:
        cm.all_reduce()
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, (scales, gflops))
        scales = [s for part, _ in gathered for s in part]
        gflops = [g for _, part in gathered for g in part]
    result = dict(cm.summary(dataset.class_names))
    result["num_images"] = len(scales)
    if resolution is not None:
        result["mean_gflops"] = float(np.mean(gflops)) if gflops else 0.0
        hist = Counter(scales)
        result["scales"] = {f"{s:g}": hist[s] for s in sorted(hist)}
    return result


def _peak_cuda_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes the CUDA caching allocator held for one forward, above what was already
    allocated (weights, the input): the activations and workspaces of the inference."""
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    net(x)
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) - before


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's C++ side prints start/stop and GPU-probe lines straight to fd 2 on a CPU
    machine; they say nothing to a user, so fd 2 points at /dev/null while it runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _peak_cpu_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes allocated on the CPU during one forward, from the profiler's memory events:
    each allocation (+bytes) and free (-bytes), summed in time order; the maximum of that
    running sum. Weights and the input exist before and are not counted."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        # Some torch versions warn that a profiler "clears events at the end of each cycle";
        # this one runs a single cycle.
        warnings.filterwarnings("ignore", message=".*clears events", category=UserWarning)
        with _native_stderr_silenced(), \
                profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            net(x)
    # kineto_results holds every raw allocation/free event; the public ``events()`` tree folds
    # allocations into the op that made them and loses their order.
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    if events:  # older torch (2.3 among them) has start_us only
        events.sort(key=(lambda e: e.start_ns()) if hasattr(events[0], "start_ns")
                    else (lambda e: e.start_us()))
    running = np.cumsum([e.nbytes() for e in events]) if events else np.zeros(1)
    return int(max(running.max(), 0))


def measure_inference(model: nn.Module, input_size: tuple[int, int],
                      device: str | torch.device = "cpu", repeats: int = 20,
                      warmup: int = 3) -> dict:
    """Inference cost of ``model`` on one image of ``input_size`` (H, W) (docs/cli.md#eval-json).

    ``params``: parameter count. ``gflops``: ``count_gflops`` at (1, 3, H, W). ``latency_ms``:
    median over ``repeats`` timed forwards after ``warmup`` untimed ones (CUDA synchronised
    around each). ``peak_memory_mb`` (MiB): peak activation memory of one inference -- on a GPU
    from CUDA's allocator statistics (``max_memory_allocated`` after ``reset_peak_memory_stats``,
    minus what was allocated before), on a CPU from the profiler's memory accounting
    (``torch.profiler`` with ``profile_memory=True``: running sum of allocation and free events
    in time order, its maximum). All labelled "measured".
    """
    if repeats < 1 or warmup < 0:
        raise DanceError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    h, w = _pair(input_size, "input_size")
    device = torch.device(device)
    model.to(device)
    cuda = device.type == "cuda"
    x = torch.rand((1, 3, h, w), generator=torch.Generator().manual_seed(0)).to(device)
    with _inference(model) as net:
        params = sum(p.numel() for p in net.parameters())
        gflops = count_gflops(net, (1, 3, h, w))
        for _ in range(warmup):
            net(x)
        times_ms = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            net(x)
            if cuda:
                torch.cuda.synchronize(device)
            times_ms.append((time.perf_counter() - t0) * 1000.0)
        peak_bytes = _peak_cuda_bytes(net, x) if cuda else _peak_cpu_bytes(net, x)
    return {
        "params": int(params),
        "gflops": float(gflops),
        "latency_ms": float(statistics.median(times_ms)),
        "peak_memory_mb": peak_bytes / 2**20,
        "input_size": [h, w],
    }


class AdaptiveResolution:
    """Complexity-guided inference resolution, beyond the paper
    (docs/method.md#adaptive-inference-resolution).

    The test image is scored with an image-only indicator; thresholds at the ``quantiles`` of
    the *training* scores split the score range into ``len(scales)`` bands, and the image gets
    the scale of its band. Default: three scales (0.5, 0.75, 1.0) and quantiles (1/3, 2/3) --
    the least complex third of (training-like) images runs at half resolution, the middle third
    at 0.75, the most complex third at full resolution. ``scales`` ascending; ``quantiles``
    strictly increasing in (0, 1), one fewer than the scales (default: equal bands).
    """

    def __init__(self, train_scores: np.ndarray, indicator: str = "si",
                 scales: Sequence[float] = (0.5, 0.75, 1.0),
                 quantiles: Sequence[float] | None = None) -> None:
        scores = np.asarray(train_scores, dtype=np.float64).ravel()
        if scores.size == 0 or not np.all(np.isfinite(scores)):
            raise DanceError("adaptive resolution needs a non-empty set of finite training "
                             "complexity scores")
        scales = tuple(float(s) for s in scales)
        if quantiles is None:
            quantiles = tuple(k / len(scales) for k in range(1, len(scales)))
        quantiles = tuple(float(q) for q in quantiles)
        thresholds = np.quantile(scores, quantiles) if quantiles else np.zeros(0)
        self._set(indicator, scales, quantiles, thresholds)

    def _set(self, indicator: str, scales: tuple[float, ...], quantiles: tuple[float, ...],
             thresholds: np.ndarray) -> None:
        check_indicators(indicator)
        if indicator not in IMAGE_INDICATORS:
            raise DanceError(f"indicator {indicator!r} needs labels; inference resolution "
                             f"needs an image-only one: {', '.join(IMAGE_INDICATORS)}")
        if not scales or min(scales) <= 0 or list(scales) != sorted(scales):
            raise DanceError(f"scales must be positive and ascending, got {list(scales)}")
        if len(quantiles) != len(scales) - 1:
            raise DanceError(f"{len(scales)} scales need {len(scales) - 1} quantiles, "
                             f"got {list(quantiles)}")
        q = np.asarray(quantiles, dtype=np.float64)
        if q.size and (q.min() <= 0 or q.max() >= 1 or np.any(np.diff(q) <= 0)):
            raise DanceError(f"quantiles must increase strictly within (0, 1), got {list(q)}")
        self.indicator = indicator
        self.scales = scales
        self.quantiles = quantiles
        self.thresholds = np.asarray(thresholds, dtype=np.float64)

    def scale_for_score(self, score: float) -> float:
        # A score equal to a threshold goes to the band above it (the more complex side).
        return self.scales[int(np.searchsorted(self.thresholds, score, side="right"))]

    def __call__(self, image_uint8: np.ndarray) -> float:
        return self.scale_for_score(spatial_complexity(image_uint8, indicator=self.indicator))

    def to_json(self) -> dict:
        return {"indicator": self.indicator, "scales": list(self.scales),
                "quantiles": list(self.quantiles), "thresholds": self.thresholds.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> AdaptiveResolution:
        try:
            indicator, scales = d["indicator"], tuple(float(s) for s in d["scales"])
            quantiles = tuple(float(q) for q in d["quantiles"])
            thresholds = np.asarray(d["thresholds"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise DanceError(f"adaptive-resolution policy is malformed ({e!r}); expected "
                             "indicator, scales, quantiles, thresholds") from None
        if thresholds.shape != (len(scales) - 1,) or np.any(np.diff(thresholds) < 0):
            raise DanceError(f"adaptive-resolution thresholds {thresholds.tolist()} do not fit "
                             f"scales {list(scales)}")
        obj = cls.__new__(cls)
        obj._set(indicator, scales, quantiles, thresholds)
        return obj


def miou_flops_curve(model: nn.Module, dataset, train_scores: np.ndarray,
                     device: str | torch.device = "cpu",
                     settings: Sequence[float | str] = (0.5, 0.75, 1.0, "adaptive"),
                     indicator: str = "si", **evaluate_kwargs) -> list[dict]:
    """The mIoU-vs-inference-FLOPs curve of the report (docs/method.md#adaptive-inference-resolution).

    ``settings``: fixed scales (every image at that scale) and ``"adaptive"``
    (``AdaptiveResolution`` on ``train_scores`` with ``indicator``). One point per setting:
    ``{"name", "mean_gflops", "miou", "pixel_acc", "scales"}``. ``evaluate_kwargs`` go to
    ``evaluate`` (mode, crop, amp, progress, rank, world_size...).
    """
    points = []
    for setting in settings:
        if setting == "adaptive":
            name, policy = "adaptive", AdaptiveResolution(train_scores, indicator=indicator)
        elif isinstance(setting, (int, float)) and setting > 0:
            name, policy = f"scale {setting:g}", FixedScale(float(setting))
        else:
            raise DanceError(f"curve setting must be a positive scale or 'adaptive', "
                             f"got {setting!r}")
        res = evaluate(model, dataset, device=device, resolution=policy, **evaluate_kwargs)
        points.append({"name": name, "mean_gflops": res["mean_gflops"], "miou": res["miou"],
                       "pixel_acc": res["pixel_acc"], "scales": res["scales"]})
    return points


class FixedScale:
    """A resolution policy that gives every image the same scale."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, image_uint8: np.ndarray) -> float:
        return self.scale


__all__ = ["AdaptiveResolution", "FixedScale", "evaluate", "measure_inference", "miou_flops_curve"]


def eval_fields(model: nn.Module, dataset, device: str | torch.device = "cpu",
                mode: str = "whole", crop: tuple[int, int] | None = None, amp: bool = False,
                progress: bool = True, rank: int = 0, world_size: int = 1,
                resolution: Callable[[np.ndarray], float] | None = None) -> tuple[dict, dict]:
    """The `eval` fields (docs/cli.md#eval-json) of ``model`` on ``dataset`` (accuracy from ``evaluate``, cost
    from ``measure_inference`` at the dataset's image size), and ``evaluate``'s own result."""
    from dance.data.io import image_size
    res = evaluate(model, dataset, device=device, mode=mode, crop=crop, stride=None, amp=amp,
                   progress=progress, rank=rank, world_size=world_size, resolution=resolution)
    size = image_size(dataset.samples[0].image)
    inf = measure_inference(model, size, device=device)
    fields = {"miou": res["miou"], "per_class_iou": res["per_class_iou"],
              "pixel_acc": res["pixel_acc"], "params": inf["params"], "gflops": inf["gflops"],
              "latency_ms": inf["latency_ms"], "input_size": list(size),
              "peak_memory_mb": inf["peak_memory_mb"]}
    return fields, res
