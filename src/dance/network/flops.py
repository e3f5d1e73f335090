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
"""
from __future__ import annotations

import copy
import hashlib
import math
import weakref
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

_GFLOPS_CACHE: dict[tuple, float] = {}
# model -> (cheap shape signature, full signature): repr() of a big model costs milliseconds, and a
# trainer may ask for FLOPs every step; the full signature is rebuilt only when shapes change.
_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _conv_backward_flop(grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_val=None, **kwargs) -> int:
    """aten.convolution_backward: torch's count, with the weight gradient divided by groups."""
    args = (grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed,
            output_padding, groups)
    grad_input = conv_backward_flop(*args, [output_mask[0], False, False], out_val=out_val)
    grad_weight = conv_backward_flop(*args, [False, output_mask[1], False], out_val=out_val)
    return grad_input + grad_weight // groups


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
    net = counting_copy(model)
    total = 0

    def hook(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        x = inputs[0]
        k = math.prod(m.kernel_size) if not isinstance(m, nn.Linear) else 1
        if isinstance(m, nn.ConvTranspose2d):
            flops = 2 * x.numel() * (m.out_channels // m.groups) * k
        elif isinstance(m, nn.Conv2d):
            flops = 2 * out.numel() * (m.in_channels // m.groups) * k
        else:
            flops = 2 * out.numel() * m.in_features
        total += flops
        if backward:
            total += flops * (int(x.requires_grad) + int(m.weight.requires_grad))

    counted = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, counted)]
    try:
        with torch.set_grad_enabled(backward):
            net(torch.zeros(tuple(input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
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
    """Forget every count (they are keyed by architecture, so this is only to free memory)."""
    _GFLOPS_CACHE.clear()


def closest_argument(cost, target: float, lo: float, hi: float, steps: int = 12) -> float:
    """The argument in [lo, hi] at which ``cost`` (growing with it, e.g. a model's FLOPs as a
    function of a width factor or an input scale) comes closest to ``target``: bisection, then
    the nearer of the two last bounds."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda a: abs(cost(a) - target))
