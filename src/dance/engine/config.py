"""Run configuration (docs/cli.md#config): YAML, validated on load, dotted overrides.

A config file may start with ``base: [other.yaml, ...]`` (paths relative to the file); bases are
merged first, in order, then the file itself, so the ready configs under ``configs/`` share their
dataset, model and schedule parts instead of copying them. Unknown keys and bad values are errors
that name the key, before any work starts.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dance.data.complexity import INDICATORS
from dance.data.datasets import DATASETS, SPLITS
from dance.errors import DanceError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(_Strict):
    name: Literal[DATASETS] = "synth"
    root: str = "data/synth"
    train_split: Literal[SPLITS] = "train"
    val_split: Literal[SPLITS] = "val"


class ModelConfig(_Strict):
    name: str = "deeplabv3plus_mbv2"
    pretrained_backbone: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # builder kwargs, e.g. aspp_channels

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from dance.network.registry import list_models
        if v not in list_models():
            raise ValueError(f"unknown model {v!r}; choose one of {', '.join(list_models())}")
        return v


class TrainConfig(_Strict):
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(8, ge=1)
    crop: tuple[int, int] = (128, 256)
    scale_range: tuple[float, float] = (0.5, 2.0)  # random-scale augmentation
    jitter_follows_scale: bool = False  # at data-plan scale s, the range shrinks towards 1 by s
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    poly_power: float = Field(0.9, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"  # adamw: betas (0.9, 0.999), decoupled decay
    lr_schedule: Literal["poly", "cosine", "linear"] = "poly"  # decay to 0 over the run
    warmup_fraction: float = Field(0.0, ge=0, lt=0.5)  # linear warm-up share of the run's steps
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    workers: int = Field(2, ge=0)
    # CPU threads of this run's math (torch.set_num_threads); null keeps torch's default.
    # Small models on few cores often train faster on one thread (BENCHMARKS.md, "Threads")
    threads: int | None = Field(None, ge=1)
    # JPEG images decoded at the smallest DCT scale (eighths) that covers the plan's scale
    # (libjpeg's scaled decoding): a scale-0.5 sample decodes a quarter of the pixels. Masks are
    # always decoded whole, so labels are exact. PNG and other formats are decoded whole
    reduced_decode: bool = True
    # CUDA only: channels-last memory layout for the model and its inputs (faster convolutions
    # with bf16 on tensor cores), and one forward/backward per input shape before training, so
    # cuDNN's algorithm search (cudnn.benchmark) is not charged to the first steps of each scale
    channels_last: bool = True
    warmup_shapes: bool = True
    # synchronise the device at every phase boundary, so phase_seconds split a CUDA step into
    # data, forward, backward, optimizer and accounting exactly (costs a little speed); the CPU
    # has nothing to synchronise
    profile: bool = False
    eval_mode: Literal["whole", "slide"] = "whole"
    eval_crop: tuple[int, int] | None = None  # sliding window; default: the training crop
    eval_every: int = Field(0, ge=0)  # epochs between validations during training; 0 = end only
    on_bad_sample: Literal["error", "skip"] = "error"
    # train this fraction of the recipe's optimizer steps (fractional epochs allowed), the
    # learning-rate schedule compressed to span them: the "short" run kind of compare
    steps_fraction: float = Field(1.0, gt=0, le=1)

    @field_validator("crop", "eval_crop")
    @classmethod
    def _crop(cls, v):
        if v is not None and (v[0] < 8 or v[1] < 8):
            raise ValueError(f"crop must be at least 8x8, got {list(v)}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v


class DataSlimmingConfig(_Strict):
    enabled: bool = True
    indicator: Literal[INDICATORS] = "si"
    budget: float = 0.5
    adaptive: bool = True
    hardness_alpha: float = Field(0.5, ge=0, le=1)  # blend of hardness rank into complexity rank
    hardness_momentum: float = Field(0.7, ge=0, lt=1)  # EMA of per-image training loss
    # the plan kind: "dance" (complexity-guided), or a control that spends the same budget
    # without guidance: "uniform" (every image at sqrt(budget)), "progressive" (one scale per
    # epoch, growing), "shuffled" (dance's plan permuted across images)
    policy: Literal["dance", "uniform", "progressive", "shuffled"] = "dance"
    schedule: Literal["static", "progressive"] = "progressive"
    # dropping the least complex images first cost 1.35 mIoU against downsampling only, beyond
    # the seed spread (BENCHMARKS.md, "Ablations"): in a short run, steps are scarce
    drop: bool = False
    downsample: bool = True
    weighting: bool = True
    # keep probability the least complex half may fall to before any image is downsampled
    keep_floor: float = Field(0.5, gt=0, le=0.5)
    # 0: each epoch mixes the scales the budget rule gives; 1 or 2: coarse scales, every image
    # at one of the (one or two) scales that bracket the epoch's budget, complex images higher.
    # One scale per epoch measured best (BENCHMARKS.md, "Ablations, second round"): +0.79 mIoU
    # over two at 24 epochs, beyond the seed spread; the complexity then guides the loss weights
    scales_per_epoch: Literal[0, 1, 2] = 1
    # progressive schedule (and the progressive control): the share of the last epochs trained
    # at full scale, the resolution of evaluation (FixRes); the ramp before spends the rest
    final_full: float = Field(0.0, ge=0, lt=1)
    # stop where the batches' real input pixels (crops rounded to multiples of 8, small buckets
    # padded) reach budget x the plain run's, so every run of a compare spends the same compute
    trim_to_budget: bool = True
    # at scale s a batch holds about batch_size / s² images (the pixels of a full-scale batch),
    # the learning rate scaled by the linear rule (Multigrid training, Wu et al. 2020)
    multigrid: bool = False
    # the budget is the whole run's training FLOPs, network slimming's saving included: the data
    # plan is made at budget / the network's expected mean FLOPs fraction over training, and the
    # trim counts the FLOPs of the model as it is (docs/method.md#joint-budget)
    joint_budget: bool = True

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: float) -> float:
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"budget must be in (0, 1], got {v!r}")
        return float(v)


class NetworkSlimmingConfig(_Strict):
    enabled: bool = True
    lambda_: float = Field(1e-4, ge=0, alias="lambda")
    prune_at: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7])
    network_budget: float | None = None
    gate_threshold: float = Field(0.1, ge=0, le=1)
    importance: Literal["loss", "gate"] = "loss"
    loss_tolerance: float = Field(0.01, ge=0)  # probe-loss rise counted as negligible
    max_removals_per_point: int = Field(1, ge=1)  # per module, so slimming is progressive
    probe_batches: int = Field(1, ge=1)  # held-out batches per importance measurement
    # channel slimming (docs/method.md#channel-slimming): with a network_budget, the budget is met
    # by removing channel groups and branches together; channel_lambda weighs the cost-aware L1
    # term on the groups' BatchNorm scales (applied only when there is a budget to meet)
    channels: bool = True
    channel_lambda: float = Field(1e-4, ge=0)
    channel_importance: Literal["taylor", "bn_scale"] = "taylor"

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("prune_at")
    @classmethod
    def _prune_at(cls, v: list[float]) -> list[float]:
        if any(not 0 < p < 1 for p in v):
            raise ValueError(f"prune_at fractions must lie in (0, 1), got {v}")
        return sorted(v)

    @field_validator("network_budget")
    @classmethod
    def _nb(cls, v):
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"network_budget must be in (0, 1] or null, got {v!r}")
        return v


class RunConfig(_Strict):
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data_slimming: DataSlimmingConfig = Field(default_factory=DataSlimmingConfig)
    network_slimming: NetworkSlimmingConfig = Field(default_factory=NetworkSlimmingConfig)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise DanceError(f"{path}: config bases form a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise DanceError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise DanceError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DanceError(f"{path}: a config must be a mapping of sections")
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict = {}
    for b in bases:
        merged = _merge(merged, _read_yaml(path.parent / b, seen + (path,)))
    return _merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise DanceError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise DanceError(f"override {text!r}: key must be dotted, like train.epochs")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DanceError(f"override {text!r}: {p} is not a section")
        node[parts[-1]] = value
    return data


def _format_error(source: str, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key {loc!r}"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{source}: {loc}: {msg} (got {e.get('input')!r})"


def config_from_dict(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise DanceError(_format_error(source, err)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read, merge bases, apply ``key=value`` overrides and validate."""
    data = _read_yaml(Path(path)) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    return config_from_dict(data, str(path) if path is not None else "config")
