"""Exact shortcuts for the convolutions of a training step on maps a few pixels high (CPU).

At the scales a data plan trains at, a segmentation model's deepest maps are one to four pixels
high, and on a CPU a step there is dominated by a fixed cost: oneDNN's convolution backward is
many times slower on such maps than their arithmetic needs (measured on the demo's model at
16x32, batch 8: the depthwise 3x3 backward of a 480-channel 1x2 map takes 1-3 ms, a multiply
of the same tensors 75 us). Five rewrites remove much of it, each giving the same values up
to the order of float sums:

- **taps that read only padding**: a stride-1 convolution padded to keep its size, whose
  dilation is at least the map's height (width), reads the zero padding with every tap row
  (column) but the middle ones; those taps are dropped (ASPP's dilated branches become 1x1
  convolutions on a 1x2 map);
- **a 1x1 convolution on a map of 2 to 8 pixels is one matrix product** over every pixel of
  the batch, where it has at least 4096 weights: with one thread and fewer than 16 images torch
  runs it as one small matrix product per image (``slow_conv2d``), whose backward on such maps
  is 2-5x slower for such layers (also what the first rule leaves of ASPP's dilated branches);
- **a depthwise 1x1 convolution is a per-channel multiply** (what the first rule leaves of a
  dilated depthwise layer on a map smaller than its dilation);
- **a dilated depthwise convolution left with one row of taps is a sum of shifted products**
  (oneDNN's dilated depthwise backward: 2.7 ms on a 480-channel 2x4 map, the shifted sum 1.0);
- **a depthwise convolution on a map shorter than its kernel** gets zero rows appended below the
  map and its output cropped back: oneDNN's weight gradient has a slow path for maps shorter
  than the kernel (8x on this CPU) that the extra rows avoid; the values are unchanged because
  the rows added are zeros where the padding was.

Only a training forward on a CPU inside ``small_map_convs`` takes them: the layers are
``SmallMapConv2d`` for the length of the block, so evaluation, exports, tracing, slimming and the
FLOPs counters see the ordinary convolution, and nothing about the model's architecture, state
dict or counted FLOPs changes. docs/method.md#cost-accounting has the measurements.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# a 1x1 convolution on a map of 2 to this many pixels, with at least MATMUL_WEIGHTS weights, is
# one matrix product (smaller layers and single pixels are faster as torch runs them)
MATMUL_PIXELS = 8
MATMUL_WEIGHTS = 4096


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def small_map_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` with zero padding, rewritten where the map is small (module docstring);
    equal to it up to the order of float sums, gradients included."""
    if isinstance(padding, str) or x.dim() != 4:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = weight.shape[-2:]
    size = x.shape[-2:]
    if s == (1, 1) and kh % 2 and kw % 2 and p == (d[0] * (kh // 2), d[1] * (kw // 2)):
        # tap rows (columns) further than the map's height (width) from the middle one read
        # only padding, for every output pixel
        r = [min(k // 2, (n - 1) // dd) for k, n, dd in zip((kh, kw), size, d)]
        if r[0] < kh // 2 or r[1] < kw // 2:
            ch, cw = kh // 2, kw // 2
            weight = weight[:, :, ch - r[0]:ch + r[0] + 1, cw - r[1]:cw + r[1] + 1]
            p = (d[0] * r[0], d[1] * r[1])
            kh, kw = weight.shape[-2:]
    if (groups == 1 and kh == kw == 1 and s == (1, 1) and p == (0, 0)
            and 2 <= size[0] * size[1] <= MATMUL_PIXELS
            and weight.shape[0] * weight.shape[1] >= MATMUL_WEIGHTS):
        return _matmul(x, weight, bias)
    depthwise = groups > 1 and groups == x.shape[1] == weight.shape[0]
    if depthwise and kh == kw == 1 and s == (1, 1) and p == (0, 0):
        y = x * weight.view(1, -1, 1, 1)
        return y if bias is None else y + bias.view(1, -1, 1, 1)
    if (depthwise and kh == 1 and kw % 2 and kw > 1 and d[1] > 1 and s == (1, 1)
            and p == (0, d[1] * (kw // 2))):
        return _shifted_sum(x, weight, bias, p[1], d[1])
    if depthwise and size[0] < kh:
        rows = (size[0] + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
        y = F.conv2d(F.pad(x, (0, 0, 0, kh - size[0])), weight, bias, s, p, d, groups)
        return y[:, :, :rows]
    return F.conv2d(x, weight, bias, s, p, d, groups)


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as one matrix product over every pixel of the batch."""
    n, c, h, w = x.shape
    cols = x.transpose(0, 1).reshape(c, n * h * w)
    mat = weight.view(weight.shape[0], c)
    y = mat @ cols if bias is None else torch.addmm(bias.view(-1, 1), mat, cols)
    return y.view(-1, n, h, w).transpose(0, 1).contiguous()


def _shifted_sum(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad: int,
                 dilation: int) -> torch.Tensor:
    """A depthwise stride-1 convolution with a one-row kernel padded to keep the map's width, as
    a sum of shifted copies of the map times each tap's per-channel weight."""
    width = x.shape[-1]
    xp = F.pad(x, (pad, pad))
    y = bias.view(1, -1, 1, 1) if bias is not None else None
    for j in range(weight.shape[-1]):
        term = xp[..., j * dilation:j * dilation + width] * weight[:, 0, 0, j].view(1, -1, 1, 1)
        y = term if y is None else y + term
    return y


class SmallMapConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose training forward on a CPU goes through ``small_map_conv2d``;
    everywhere else (evaluation, other devices, tracing, compiling) it is the ordinary layer."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        if (self.training and input.device.type == "cpu" and not torch.jit.is_tracing()
                and not torch.jit.is_scripting() and not torch.compiler.is_compiling()):
            return small_map_conv2d(input, weight, bias, self.stride, self.padding,
                                    self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def eligible(conv: nn.Module) -> bool:
    """Whether ``small_map_conv2d`` can stand in for ``conv``: a plain ``nn.Conv2d`` with zero
    padding given as numbers."""
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


@contextlib.contextmanager
def small_map_convs(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, every eligible convolution of ``model`` is a ``SmallMapConv2d``; after
    it, an ``nn.Conv2d`` again, whatever happened inside. Only the class changes: parameters,
    state dict and hooks stay, and nothing outside the block (slimming, FLOPs counters, exports,
    checkpoints) ever sees the shortcut. Yields how many layers it covers."""
    swapped = [m for m in model.modules() if eligible(m)] if enabled else []
    for m in swapped:
        m.__class__ = SmallMapConv2d
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            m.__class__ = nn.Conv2d
