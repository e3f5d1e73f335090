"""Model registry (timm-style): ``@register_model`` next to each model's definition."""
from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dance.errors import DanceError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# per model, the options that set its head's channels: what `thin_options` scales
_HEADS: dict[str, tuple[str, ...]] = {}

# Modules whose import fills the registry. Adding a model family touches its own file and this list.
_MODEL_MODULES = (
    "dance.network.models.deeplab",
    "dance.network.models.pspnet",
    "dance.network.models.hrnet",
    "dance.network.models.bisenet",
    "dance.network.models.torchvision_adapters",
)


CUSTOM_PREFIX = "custom:"  # Architecture names of models dance did not build


@dataclass
class Architecture:
    """How a model was built and slimmed: enough to rebuild it, untrained, anywhere.

    ``build_model`` attaches one to every model as ``model.dance_arch``; ``remove_branches``
    appends to ``removed``; a checkpoint stores ``to_json()`` as its ``"arch"`` (see
    docs/checkpoints.md). This class is the only place that knows its fields.
    """

    name: str
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)  # builder options, e.g. aspp_channels
    # what slimming removed, in order: branch names ("aspp.rate18") and channel removals
    # ({"layer": root convolution's path, "channels": [indices]})
    removed: list[str | dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "kwargs": dict(self.kwargs),
                "removed": [r if isinstance(r, str) else dict(r) for r in self.removed]}

    @classmethod
    def from_json(cls, d: Any, source: str = "architecture") -> Architecture:
        """From a checkpoint's ``"arch"``; a malformed one is a DanceError naming ``source``."""
        ok = (isinstance(d, Mapping) and isinstance(d.get("name"), str)
              and isinstance(d.get("num_classes"), int) and isinstance(d.get("kwargs", {}), Mapping)
              and isinstance(d.get("removed", []), list)
              and all(isinstance(r, str) or _is_channel_removal(r) for r in d.get("removed", [])))
        if not ok:
            raise DanceError(f"{source}: malformed architecture (expected name, num_classes, "
                             f"kwargs, removed), got {d!r:.200}")
        removed = [r if isinstance(r, str) else {"layer": r["layer"], "channels": list(r["channels"])}
                   for r in d.get("removed", [])]
        return cls(d["name"], d["num_classes"], dict(d.get("kwargs", {})), removed)

    @classmethod
    def custom(cls, model: nn.Module, num_classes: int) -> Architecture:
        """The record of a model of the user's own (``dance.slimmable``): not rebuildable by
        name, but it knows the classes and records what slimming removes."""
        return cls(CUSTOM_PREFIX + type(model).__name__, num_classes)

    @property
    def is_custom(self) -> bool:
        return self.name.startswith(CUSTOM_PREFIX)

    @property
    def removed_branches(self) -> list[str]:
        return [r for r in self.removed if isinstance(r, str)]

    def build(self) -> nn.Module:
        """This architecture, untrained (what slimming removed removed again, in order)."""
        from dance.network.channels import replay
        if self.is_custom:
            raise DanceError(f"{self.name[len(CUSTOM_PREFIX):]} is a model of your own: build it, "
                             f"then dance.slimmable and dance.replay(model, removed)")
        model = build_model(self.name, self.num_classes, None, **self.kwargs)
        return replay(model, self.removed)


def _is_channel_removal(r: Any) -> bool:
    return (isinstance(r, Mapping) and isinstance(r.get("layer"), str)
            and isinstance(r.get("channels"), list)
            and all(isinstance(c, int) and not isinstance(c, bool) for c in r["channels"]))


def architecture(model: nn.Module) -> Architecture:
    """The ``Architecture`` of a model made by ``build_model`` (wrappers such as DDP allowed)."""
    from dance.engine.runtime import unwrap_model
    arch = getattr(unwrap_model(model), "dance_arch", None)
    if not isinstance(arch, Architecture):
        raise DanceError(f"{type(model).__name__}: not a model built by dance.build_model "
                         "(it has no architecture record)")
    return arch


def register_model(name: str, head: tuple[str, ...] = ()):
    """Register a builder under ``name``; ``head`` names its options that set the head's channel
    counts (ints or sequences of ints), which a thinner variant of the model scales."""
    def deco(fn: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        _HEADS[name] = tuple(head)
        return fn
    return deco


def thin_options(name: str, num_classes: int, options: Mapping[str, Any], fraction: float,
                 input_shape: tuple[int, ...]) -> dict[str, Any]:
    """``options`` with the head's channel counts scaled by one factor, so the model's inference
    GFLOPs at ``input_shape`` come closest to ``fraction`` of what ``options`` give: the thinner
    model a user would pick instead of slimming (docs/method.md#run-kinds)."""
    from dance.network.flops import closest_argument, count_gflops
    _load_all()
    if name not in _REGISTRY:
        raise DanceError(f"unknown model {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    params = inspect.signature(_REGISTRY[name]).parameters
    current = {k: options.get(k, params[k].default) for k in _HEADS.get(name, ()) if k in params}
    current = {k: v for k, v in current.items() if isinstance(v, (int, list, tuple))}
    if not current:
        raise DanceError(f"model {name!r} has no head-width options to make a thinner variant of")

    def scaled(m: float) -> dict[str, Any]:
        out = dict(options)
        for k, v in current.items():
            out[k] = (max(8, round(v * m)) if isinstance(v, int)  # 8: no layer collapses
                      else [max(8, round(c * m)) for c in v])
        return out

    def gflops(opts: Mapping[str, Any]) -> float:
        return count_gflops(build_model(name, num_classes, None, **opts), input_shape)

    factor = closest_argument(lambda m: gflops(scaled(m)), fraction * gflops(options), 0.0, 1.0)
    return scaled(factor)


def _load_all() -> None:
    for mod in _MODEL_MODULES:
        importlib.import_module(mod)


def list_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


MAX_CHANNELS = 16384  # no segmentation head is wider; a typo's extra zeros stop here
MAX_CLASSES = 65536


def _option_problem(value: Any, annotation: str, default: Any) -> str | None:
    """Why ``value`` cannot be a builder option annotated ``annotation`` (a string, as the
    builders use postponed annotations), or None. Integers are counts (channels, blocks, rates,
    bins): 1 to MAX_CHANNELS; floats are rates or multipliers: finite, 0 to 16; sequences hold
    1 to 16 such integers."""
    if value is None:
        return None if "None" in annotation or default is None else "must not be null"
    if "Sequence[int]" in annotation or isinstance(default, (tuple, list)):
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 16:
            return "must be a list of 1 to 16 integers"
        problems = [_option_problem(v, "int", 1) for v in value]
        return next((f"item {i}: {p}" for i, p in enumerate(problems) if p), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, got {type(value).__name__}"
    if annotation.startswith("float") or isinstance(default, float):
        if not (math.isfinite(value) and 0 <= value <= 16):
            return f"must be a finite number from 0 to 16, got {value!r}"
        return None
    if not isinstance(value, int) or not 1 <= value <= MAX_CHANNELS:
        return f"must be an integer from 1 to {MAX_CHANNELS}, got {value!r}"
    return None


def check_options(name: str, options: Mapping[str, Any]) -> str | None:
    """Why model ``name`` cannot be built with ``options`` (the first option its builder has
    not, or whose value it cannot take), as a sentence naming model and option; None when all
    are fine. What a config and a checkpoint's architecture are checked with before any model
    is built."""
    _load_all()
    if name not in _REGISTRY:
        return f"unknown model {name!r}; choose one of {', '.join(sorted(_REGISTRY))}"
    params = inspect.signature(_REGISTRY[name]).parameters
    for key, value in options.items():
        p = params.get(key)
        if p is None or key in ("num_classes", "pretrained_backbone") \
                or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            known = sorted(set(params) - {"num_classes", "pretrained_backbone"})
            return (f"model {name!r} has no option {key!r}; its options are "
                    f"{', '.join(known) or 'none'}")
        problem = _option_problem(value, str(p.annotation), p.default)
        if problem:
            return f"model {name!r} option {key!r} {problem}"
    return None


def build_model(name: str, num_classes: int, pretrained_backbone: str | None = None,
                **kwargs) -> nn.Module:
    """Build a registered model. It takes RGB floats in [0, 1], shaped (N, 3, H, W), normalises
    inside, and returns logits (N, num_classes, H, W).

    The model remembers how it was built (``model.dance_arch``, an ``Architecture``) so a
    checkpoint can rebuild it.
    """
    _load_all()
    if name not in _REGISTRY:
        raise DanceError(f"unknown model {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) \
            or not 1 <= num_classes <= MAX_CLASSES:
        raise DanceError(f"num_classes must be an integer from 1 to {MAX_CLASSES}, "
                         f"got {num_classes!r}")
    problem = check_options(name, kwargs)
    if problem is not None:
        raise DanceError(problem)
    try:
        model = _REGISTRY[name](num_classes=num_classes, pretrained_backbone=pretrained_backbone,
                                **kwargs)
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DanceError(f"model {name!r} cannot be built with options {kwargs} ({first})") \
            from None
    model.dance_arch = Architecture(name, num_classes, dict(kwargs))
    return model
