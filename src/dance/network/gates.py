"""Gated multi-scale modules (docs/method.md#network-slimming).

Every branch of a multi-scale module (an ASPP rate, a pyramid-pooling bin, a resolution stream,
a context path) has a scalar gate ``g_b`` (init 1) that multiplies its output. Setting a gate to 0
and removing the branch structurally give the same output; removal makes the model physically
smaller.

Two pieces live here:

* ``MultiScaleModule``: the protocol every gated module follows (names, gates, removal).
  Modules whose branches are not "same input, run in parallel, combine" (HRNet streams, BiSeNet
  context paths) subclass it directly.
* ``GatedBranches``: the common case, ``x -> [g_b * branch_b(x)] -> combine``, with the two
  consumers of the field: concat followed by a projection conv (ASPP, PPM) and sum.
"""
from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dance.errors import DanceError


class MultiScaleModule(nn.Module, abc.ABC):
    """A module with named, gated, structurally removable branches.

    Subclasses keep their gates in ``self.gates`` (an ``nn.ParameterDict`` of 0-d parameters,
    one per live branch, in branch order) and implement ``_remove(names)``.
    """

    gates: nn.ParameterDict
    # branches whose output is the same at every pixel (ASPP's image pooling): a module left
    # with only these passes on no spatial information, so slimming keeps another one
    global_branches: frozenset[str] = frozenset()

    def branch_names(self) -> list[str]:
        return list(self.gates.keys())

    def may_slim_away(self, names: Iterable[str]) -> bool:
        """Whether network slimming may remove ``names`` (live branches) together: the module
        keeps a branch, and one that is not global if it has one now. Explicit
        ``remove_branches`` calls need only the first."""
        gone = set(names)
        left = [n for n in self.branch_names() if n not in gone]
        spatial = [n for n in self.branch_names() if n not in self.global_branches]
        return bool(left) and (not spatial or any(n not in self.global_branches for n in left))

    def gate(self, name: str) -> nn.Parameter:
        return self.gates[name]

    def remove_branches(self, names: Iterable[str]) -> None:
        """Delete the named branches and rewrite their consumers, in place."""
        names = list(dict.fromkeys(names))
        live = self.branch_names()
        for n in names:
            if n not in live:
                raise DanceError(f"unknown branch {n!r}; this module has {live}")
        if len(names) >= len(live):
            raise DanceError(
                f"cannot remove branch {names[-1]!r}: it would leave the module with no branch"
            )
        with torch.no_grad():
            self._remove(names)
        for n in names:
            del self.gates[n]

    @abc.abstractmethod
    def _remove(self, names: list[str]) -> None:
        """Delete the branch modules and slice the consumer; gates are deleted by the caller."""


def new_gates(names: Iterable[str]) -> nn.ParameterDict:
    """One scalar gate per branch name, each initialised to 1, in the order given."""
    # A list of pairs, not a dict: ParameterDict sorts a plain dict's keys, and gates must stay
    # in branch order.
    return nn.ParameterDict([(n, nn.Parameter(torch.ones(()))) for n in names])


def slice_conv_inputs(conv: nn.Conv2d, keep: torch.Tensor) -> nn.Conv2d:
    """A copy of ``conv`` that reads only the input channels in ``keep`` (1-d index tensor), with
    its gradients sliced alike when it has them (as Torch-Pruning slices them for channels, which
    is what ``OptimizerSnapshot`` follows parameters by)."""
    if conv.groups != 1:
        raise DanceError("cannot slice the inputs of a grouped convolution")
    new = nn.Conv2d(
        len(keep), conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, 1, conv.bias is not None, conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight[:, keep])
        if conv.weight.grad is not None:
            new.weight.grad = conv.weight.grad[:, keep].clone()
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
            if conv.bias.grad is not None:
                new.bias.grad = conv.bias.grad.clone()
    return new


class GatedBranches(MultiScaleModule):
    """``x -> combine([g_b * branch_b(x) for b])`` with ``combine`` a concat + projection or a sum.

    ``branches`` maps a name to a module; every branch maps the same input to a tensor of the same
    spatial size. With ``project`` given (a module whose first layer is an ``nn.Conv2d``), the gated
    outputs are concatenated along channels and projected; removing a branch deletes the input
    channels it fed. Without it the gated outputs are summed. ``global_branches`` names those
    whose output is constant over the image (``MultiScaleModule.global_branches``).
    """

    def __init__(self, branches: dict[str, nn.Module], branch_channels: dict[str, int] | None = None,
                 project: nn.Module | None = None, global_branches: Iterable[str] = ()):
        super().__init__()
        self.branches = nn.ModuleDict(branches)
        self.gates = new_gates(branches)
        self.project = project
        self.global_branches = frozenset(global_branches)
        if project is not None:
            if branch_channels is None:
                raise ValueError("branch_channels is required with a projection")
            self.branch_channels = dict(branch_channels)
        else:
            self.branch_channels = dict(branch_channels or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [self.gates[n] * branch(x) for n, branch in self.branches.items()]
        if self.project is None:
            return torch.stack(outputs).sum(0)
        return self.project(torch.cat(outputs, dim=1))

    def _projection_conv(self) -> tuple[nn.Module, str, nn.Conv2d]:
        """The first ``nn.Conv2d`` of ``project``, with its parent module and attribute name."""
        if isinstance(self.project, nn.Conv2d):
            return self, "project", self.project
        for parent in self.project.modules():
            for attr, child in parent.named_children():
                if isinstance(child, nn.Conv2d):
                    return parent, attr, child
        raise TypeError("projection has no Conv2d")

    def out_channels(self, name: str) -> int:
        """The channels branch ``name`` feeds the concatenation now: those of its last
        BatchNorm or convolution (channel slimming may have narrowed it since construction),
        else the count given at construction."""
        last = None
        for m in self.branches[name].modules():
            if isinstance(m, (nn.BatchNorm2d, nn.Conv2d)):
                last = m
        if isinstance(last, nn.BatchNorm2d):
            return last.num_features
        if isinstance(last, nn.Conv2d):
            return last.out_channels
        return self.branch_channels[name]

    def _remove(self, names: list[str]) -> None:
        if self.project is not None:
            keep, start = [], 0
            for n in self.branches:
                c = self.out_channels(n)
                if n not in names:
                    keep.extend(range(start, start + c))
                start += c
            parent, attr, conv = self._projection_conv()
            idx = torch.tensor(keep, dtype=torch.long, device=conv.weight.device)
            setattr(parent, attr, slice_conv_inputs(conv, idx))
        for n in names:
            del self.branches[n]
            self.branch_channels.pop(n, None)


# --- Model-level branch API (dance.branches / dance.remove_branches) -----------------

@dataclass
class BranchInfo:
    """One branch of one multi-scale module of a model."""

    name: str            # f"{module_path}.{branch}", e.g. "aspp.rate18"
    gate: float          # current value of its gate g_b
    gflops_share: float  # FLOPs saved by removing this branch alone / the model's FLOPs
    module_path: str     # where the MultiScaleModule sits in the model, e.g. "aspp"
    branch: str          # the branch's name inside its module, e.g. "rate18"


NO_BRANCHES = ("the model has no multi-scale module (a torchvision ASPP or LR-ASPP head gated by "
               "dance.slimmable, or a dance.MultiScaleModule), so it has no branch to slim; "
               "its channels can still be slimmed")


def multiscale_modules(model: nn.Module) -> list[tuple[str, MultiScaleModule]]:
    """Every MultiScaleModule of ``model`` with its path, in module order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, MultiScaleModule)]


def _full_name(path: str, branch: str) -> str:
    return f"{path}.{branch}" if path else branch


def branches(model: nn.Module, input_shape: Sequence[int] = (1, 3, 512, 1024)
             ) -> list[BranchInfo]:
    """Every branch of every multi-scale module, with its gate and its share of the model's FLOPs
    at ``input_shape``: what removing that branch alone would save (counted on meta copies,
    cached). A module's last live branch cannot be removed, so its share is 0."""
    from dance.network.flops import count_gflops, gflops_with, meta_copy

    total = count_gflops(model, input_shape)
    infos = []
    for path, module in multiscale_modules(model):
        live = module.branch_names()
        for name in live:
            saved = 0.0
            if len(live) > 1:
                without = meta_copy(module)  # the module alone, counted in the model's place
                without.remove_branches([name])
                saved = total - gflops_with(model, path, without, input_shape)
            infos.append(BranchInfo(_full_name(path, name), float(module.gates[name].detach()),
                                    saved / total if total else 0.0, path, name))
    return infos


def remove_branches(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Remove the named branches (``"aspp.rate18"`` ...) structurally, in place; record them in
    ``model.dance_arch.removed`` in order, so a checkpoint can rebuild the slimmed model.
    Unknown names and removing a module's last branch are DanceErrors, raised before anything
    is removed. FLOPs caches are keyed by architecture, so counts follow automatically."""
    names = list(dict.fromkeys(names))
    modules = dict(multiscale_modules(model))
    by_module: dict[str, list[str]] = {}
    for full in names:
        path, _, branch = full.rpartition(".")
        module = modules.get(path)
        if module is None or branch not in module.branch_names():
            known = [_full_name(p, b) for p, m in modules.items() for b in m.branch_names()]
            raise DanceError(f"unknown branch {full!r}; "
                             + (f"the model has {', '.join(known)}" if known else NO_BRANCHES))
        by_module.setdefault(path, []).append(branch)
    for path, removed in by_module.items():
        if len(removed) >= len(modules[path].branch_names()):
            raise DanceError(f"cannot remove branch {_full_name(path, removed[-1])!r}: it is the "
                             f"last branch of {path or 'the model'!r}")
    for path, removed in by_module.items():
        modules[path].remove_branches(removed)
    arch = getattr(model, "dance_arch", None)
    if arch is not None:  # a model of dance's registry (an Architecture) records its removals
        arch.removed.extend(names)
    return model
