"""Model registry (timm-style): ``@register_model`` next to each model's definition."""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from dance.errors import DanceError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Modules whose import fills the registry. Adding a model family touches its own file and this list.
_MODEL_MODULES = (
    "dance.network.models.deeplab",
    "dance.network.models.pspnet",
    "dance.network.models.hrnet",
    "dance.network.models.bisenet",
    "dance.network.models.torchvision_adapters",
)


def register_model(name: str):
    def deco(fn: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn
    return deco


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

    The model remembers how it was built (``model.dance_arch``) so a checkpoint can rebuild it.
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
    model.dance_arch = {"name": name, "num_classes": num_classes, "kwargs": dict(kwargs),
                        "removed": []}
    return model
