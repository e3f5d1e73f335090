"""DANCE: data-network co-optimisation for efficient segmentation training and inference.

Public API (docs/checkpoints.md#loading-a-model-in-python); the CLI is built on it.
"""
from __future__ import annotations

import os as _os

# OpenMP threads that spin while waiting make PyTorch's CPU kernels 50x slower as soon as another
# process (a DataLoader worker, a second rank, anything else) competes for the cores: measured
# here on 2 cores, a small DeepLabV3+ forward took 2.4 s with spinning and 0.04 s with passive
# waiting. It only takes effect if set before torch is first imported, as the CLI does.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = [
    "DanceError",
    "branches",
    "build_model",
    "channel_groups",
    "count_gflops",
    "export",
    "list_models",
    "load_model",
    "plan",
    "remove_branches",
    "remove_channels",
    "spatial_complexity",
]

from dance.errors import DanceError


def list_models() -> list[str]:
    from dance.network.registry import list_models as _f
    return _f()


def build_model(name, num_classes, pretrained_backbone=None, **kwargs):
    from dance.network.registry import build_model as _f
    return _f(name, num_classes, pretrained_backbone=pretrained_backbone, **kwargs)


def branches(model, input_shape=(1, 3, 512, 1024)):
    from dance.network.gates import branches as _f
    return _f(model, input_shape)


def remove_branches(model, names):
    from dance.network.gates import remove_branches as _f
    return _f(model, names)


def channel_groups(model, input_shape=(1, 3, 512, 1024)):
    from dance.network.channels import channel_groups as _f
    return _f(model, input_shape)


def remove_channels(model, layer, channels):
    from dance.network.channels import remove_channels as _f
    return _f(model, layer, channels)


def count_gflops(model, input_shape=(1, 3, 512, 1024), backward=False) -> float:
    from dance.network.flops import count_gflops as _f
    return _f(model, input_shape, backward=backward)


def spatial_complexity(image, indicator="si", **kwargs) -> float:
    from dance.data.complexity import spatial_complexity as _f
    return _f(image, indicator=indicator, **kwargs)


def plan(scores, budget, **options):
    from dance.data.plan import plan as _f
    return _f(scores, budget, **options)


def load_model(checkpoint):
    from dance.engine.checkpoint import load_model as _f
    return _f(checkpoint)


def export(model, path, format="onnx", **kwargs):
    from dance.network.export import export as _f
    return _f(model, path, format=format, **kwargs)
