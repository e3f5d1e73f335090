"""Model registry (timm-style): ``@register_model`` next to each model's definition."""
from __future__ import annotations

import importlib
import inspect
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

    @property
    def removed_branches(self) -> list[str]:
        return [r for r in self.removed if isinstance(r, str)]

    def build(self) -> nn.Module:
        """This architecture, untrained (what slimming removed removed again, in order)."""
        from dance.network.channels import replay
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
    if not isinstance(num_classes, int) or num_classes < 1:
        raise DanceError(f"num_classes must be a positive integer, got {num_classes!r}")
    builder = _REGISTRY[name]
    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            options = sorted(set(params) - {"num_classes", "pretrained_backbone"})
            raise DanceError(f"model {name!r} has no option {unknown[0]!r}; "
                             f"its options are {', '.join(options) or 'none'}")
    model = builder(num_classes=num_classes, pretrained_backbone=pretrained_backbone, **kwargs)
    model.dance_arch = Architecture(name, num_classes, dict(kwargs))
    return model
