"""DANCE: data-network co-optimisation for efficient segmentation training and inference.

Public API (docs/checkpoints.md#loading-a-model-in-python, and for a training loop of your own
docs/own_loop.md); the CLI is built on it.
"""
from __future__ import annotations

import os as _os

# OpenMP threads that spin while waiting make PyTorch's CPU kernels 50x slower as soon as another
# process (a DataLoader worker, a second rank, anything else) competes for the cores: measured
# here on 2 cores, a small DeepLabV3+ forward took 2.4 s with spinning and 0.04 s with passive
# waiting. It only takes effect if set before torch is first imported, as the CLI does.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from dance.errors import DanceError  # noqa: E402 (after OMP_WAIT_POLICY is set)

__all__ = [
    "CostLedger",
    "DanceError",
    "DataSlimmingPlan",
    "GatedBranches",
    "MultiScaleModule",
    "NetworkSlimmer",
    "PlannedLoader",
    "ScaledDataset",
    "branches",
    "build_model",
    "channel_groups",
    "class_balanced_cross_entropy",
    "count_gflops",
    "export",
    "list_models",
    "load_model",
    "plan",
    "rebuild_optimizer",
    "remove_branches",
    "remove_channels",
    "replay",
    "score_images",
    "slimmable",
    "spatial_complexity",
    "weighted_cross_entropy",
]

# Classes, imported on first use (``import dance`` stays light): name -> module
_LAZY = {
    "CostLedger": "dance.engine.cost",
    "DataSlimmingPlan": "dance.data.plan",
    "GatedBranches": "dance.network.gates",
    "MultiScaleModule": "dance.network.gates",
    "NetworkSlimmer": "dance.network.slimming",
    "PlannedLoader": "dance.loop",
    "ScaledDataset": "dance.loop",
    "class_balanced_cross_entropy": "dance.engine.loss",
    "rebuild_optimizer": "dance.network.slimming",
    "score_images": "dance.loop",
    "slimmable": "dance.loop",
    "weighted_cross_entropy": "dance.engine.loss",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dance' has no attribute {name!r}")



def list_models() -> list[str]:
    from dance.network.registry import list_models as _f
    return _f()


def build_model(name, num_classes, pretrained_backbone=None, **kwargs):
    from dance.network.registry import build_model as _f
    return _f(name, num_classes, pretrained_backbone=pretrained_backbone, **kwargs)


def branches(model, input_shape=(1, 3, 512, 1024)):
    """Every branch of the model's multi-scale modules (``BranchInfo``: name, gate, FLOPs
    share); a DanceError when the model has none."""
    from dance.network.gates import NO_BRANCHES, multiscale_modules
    from dance.network.gates import branches as _f
    if not multiscale_modules(model):
        raise DanceError(f"{type(model).__name__}: {NO_BRANCHES}")
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


def plan(scores, budget, ids=None, **options):
    """The data plan for ``scores`` (one per image, or id -> score) at ``budget`` (a fraction of
    the plain run's training FLOPs), with `dance train`'s defaults (its ``data_slimming``
    section) for every option not given; ``options`` as ``dance.data.plan.plan``, and
    ``drop_above`` as the config's."""
    from dance.data.plan import check_budget, plan_options, with_drop_above
    from dance.data.plan import plan as _f
    from dance.engine.config import DataSlimmingConfig
    given = {"drop_above": options.pop("drop_above")} if "drop_above" in options else {}
    defaults = DataSlimmingConfig(**given)  # checks it
    options = with_drop_above({**plan_options(defaults), **options}, defaults.drop_above,
                              check_budget(budget))
    return _f(scores, budget, ids, **options)


def replay(model, removed):
    """Apply a slimming record (``model.dance_arch.removed`` of a slimmed model) to a fresh copy
    of the same model, in place, so the slimmed weights load into it."""
    from dance.network.channels import replay as _f
    return _f(model, removed)


def load_model(checkpoint):
    from dance.engine.checkpoint import load_model as _f
    return _f(checkpoint)


def export(model, path, format="onnx", **kwargs):
    from dance.network.export import export as _f
    return _f(model, path, format=format, **kwargs)
