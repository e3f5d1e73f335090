"""Run configuration (docs/cli.md#config): YAML, validated on load, dotted overrides.

A config file may start with ``base: [other.yaml, ...]`` (paths relative to the file); bases are
merged first, in order, then the file itself, so the ready configs (``dance/configs``, also
``configs/`` in a clone; ``--config NAME`` finds them by name) share their
dataset, model and schedule parts instead of copying them. Unknown keys and bad values are errors
that name the key, before any work starts.
"""
from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dance.data.complexity import INDICATORS
from dance.data.datasets import DATASETS, SPLITS
from dance.errors import DanceError

# Upper bounds that no real run reaches but that stop a typo (an extra zero, a negative sign)
# before it allocates the machine away
MAX_CROP_SIDE = 16384
MAX_WORKERS = 256
MAX_SCALE = 8.0
MAX_CONFIG_VALUES = 100_000  # values of one config file once YAML aliases are expanded


class _Strict(BaseModel):
    # NaN and infinity are never a valid setting (lr: .inf would pass "> 0")
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _path_text(v: str | None) -> str | None:
    if v is not None and "\0" in v:
        raise ValueError("a path cannot contain a NUL character")
    return v


class DatasetConfig(_Strict):
    name: Literal[DATASETS] = "synth"
    root: str = "data/synth"
    train_split: Literal[SPLITS] = "train"
    val_split: Literal[SPLITS] = "val"

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        return _path_text(v)


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

    @field_validator("pretrained_backbone")
    @classmethod
    def _pretrained(cls, v: str | None) -> str | None:
        return _path_text(v)

    @model_validator(mode="after")
    def _options(self):
        from dance.network.registry import check_options
        problem = check_options(self.name, self.options)
        if problem is not None:
            raise ValueError(problem)
        return self


class TrainConfig(_Strict):
    epochs: int = Field(4, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=1_000_000)
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
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's seeds are 32-bit
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    workers: int = Field(2, ge=0, le=MAX_WORKERS)
    # CPU threads of this run's math (torch.set_num_threads); null keeps torch's default.
    # Small models on few cores often train faster on one thread (BENCHMARKS.md, "Threads")
    threads: int | None = Field(None, ge=1, le=4096)
    # JPEG images decoded at the smallest DCT scale (eighths) that covers the plan's scale
    # (libjpeg's scaled decoding): a scale-0.5 sample decodes a quarter of the pixels. Masks are
    # always decoded whole, so labels are exact. PNG and other formats are decoded whole
    reduced_decode: bool = True
    # a folder where PNG (and other non-JPEG) images and every mask are decoded once and stored
    # uncompressed, images also at 1/2 and 1/4 size: later epochs read the smallest copy that
    # covers the plan's scale instead of inflating the file again. Keyed by each file's path,
    # size, mtime and ctime (never stale); at most decode_cache_gb, then nothing new is stored
    decode_cache: str | None = None
    decode_cache_gb: float = Field(20.0, gt=0, le=1_000_000)
    # channels-last memory layout for the model and its inputs: true on CUDA (faster
    # convolutions with bf16 on tensor cores); "always" on the CPU too, where oneDNN is faster
    # in it for some models and slower for others (BENCHMARKS.md: the demo's model 7-8% faster,
    # HRNet about 20%, the ResNet PSPNets up to 17% slower), so it is opt-in there; false nowhere
    channels_last: bool | Literal["always"] = True
    # on a CPU, the training forward's convolutions on maps a few pixels high take exact
    # shortcuts (taps that read only padding dropped, 1x1 and depthwise layers as products),
    # where the CPU's convolution backward is slowest: the same values up to the order of sums
    small_map_convs: bool = True
    # CUDA only: one forward/backward per input shape before training, so cuDNN's algorithm
    # search (cudnn.benchmark) is not charged to the first steps of each scale
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

    @field_validator("decode_cache")
    @classmethod
    def _decode_cache(cls, v: str | None) -> str | None:
        if _path_text(v) is not None and Path(v).exists() and not Path(v).is_dir():
            raise ValueError(f"{v} exists and is not a folder")
        return v

    @field_validator("crop", "eval_crop", mode="before")
    @classmethod
    def _size_text(cls, v):
        """``64x128`` as the command line writes sizes, as well as ``[64, 128]``."""
        if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", v):
            return [int(t) for t in re.split(r"[xX]", v)]
        return v

    @field_validator("crop", "eval_crop")
    @classmethod
    def _crop(cls, v):
        if v is not None and (v[0] < 8 or v[1] < 8):
            raise ValueError(f"crop must be at least 8x8, got {list(v)}")
        if v is not None and max(v) > MAX_CROP_SIDE:
            raise ValueError(f"crop sides must be at most {MAX_CROP_SIDE}, got {list(v)}")
        return v

    @field_validator("scale_range")
    @classmethod
    def _scale_range(cls, v):
        lo, hi = v
        if not 0 < lo <= hi <= MAX_SCALE:
            raise ValueError(f"scale_range must be [low, high] with 0 < low <= high <= "
                             f"{MAX_SCALE:g}, got {list(v)}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", v):
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
    # a plan made at a budget of at least drop_above (one that cuts little: a long run whose
    # network is slimmed early keeps 0.86-0.93 of the data cost, the 24-epoch demo recipe 0.71)
    # drops the least complex images' steps instead of downscaling, at mixed scales; applies
    # with drop off and downsample on, and network_slimming.keep_optimizer_state "auto" follows
    # it. null: always as drop and downsample say (docs/method.md#the-long-run-regime)
    drop_above: float | None = Field(0.8, gt=0, le=1)
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
    # a run with a data plan trains round(stretch x train.epochs) epochs, each at budget /
    # stretch of a plain epoch's cost on average: the same training FLOPs, the budget still the
    # fraction of the plain run of train.epochs, spent on more, cheaper steps; dance compare
    # stretches only dance, its controls measured worse stretched (docs/method.md#stretch).
    # 1: as many epochs as the plain run
    stretch: float = Field(1.0, ge=1, le=4)
    # stop where the batches' real input pixels (crops rounded to multiples of 8, small buckets
    # padded) reach budget x the plain run's, so every run of a compare spends the same compute
    trim_to_budget: bool = True
    # at scale s a batch holds about batch_size / s² images (the pixels of a full-scale batch),
    # the learning rate scaled by the linear rule (Multigrid training, Wu et al. 2020)
    multigrid: bool = False
    # the budget is the whole run's training FLOPs, network slimming's saving included: the data
    # plan is made at the budget whose epochs, each priced at the network's expected FLOPs
    # fraction in it, cost `budget`, and the trim counts the FLOPs of the model as it is
    # (docs/method.md#joint-budget)
    joint_budget: bool = True
    # a plan file (dance plan --out, or a run's plan.json) instead of planning from the scores:
    # used by the dance and shuffled policies, which then take its scales, drops and weights
    plan: str | None = None

    @field_validator("plan")
    @classmethod
    def _plan(cls, v: str | None) -> str | None:
        # checked when the config loads, before the dataset is read and scored
        if _path_text(v) is not None and not Path(v).is_file():
            raise ValueError(f"no such plan file: {v!r} (write one with dance plan --out)")
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: float) -> float:
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"budget must be in (0, 1], got {v!r}")
        return float(v)


def prune_window(within: float | None, epochs: int) -> float | None:
    """``network_slimming.prune_within_epochs`` where it moves the pruning points of a run of
    ``epochs`` epochs; None where they stay fractions of the whole run (no window, or one at
    least as long as the run)."""
    return None if within is None or within >= epochs else within


# network_budget: auto is the training budget below this, this above it (measured at 0.3 and 0.5)
AUTO_NETWORK_BUDGET = 0.5
# ... or this, where the slim network trains most of a long run: the pruning points fall in the
# first prune_within_epochs epochs of a longer run, and the data plan would be left little to
# cut (the long-run regime). There it gave the same mIoU as 0.5 from a smaller model on two
# scene families; in the 24-epoch demo recipe it cost a point (docs/method.md#the-long-run-regime)
LONG_RUN_NETWORK_BUDGET = 0.4


class NetworkSlimmingConfig(_Strict):
    enabled: bool = True
    lambda_: float = Field(1e-4, ge=0, alias="lambda")
    prune_at: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7])
    # the points are fractions of the first prune_within_epochs epochs (of all of them in a run
    # no longer than that): a long run is slimmed early and trains its slim network for the
    # rest; null: fractions of the whole run. 32 measured better than null on both scene
    # families of the converged recipe, 3 seeds (docs/method.md#network-slimming)
    prune_within_epochs: float | None = 32.0
    # a fraction of the original model's inference FLOPs, or auto: min(0.5, data_slimming.budget)
    # as the config is loaded (at a training budget of 0.3, 0.3 measured +2.2 and +3.5 mIoU over
    # 0.5 on the demo and converged recipes; docs/method.md#channel-slimming)
    network_budget: float | Literal["auto"] | None = None
    gate_threshold: float = Field(0.1, ge=0, le=1)
    importance: Literal["loss", "gate"] = "loss"
    loss_tolerance: float = Field(0.01, ge=0)  # probe-loss rise counted as negligible
    max_removals_per_point: int = Field(1, ge=1)  # per module, so slimming is progressive
    probe_batches: int = Field(1, ge=1)  # held-out batches per importance measurement
    # the loss the importance of branches and channels is measured on: the training loss's
    # pixel-mean cross-entropy, or the mean over classes of each class's mean cross-entropy,
    # which counts a class of few pixels as mIoU does (docs/method.md#channel-slimming)
    probe_loss: Literal["pixel", "class_balanced"] = "pixel"
    # channel slimming (docs/method.md#channel-slimming): with a network_budget, the budget is met
    # by removing channel groups and branches together; channel_lambda weighs the cost-aware L1
    # term on the groups' BatchNorm scales (applied only when there is a budget to meet)
    channels: bool = True
    channel_lambda: float = Field(1e-4, ge=0)
    channel_importance: Literal["taylor", "taylor_batches", "bn_scale"] = "taylor"
    # the ranking's cost of a channel or branch: its GFLOPs plus this many GFLOPs per million
    # activation elements it moves (written by convolutions and BatchNorms, read by dense
    # convolutions), the memory-bound part of inference time (docs/method.md#channel-cost);
    # 0 ranks by FLOPs alone. The budget is FLOPs either way
    memory_weight: float = Field(0.0, ge=0)
    # keep the sparsity terms on after the last pruning point. Off: nothing is removed after it,
    # and the L1 pull only kills channels of the slim network
    sparsity_after_last_point: bool = False
    # the most of a channel group's width (as training starts) that slimming may remove; 1: no
    # limit, the global ranking decides alone
    max_channel_cut: float = Field(1.0, gt=0, le=1)
    # at the last pruning point, give channels that no longer fire (zero importance on the
    # probe: mostly killed by the L1 term) a small BatchNorm scale back, so they train again
    revive_dead: bool = False
    # the layers a removal slices keep their optimizer state (Adam's moments, SGD's momentum),
    # sliced like their weights; false: they restart from empty state, as every run did before;
    # auto: kept where the data plan cuts little (data_slimming.drop_above applied: a long run),
    # where it measured better, and not in short runs, where it measured worse
    keep_optimizer_state: bool | Literal["auto"] = "auto"

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("prune_at")
    @classmethod
    def _prune_at(cls, v: list[float]) -> list[float]:
        if any(not 0 < p < 1 for p in v):
            raise ValueError(f"prune_at fractions must lie in (0, 1), got {v}")
        return sorted(v)

    @field_validator("prune_within_epochs")
    @classmethod
    def _within(cls, v):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"prune_within_epochs must be a number of epochs > 0 or null, "
                             f"got {v!r}")
        return v

    def points(self, epochs: int) -> list[float]:
        """The pruning points as fractions of a run of ``epochs`` epochs: ``prune_at`` of the
        first ``prune_within_epochs`` epochs, or of all of them when the run is no longer."""
        window = prune_window(self.prune_within_epochs, epochs)
        if window is None:
            return list(self.prune_at)
        return [p * window / epochs for p in self.prune_at]

    @field_validator("network_budget")
    @classmethod
    def _nb(cls, v):
        if v is not None and v != "auto" and not 0 < v <= 1:
            raise ValueError(f"network_budget must be in (0, 1], auto or null, got {v!r}")
        return v


class RunConfig(_Strict):
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data_slimming: DataSlimmingConfig = Field(default_factory=DataSlimmingConfig)
    network_slimming: NetworkSlimmingConfig = Field(default_factory=NetworkSlimmingConfig)

    @model_validator(mode="after")
    def _auto_network_budget(self):
        ns, ds = self.network_slimming, self.data_slimming
        if ns.network_budget == "auto":
            budget = min(AUTO_NETWORK_BUDGET, ds.budget)
            if prune_window(ns.prune_within_epochs, self.train.epochs) is not None \
                    and plans_a_long_run(self, budget):
                budget = min(LONG_RUN_NETWORK_BUDGET, budget)
            ns.network_budget = budget
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


def joint(cfg: RunConfig) -> bool:
    """Whether the budget counts network slimming's saving (``data_slimming.joint_budget`` with
    network slimming towards a ``network_budget``)."""
    ns = cfg.network_slimming
    ds = cfg.data_slimming
    return ds.enabled and ds.joint_budget and ns.enabled and ns.network_budget is not None


def plans_from_scores(ds: DataSlimmingConfig) -> bool:
    """Whether the run makes its own data plan from the complexity scores (the dance and
    shuffled policies, no plan file): the plans the long-run regime may change."""
    return ds.enabled and ds.policy in ("dance", "shuffled") and ds.plan is None


def flat_data_budget(cfg: RunConfig, network_budget: float) -> float:
    """The joint budget's data budget on a flat plan (every epoch the same data cost): the
    training budget over the network's expected mean FLOPs fraction with ``network_budget``,
    capped at 1 (docs/method.md#joint-budget)."""
    from dance.network.slimming import NetworkSlimmer
    ns = cfg.network_slimming
    fraction = NetworkSlimmer.expected_fraction(ns.points(cfg.train.epochs), network_budget)
    return min(1.0, cfg.data_slimming.budget / fraction)


def plans_a_long_run(cfg: RunConfig, network_budget: float) -> bool:
    """Whether a DANCE run of ``cfg`` with ``network_budget`` has its data plan made in the
    long-run regime (docs/method.md#the-long-run-regime), judged before the data is read: with
    a joint budget, its data budget on a flat plan is at least ``data_slimming.drop_above``."""
    from dance.data.plan import drops_instead
    ds = cfg.data_slimming
    return (joint(cfg) and plans_from_scores(ds)
            and drops_instead(ds.drop_above, flat_data_budget(cfg, network_budget), ds.drop,
                              ds.downsample))


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (plain data only: no tags that build Python objects) that also
    refuses a key given twice in one mapping (YAML would keep the last one silently, so a
    config could say ``epochs`` twice and mean either)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found the key {key!r} twice in one mapping", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _safe_load(text: str) -> Any:
    """``text`` parsed by ``_UniqueKeySafeLoader``: ``yaml.safe_load`` with duplicate keys
    refused (what ``yaml.safe_load`` does, with this loader)."""
    loader = _UniqueKeySafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _too_many_values(obj: Any, limit: int) -> bool:
    """True when ``obj`` holds more than ``limit`` values counted as expanded (an alias used
    twice counts twice): what its dump or validation would walk. Stops at ``limit``."""
    count, stack = 0, [obj]
    while stack:
        v = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _load_yaml_text(path: Path) -> Any:
    """One YAML file's content; every way it can fail is one DanceError line naming it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DanceError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise DanceError(f"{path}: is a folder, not a config file") from None
    except OSError as e:
        raise DanceError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DanceError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start}); a config is a YAML text file") from None
    try:
        data = _safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or first
        raise DanceError(f"{path}: invalid YAML{where} ({problem})") from None
    except RecursionError:
        raise DanceError(f"{path}: invalid YAML (nested too deeply)") from None
    if _too_many_values(data, MAX_CONFIG_VALUES):
        raise DanceError(f"{path}: more than {MAX_CONFIG_VALUES:,} values once YAML aliases are "
                         "expanded; a config is a few dozen settings (an alias bomb?)")
    return data


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise DanceError(f"{path}: config bases form a cycle")
    data = _load_yaml_text(path)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise DanceError(f"{path}: a config must be a mapping of sections, got "
                         f"{type(data).__name__}")
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise DanceError(f"{path}: base: expected a config file name or a list of them, got "
                         f"{_short(data.get('base', bases))}")
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
        parsed = _safe_load(value) if value.strip() else None
    except (yaml.YAMLError, RecursionError):
        parsed = value
    if _too_many_values(parsed, MAX_CONFIG_VALUES):
        raise DanceError(f"override {key.strip()}: more than {MAX_CONFIG_VALUES:,} values once "
                         "YAML aliases are expanded")
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


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 60, 60, 6, 6, 2


def _short(value: Any) -> str:
    """A value as it is quoted in a one-line error: at most about 80 characters, whatever its
    size (a YAML alias bomb under a key stays a short line)."""
    text = _REPR.repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _section_keys(loc: tuple) -> list[str]:
    """The valid keys of the section an unknown key ``loc`` sits in (for a suggestion)."""
    model: Any = RunConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        model = getattr(field, "annotation", None)
    fields = getattr(model, "model_fields", None) or {}
    return [f.alias or name for name, f in fields.items()]


def _format_one(e: dict) -> str:
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(e["loc"][-1]), _section_keys(e["loc"]), n=1)
        hint = f" (did you mean {'.'.join([*map(str, e['loc'][:-1]), close[0]])!r}?)" if close else ""
        return f"unknown key {loc!r}{hint}"
    msg = e["msg"].removeprefix("Value error, ")
    if len(msg) > 200:
        msg = msg[:197] + "..."
    if "got " in msg or isinstance(e.get("input"), dict):  # quoted already, or a whole section
        return f"{loc}: {msg}"
    return f"{loc}: {msg} (got {_short(e.get('input'))})"


MAX_ERRORS_SHOWN = 5


def _format_error(source: str, err: ValidationError,
                  overridden: dict[tuple[str, ...], str] | None = None) -> str:
    """Every problem of a config on one line, each named by its dotted key and by where it
    came from: the file, or the ``key=value`` override that set it."""
    parts, overridden = [], overridden or {}
    errors = err.errors()
    for e in errors[:MAX_ERRORS_SHOWN]:
        loc = tuple(str(p) for p in e["loc"])
        origin = next((f"override {text}" for key, text in overridden.items()
                       if loc[:len(key)] == key or key[:len(loc)] == loc), source)
        parts.append((origin, _format_one(e)))
    more = len(errors) - MAX_ERRORS_SHOWN
    text = "; ".join(p if i and origin == parts[i - 1][0] else f"{origin}: {p}"
                     for i, (origin, p) in enumerate(parts))
    return text + (f"; and {more} more" if more > 0 else "")


def config_from_dict(data: dict, source: str = "config",
                     overridden: dict[tuple[str, ...], str] | None = None) -> RunConfig:
    """Validate ``data``; every problem is named in one DanceError line (``_format_error``).
    ``overridden`` maps the dotted keys set by overrides to their ``key=value`` text."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise DanceError(_format_error(source, err, overridden)) from None


PACKAGED = Path(__file__).resolve().parent.parent / "configs"  # the ready configs, shipped


def packaged_configs() -> dict[str, tuple[Path, str]]:
    """The ready configs that ship inside the package: ``{name: (file, first comment line)}``,
    ``name`` being what ``--config NAME`` takes (``synth``, ``cityscapes_pspnet_r50``...)."""
    out = {}
    for f in sorted(PACKAGED.glob("*.yaml")):
        lines = f.read_text(encoding="utf-8").splitlines()
        head = " ".join(line.lstrip("# ").strip() for line in
                        itertools.takewhile(lambda t: t.startswith("#"), lines))
        out[f.stem] = (f, head.split(". ")[0].rstrip("."))  # its first sentence
    return out


def resolve_config(path: str | Path) -> Path:
    """``path`` itself when it exists (or names a folder or file path), else the packaged
    config of that name; an unknown name is a DanceError listing the ready ones."""
    p = Path(path)
    if p.exists() or p.suffix or len(p.parts) > 1:
        return p
    ready = packaged_configs()
    if str(path) in ready:
        return ready[str(path)][0]
    close = difflib.get_close_matches(str(path), list(ready), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DanceError(f"{path}: no such config file, nor a ready config of that name; {hint}"
                     "`dance configs` lists them")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read (a file, or a ready config by name), merge bases, apply ``key=value`` overrides
    and validate."""
    path = resolve_config(path) if path is not None else None
    data = _read_yaml(Path(path)) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    overridden = {tuple(parse_override(t)[0]): t.strip() for t in overrides}
    return config_from_dict(data, str(path) if path is not None else "config", overridden)


def cli_configs(args) -> int:
    """`dance configs [NAME]`: the ready configs with what each is for, or one's text."""
    ready = packaged_configs()
    if args.name:
        print(resolve_config(args.name).read_text(encoding="utf-8"), end="")
        return 0
    width = max(len(n) for n in ready)
    for name, (_, about) in ready.items():
        print(f"{name:<{width}}  {about}")
    print(f"\n(dance train --config NAME; dance configs NAME prints one, to copy and edit; "
          f"files in {PACKAGED})")
    return 0
