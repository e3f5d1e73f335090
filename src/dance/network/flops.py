"""THE FLOPs counter of dance (docs/method.md#cost-accounting): torch.utils.flop_counter.
FlopCounterMode's count per (architecture state, input shape), forward and forward+backward,
cached; taken from layer hooks, which give the same number several times faster (`count_flops`).

Units: GFLOPs = FLOPs / 1e9, where FlopCounterMode counts a multiply-add as 2 FLOPs (fvcore and
many papers count it as 1 "FLOP", i.e. report MACs: their numbers are half of ours). Only the
ops FlopCounterMode knows are counted -- convolutions and matrix products, which dominate
segmentation networks; BatchNorm, activations, pooling and interpolation are free here.

One fix to FlopCounterMode: torch's formula for a convolution's backward charges the weight
gradient of a grouped convolution ``groups`` times over (it treats the input channels as one
group), which made a MobileNet's backward look 15x its forward; ``_conv_backward_flop`` charges
each gradient what the forward costs.

Counting runs on a copy of the model on the meta device (shapes only, no arithmetic, no memory),
in eval mode, so the model's own mode, device and weights are never touched and a 512x1024 count
of a ResNet-50 model takes a fraction of a second. Results are cached per architecture state: a
signature of the module tree (its printed structure, which names every layer's channels,
kernels, strides and dilations, plus every parameter's name and shape), so removing a branch,
which changes the tree, gives a fresh count.

A model of dance's registry changes only by removals (branches deleted, channels narrowed), which
never change where a layer sits or the size of the maps it reads and writes. So for those models
one meta forward per (architecture as built, input shape) records every layer's sites -- per call,
the elements per channel it reads and writes -- and every later count, of the model slimmed
however far or of a copy with a branch removed, is arithmetic on those sites and the layers'
current channels (`layer_sites`): the same integers as the hooks', without a forward.
"""
from __future__ import annotations

import copy
import hashlib
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

_GFLOPS_CACHE: dict[tuple, float] = {}
# model -> (cheap shape signature, full signature): repr() of a big model costs milliseconds, and a
# trainer may ask for FLOPs every step; the full signature is rebuilt only when shapes change.
_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _conv_backward_flop(grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_val=None, out=None,
                        **kwargs) -> int:
    """aten.convolution_backward: torch's count, with the weight gradient divided by groups.
    FlopCounterMode hands the op's outputs as ``out_val`` (``out`` in older torch, 2.3 among them);
    torch's formula is called unwrapped, on shapes, as every version from 2.3 takes it."""
    outs = out_val if out_val is not None else out
    out_shape = [o.shape if isinstance(o, torch.Tensor) else o for o in outs]
    args = (grad_out.shape, x.shape, weight.shape, bias_sizes, stride, padding, dilation,
            transposed, output_padding, groups)
    grad_input = _TORCH_CONV_BACKWARD(*args, [output_mask[0], False, False], out_shape=out_shape)
    grad_weight = _TORCH_CONV_BACKWARD(*args, [False, output_mask[1], False], out_shape=out_shape)
    return grad_input + grad_weight // groups


# torch's formula on shapes, without the wrapper that turns tensors into shapes (whose keyword for
# the outputs changed name between versions)
_TORCH_CONV_BACKWARD = getattr(conv_backward_flop, "__wrapped__", conv_backward_flop)
_conv_backward_flop._get_raw = True  # FlopCounterMode passes tensors, as to its own formulas
_FORMULAS = {torch.ops.aten.convolution_backward: _conv_backward_flop}


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device (no data
    is copied), in eval mode. Floating tensors are float32 whatever the model's dtype (counts do
    not depend on it), so the counters' float32 inputs fit a float64 or half model too."""
    memo: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta",
                                dtype=torch.float32 if t.is_floating_point() else t.dtype)
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo).eval()


def architecture_signature(model: nn.Module) -> str:
    """A key that changes whenever the module tree or a parameter's shape changes.

    A model of the registry changes its architecture only by removals, each appended to
    ``model.dance_arch.removed``, so the length of that record tells whether the key is still
    good without walking every parameter (this runs for every training step's cost)."""
    arch = getattr(model, "dance_arch", None)
    cached = _SIGNATURES.get(model)
    if arch is not None:
        version = ("removed", len(arch.removed))
        if cached is not None and cached[0] == version:
            return cached[1]
        full = _full_signature(model)
        _SIGNATURES[model] = (version, full)
        return full
    shapes = tuple((n, tuple(t.shape)) for n, t in model.state_dict(keep_vars=True).items())
    if cached is not None and cached[0] == shapes:
        return cached[1]
    full = _full_signature(model, shapes)
    _SIGNATURES[model] = (shapes, full)
    return full


def _full_signature(model: nn.Module, shapes: tuple | None = None) -> str:
    if shapes is None:
        shapes = tuple((n, tuple(t.shape)) for n, t in model.state_dict(keep_vars=True).items())
    return hashlib.sha1((type(model).__qualname__ + repr(model) + repr(shapes)).encode()).hexdigest()


# Shape-preserving layers FlopCounterMode charges nothing for: the counting copy drops them, as
# their meta kernels (BatchNorm's above all) are most of a meta forward's time.
_FREE = (nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid,
         nn.SiLU, nn.GELU, nn.Sigmoid, nn.Dropout, nn.Dropout2d)


def count_flops(model: nn.Module, input_shape: Sequence[int], backward: bool = False) -> int:
    """FLOPs of one forward (and, with ``backward``, the backward of ``output.sum()``) pass on an
    input of ``input_shape``, counted on a meta copy. Uncached; use ``count_gflops``.

    The count is FlopCounterMode's (`count_flops_torch`, equal on every registry model, tested),
    taken from forward hooks on the convolutions and linear layers of a meta forward: a layer
    costs ``2 x`` its multiply-adds forward, and as much again backward for its weight gradient
    and for its input gradient when its input needs one (not the image's). That needs no
    backward pass and no dispatch mode: 4-8x faster for a backward count. A model class whose
    first forward count disagrees with FlopCounterMode's (a functional convolution, a layer type
    the hooks do not know) is counted by FlopCounterMode from then on."""
    kind = type(model)
    if kind not in _HOOKS_AGREE:
        _HOOKS_AGREE[kind] = (_count_by_hooks(model, input_shape, False)
                              == count_flops_torch(model, input_shape, False))
    if not _HOOKS_AGREE[kind]:
        return count_flops_torch(model, input_shape, backward)
    return _count_by_hooks(model, input_shape, backward)


_HOOKS_AGREE: dict[type, bool] = {}


def counting_copy(model: nn.Module) -> nn.Module:
    """A meta copy of ``model`` (`meta_copy`) without its shape-preserving free layers
    (BatchNorm, activations, dropout), for counting convolutions fast."""
    net = meta_copy(model)
    for m in list(net.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, _FREE):
                setattr(m, child_name, nn.Identity())
    return net


def _count_by_hooks(model: nn.Module, input_shape: Sequence[int], backward: bool) -> int:
    return _count_from_sites(model, sites_of(model, input_shape), backward)


_COUNTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_SITED = (*_COUNTED, nn.BatchNorm2d)


@dataclass(frozen=True)
class Call:
    """One call of a layer in a forward pass: the elements per channel (N·H·W, or the rows of a
    linear layer) it reads and writes, whether its input needs a gradient, and the layer's
    kernel, stride, padding and dilation then (a layer that no longer has them is measured
    again)."""

    layout: tuple
    in_per_channel: int
    out_per_channel: int
    input_needs_grad: bool


@dataclass
class Sites:
    """Every call of every convolution, linear layer and BatchNorm of a model at one input
    shape, by path: ``order`` the paths in the order their first call ended, ``paths`` every
    such path the measured model had (called or not)."""

    order: list[str] = field(default_factory=list)
    calls: dict[str, list[Call]] = field(default_factory=dict)
    paths: set[str] = field(default_factory=set)

    def each(self, modules: dict[str, nn.Module], types: tuple) -> Iterator[tuple[str, nn.Module, Call]]:
        """Every call of a layer of ``modules`` (by path) of one of ``types``, in order."""
        for path in self.order:
            m = modules.get(path)
            if isinstance(m, types):
                for c in self.calls[path]:
                    yield path, m, c

    def covers(self, modules: dict[str, nn.Module]) -> bool:
        return all(path in self.paths and all(c.layout == _layout(m) for c in self.calls.get(path, ()))
                   for path, m in modules.items() if isinstance(m, _SITED))


_SITES: dict[tuple, Sites] = {}


def _layout(m: nn.Module) -> tuple:
    return (type(m).__name__, *(getattr(m, a, None) for a in
                                ("kernel_size", "stride", "padding", "dilation")))


def layer_sites(model: nn.Module, input_shape: Sequence[int]) -> Sites | None:
    """The sites of ``model``'s layers at ``input_shape`` (module docstring), measured by one
    meta forward per architecture as built, input shape and set of frozen parameters, then
    shared by every slimmed state and copy of it; None for a model not of the registry (no
    ``dance_arch``, or one of the user's own), which is counted by a forward each time."""
    arch = getattr(model, "dance_arch", None)
    if arch is None or getattr(arch, "is_custom", True):
        return None
    frozen = tuple(n for n, p in model.named_parameters() if not p.requires_grad)
    key = (arch.name, arch.num_classes, repr(sorted(arch.kwargs.items())),
           tuple(int(s) for s in input_shape), frozen)
    modules = dict(model.named_modules())
    sites = _SITES.get(key)
    if sites is None or not sites.covers(modules):
        fresh = _measure_sites(model, input_shape)
        if sites is not None:  # keep what only the earlier model had (a fuller one's layers)
            for path in sites.order:
                if path not in fresh.paths:
                    fresh.order.append(path)
                    fresh.calls[path] = sites.calls[path]
            fresh.paths |= sites.paths
        sites = _SITES[key] = fresh
    return sites


def sites_of(model: nn.Module, input_shape: Sequence[int]) -> Sites:
    """``layer_sites``, or for a model not of the registry its sites measured now (uncached)."""
    return layer_sites(model, input_shape) or _measure_sites(model, input_shape)


def _measure_sites(model: nn.Module, input_shape: Sequence[int]) -> Sites:
    """One forward of a counting copy (`counting_copy`: the free layers, BatchNorms included,
    are identities there, so inputs need a gradient exactly where the hooks' count says), with
    the BatchNorms' sites taken at the identities in their place."""
    layouts = {p: _layout(m) for p, m in model.named_modules() if isinstance(m, _SITED)}
    net = counting_copy(model)
    sites = Sites(paths=set(layouts))

    def hook(m: nn.Module, inputs: tuple, out: torch.Tensor, path: str) -> None:
        x, dim = inputs[0], (-1 if isinstance(m, nn.Linear) else 1)
        if path not in sites.calls:
            sites.order.append(path)
            sites.calls[path] = []
        sites.calls[path].append(Call(layouts[path], x.numel() // x.shape[dim],
                                      out.numel() // out.shape[dim], bool(x.requires_grad)))

    handles = [m.register_forward_hook(lambda m, i, o, path=path: hook(m, i, o, path))
               for path, m in net.named_modules() if path in layouts]
    try:
        with torch.enable_grad():
            net(torch.zeros(tuple(input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return sites


def gflops_with(model: nn.Module, path: str, replacement: nn.Module,
                input_shape: Sequence[int]) -> float:
    """GFLOPs of ``model``'s forward at ``input_shape`` with its submodule at ``path`` replaced
    by ``replacement`` (a slimmed meta copy of it, e.g. a module without a branch): from the
    layers' sites without copying the whole model, or, for a model without cached sites
    (``layer_sites``), counted on a meta copy of it with the replacement in place."""
    sites = layer_sites(model, input_shape)
    if sites is not None:
        inside = (lambda p: True) if not path else (lambda p: p == path or p.startswith(path + "."))
        modules = {p: m for p, m in model.named_modules() if not inside(p)}
        modules.update({".".join(filter(None, (path, p))): m
                        for p, m in replacement.named_modules()})
        if sites.covers(modules):
            return _count_from_sites(modules, sites, False) / 1e9
    if not path:
        return count_gflops(replacement, input_shape)
    net = meta_copy(model)
    parent, _, name = path.rpartition(".")
    setattr(net.get_submodule(parent), name, replacement)
    return count_gflops(net, input_shape)


def _count_from_sites(modules: nn.Module | dict[str, nn.Module], sites: Sites,
                      backward: bool) -> int:
    """`_count_by_hooks`' count, from the sites and the layers' current channels (of a model,
    or of its modules by path)."""
    total = 0
    if isinstance(modules, nn.Module):
        modules = dict(modules.named_modules())
    for _, m, c in sites.each(modules, _COUNTED):
        if isinstance(m, nn.ConvTranspose2d):
            flops = (2 * c.in_per_channel * m.in_channels * (m.out_channels // m.groups)
                     * math.prod(m.kernel_size))
        elif isinstance(m, nn.Conv2d):
            flops = (2 * c.out_per_channel * m.out_channels * (m.in_channels // m.groups)
                     * math.prod(m.kernel_size))
        else:
            flops = 2 * c.out_per_channel * m.out_features * m.in_features
        total += flops
        if backward:
            total += flops * (int(c.input_needs_grad) + int(m.weight.requires_grad))
    return total


def count_flops_torch(model: nn.Module, input_shape: Sequence[int],
                      backward: bool = False) -> int:
    """`count_flops` by torch.utils.flop_counter.FlopCounterMode itself, with a real backward
    pass (slower; the reference the fast count is tested against)."""
    net = meta_copy(model)
    x = torch.zeros(tuple(input_shape), device="meta")
    counter = FlopCounterMode(display=False, custom_mapping=_FORMULAS)
    with counter:
        if backward:
            net(x).sum().backward()
        else:
            with torch.no_grad():
                net(x)
    return int(counter.get_total_flops())


def count_gflops(model: nn.Module, input_shape: Sequence[int] = (1, 3, 512, 1024),
                 backward: bool = False) -> float:
    """GFLOPs (1e9 FLOPs, multiply-add = 2) of a forward pass, or forward + backward with
    ``backward=True`` (the training cost of one step on a batch of ``input_shape``); cached per
    (architecture state, input shape, backward)."""
    key = (architecture_signature(model), tuple(int(s) for s in input_shape), bool(backward))
    if key not in _GFLOPS_CACHE:
        _GFLOPS_CACHE[key] = count_flops(model, input_shape, backward) / 1e9
    return _GFLOPS_CACHE[key]


def clear_cache() -> None:
    """Forget every count and layer site (they are keyed by architecture, so this is only to
    free memory)."""
    _GFLOPS_CACHE.clear()
    _SITES.clear()


def closest_argument(cost, target: float, lo: float, hi: float, steps: int = 12) -> float:
    """The argument in [lo, hi] at which ``cost`` (growing with it, e.g. a model's FLOPs as a
    function of a width factor or an input scale) comes closest to ``target``: bisection, then
    the nearer of the two last bounds."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda a: abs(cost(a) - target))
