"""Export a (slimmed) model for deployment (docs/checkpoints.md#export): ONNX or TorchScript, with
dynamic batch, height and width; the file runs without dance (onnxruntime / ``torch.jit.load``).
The model inside takes RGB floats in [0, 1] shaped (N, 3, H, W) and returns logits (N, C, H, W).
"""
from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dance.errors import DanceError
from dance.fileio import atomic_write_bytes

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17


def export(model: nn.Module, path: str | os.PathLike, format: str = "onnx",
           input_shape: Sequence[int] = (1, 3, 256, 512)) -> Path:
    """Write ``model`` (in eval mode, on the CPU) to ``path`` atomically and return the path.

    ``input_shape`` is the example the exporter traces with; the file accepts any batch size,
    height and width. ONNX uses the TorchScript-based exporter (``dynamo=False``): it keeps
    height and width symbolic through every op our models use and takes seconds, where the
    torch.export-based one takes many times longer and specialised the pooling bins to the
    example's size when we tried it. The input is named ``image``, the output ``logits``.
    """
    if format not in FORMATS:
        raise DanceError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    net = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its mode and device
    example = torch.rand(tuple(input_shape))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The exporters' advice (deprecation, tracer notes) is not for our users.
        warnings.simplefilter("ignore")
        if format == "onnx":
            axes = {0: "batch", 2: "height", 3: "width"}
            torch.onnx.export(net, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": axes, "logits": axes})
        else:
            torch.jit.save(torch.jit.trace(net, example, check_trace=False), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path
