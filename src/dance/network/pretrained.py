"""Pretrained backbones (docs/cli.md#model: "from a pretrained backbone (torchvision weights enum or a
local file; offline, a missing download is a clear error, not a hang)").

``load_backbone_weights(backbone, spec, arch)`` fills ``backbone`` -- an instance of torchvision's
classification network ``arch`` (e.g. ``torchvision.models.resnet50()``), before a model takes
its layers -- from:

* ``None``: nothing (train from scratch);
* a torchvision weights name: ``"DEFAULT"``, ``"IMAGENET1K_V1"`` (a member of ``arch``'s enum) or
  a full ``"ResNet50_Weights.IMAGENET1K_V2"``; read from the torch hub cache, downloaded only
  when the download host answers within seconds;
* a local file: ``.safetensors`` (safetensors) or ``.pth``/``.pt``/``.bin``
  (``torch.load(weights_only=True)``, never an arbitrary pickle).

The classification head (``fc.*``, ``classifier.*``) is never used by a segmentation model, so it
may be absent from the file and is ignored when present. Every other key must match in name and
shape: weights of another architecture are a DanceError naming the file and a few keys.
"""
from __future__ import annotations

import os
import pickle
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from dance.errors import DanceError

# Keys of torchvision classifiers' heads: unused by a segmentation backbone.
_HEAD_PREFIXES = ("fc.", "classifier.")
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# How long the download host may take to accept a connection before we call the machine offline.
CONNECT_TIMEOUT_S = 3.0
# Setting DANCE_OFFLINE=1 skips even that probe (air-gapped clusters).
OFFLINE_ENV = "DANCE_OFFLINE"


def load_backbone_weights(backbone: nn.Module, spec: str | None, arch: str) -> None:
    """Load pretrained weights named by ``spec`` into ``backbone`` (torchvision's ``arch``)."""
    if spec is None:
        return
    spec = str(spec)
    if _looks_like_file(spec):
        source, state = spec, _read_file(Path(spec))
    else:
        weights = _resolve_weights(spec, arch)
        source, state = weights.url, _read_torchvision(weights, spec, arch)
    _load_checked(backbone, state, source, arch)


def _looks_like_file(spec: str) -> bool:
    return spec.lower().endswith(_FILE_SUFFIXES) or os.sep in spec or "/" in spec \
        or os.path.exists(spec)


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DanceError(f"{path}: pretrained backbone file not found")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        if path.suffix.lower() == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    # A corrupt file, a pickle with code in it (weights_only refuses it), another format.
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError,
            SafetensorError) as e:
        raise DanceError(f"{path}: cannot read pretrained weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no details'})") from None
    # Training checkpoints often wrap the weights: {"state_dict": {...}} or {"model": {...}}.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DanceError(f"{path}: not a state dict of tensors")
    return state


def _resolve_weights(spec: str, arch: str):
    from torchvision.models import get_model_weights, get_weight
    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError):
        raise DanceError(f"no torchvision weights for architecture {arch!r}") from None
    names = [w.name for w in enum]
    try:
        weights = get_weight(spec) if "." in spec else enum[spec]
    except (ValueError, KeyError, AttributeError):
        raise DanceError(f"unknown pretrained backbone {spec!r} for {arch}: give a local "
                         f".safetensors/.pth file or one of DEFAULT, {', '.join(names)}") from None
    if not isinstance(weights, enum):
        raise DanceError(f"pretrained backbone {spec!r} is for another architecture than {arch} "
                         f"(use one of DEFAULT, {', '.join(names)})")
    return weights


def hub_cache_path(url: str) -> Path:
    """Where torch.hub keeps (and looks for) the file behind ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _read_torchvision(weights, spec: str, arch: str) -> dict[str, torch.Tensor]:
    url = weights.url
    cached = hub_cache_path(url)
    if not cached.is_file():
        parsed = urlparse(url)
        offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0")
        if offline or not _reachable(parsed.hostname, parsed.port or 443, CONNECT_TIMEOUT_S):
            raise DanceError(
                f"pretrained backbone {spec!r} ({arch}) is not downloaded and {url} cannot be "
                f"reached{' (' + OFFLINE_ENV + ' is set)' if offline else ''}: put the file at "
                f"{cached}, or pass a local .safetensors/.pth file as pretrained_backbone")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30.0)  # a stalled download fails instead of hanging
    try:
        return torch.hub.load_state_dict_from_url(
            url, model_dir=str(cached.parent), map_location="cpu", progress=False,
            check_hash=True, weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:  # URLError, timeout, hash mismatch
        raise DanceError(f"pretrained backbone {spec!r}: download of {url} to {cached} failed "
                         f"({type(e).__name__}); put the file there by hand, or pass a local "
                         f".safetensors/.pth file") from None
    finally:
        socket.setdefaulttimeout(previous)


def _reachable(host: str | None, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout_s``. Runs in a daemon
    thread so a hanging DNS lookup (which ignores socket timeouts) cannot block us either."""
    if not host:
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    return bool(ok)


def _load_checked(backbone: nn.Module, state: dict[str, torch.Tensor], source: str,
                  arch: str) -> None:
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP

    def weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # BatchNorm's step counter is not a weight (and old torchvision files lack it).
        return {k: v for k, v in sd.items()
                if not k.startswith(_HEAD_PREFIXES) and not k.endswith("num_batches_tracked")}

    own, given = weights(backbone.state_dict()), weights(state)
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    mismatched = [f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in given and given[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch", mismatched)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise DanceError(f"{source}: weights of another architecture than {arch} "
                         f"({'; '.join(parts)})")
    backbone.load_state_dict(given, strict=False)
