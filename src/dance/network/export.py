"""Export a (slimmed) model for deployment (docs/checkpoints.md#export): ONNX or TorchScript, with
dynamic batch, height and width; the file runs without dance (onnxruntime / ``torch.jit.load``).
The model inside takes RGB floats in [0, 1] shaped (N, 3, H, W) and returns logits (N, C, H, W).
"""
from __future__ import annotations

import copy
import inspect
import io
import json
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


def deployment_metadata(model: nn.Module, class_names: Sequence[str] | None) -> dict[str, str]:
    """What a deployment needs to know besides the weights, as strings: the model, the class
    names in train-id order (the logits' channels), and the input convention."""
    from dance import __version__
    from dance.network.models.common import IMAGENET_MEAN, IMAGENET_STD
    arch = getattr(model, "dance_arch", None)
    meta = {"dance.version": __version__}
    if arch is None or not arch.is_custom:  # a model of the user's own has its own convention
        meta.update({
            "dance.input": "image: float32 RGB in [0, 1], (batch, 3, height, width), any height "
                           "and width; the model normalises it itself (dance.mean, dance.std)",
            "dance.output": "logits: (batch, classes, height, width); argmax over classes is "
                            "the train id, named by dance.classes",
            "dance.mean": json.dumps(list(IMAGENET_MEAN)),
            "dance.std": json.dumps(list(IMAGENET_STD)),
        })
    if arch is not None:
        meta["dance.model"] = arch.name
    if class_names:
        meta["dance.classes"] = json.dumps(list(class_names))
    return meta


def _onnx_with_metadata(data: bytes, metadata: dict[str, str], classes: int | None) -> bytes:
    """The exported file with ``metadata`` in its metadata_props and the logits' class axis
    given its size (the exporter names it after a Resize op, ``Resizelogits_dim_1``)."""
    import onnx
    proto = onnx.load_from_string(data)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if classes is not None:
        dim = proto.graph.output[0].type.tensor_type.shape.dim[1]
        dim.Clear()
        dim.dim_value = classes
    return proto.SerializeToString()


# the TorchScript-based exporter, asked for where torch.onnx.export has a ``dynamo`` switch;
# older torch (2.3 among them) has none and exports with that one anyway
_TORCHSCRIPT_EXPORTER = ({"dynamo": False}
                         if "dynamo" in inspect.signature(torch.onnx.export).parameters else {})


def export(model: nn.Module, path: str | os.PathLike, format: str = "onnx",
           input_shape: Sequence[int] = (1, 3, 256, 512),
           class_names: Sequence[str] | None = None) -> Path:
    """Write ``model`` (in eval mode, on the CPU) to ``path`` atomically and return the path.

    ``input_shape`` is the example the exporter traces with; the file accepts any batch size,
    height and width. ONNX uses the TorchScript-based exporter (``dynamo=False``): it keeps
    height and width symbolic through every op our models use and takes seconds, where the
    torch.export-based one takes many times longer and specialised the pooling bins to the
    example's size when we tried it. The input is named ``image``, the output ``logits``, with
    axes ``batch``, ``height`` and ``width`` (and the classes' count). ``deployment_metadata``
    (with ``class_names``) travels in the file: ONNX metadata_props, or TorchScript's extra
    file ``dance.json``.
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
        metadata = deployment_metadata(net, class_names)
        if format == "onnx":
            axes = {0: "batch", 2: "height", 3: "width"}
            torch.onnx.export(net, (example,), buffer, opset_version=ONNX_OPSET,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": axes, "logits": axes}, **_TORCHSCRIPT_EXPORTER)
            arch = getattr(net, "dance_arch", None)
            data = _onnx_with_metadata(buffer.getvalue(), metadata,
                                       arch.num_classes if arch is not None else None)
        else:
            torch.jit.save(torch.jit.trace(net, example, check_trace=False), buffer,
                           _extra_files={"dance.json": json.dumps(metadata)})
            data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return path
