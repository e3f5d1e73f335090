"""Checkpoints (docs/checkpoints.md): ``model.safetensors`` + ``state.json``, no pickle anywhere.

A checkpoint folder is written whole into a sibling temp folder and swapped in by renames, so a
kill at any moment leaves either the previous checkpoint or the new one, never a mix. The state
holds everything a resume needs: the architecture (model name, classes, removed branches), the
optimizer's tensors (in the safetensors file under ``optim/``), RNG state, the data plan, the
slimmer, the per-image hardness and the running cost totals.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dance.engine.run_folder import fault_point
from dance.engine.runtime import unwrap_model
from dance.errors import DanceError
from dance.fileio import atomic_write_json
from dance.network.registry import Architecture, architecture

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"


def _complete(folder: Path) -> bool:
    # state.json is written (atomically) after the weights, so its presence means complete
    return (folder / STATE_FILE).is_file() and (folder / MODEL_FILE).is_file()


def find_checkpoint(path: str | Path) -> Path | None:
    """The complete checkpoint folder of a run folder or checkpoint folder, or None. A complete
    ``checkpoint.new`` (a kill during the swap left it) is newer than the others."""
    p = Path(path)
    cands = [p, p / "checkpoint.new", p / "checkpoint", p.with_name(p.name + ".old"),
             p / "checkpoint.old"]
    if p.name == "checkpoint":
        cands.insert(0, p.with_name("checkpoint.new"))
    return next((cand for cand in cands if _complete(cand)), None)


def _checkpoint_dir(path: str | Path) -> Path:
    """A run folder or a checkpoint folder -> the checkpoint folder, or a DanceError."""
    p = Path(path)
    found = find_checkpoint(p)
    if found is not None:
        return found
    if not p.exists():
        raise DanceError(f"{p}: checkpoint not found")
    raise DanceError(f"{p}: not a run or checkpoint folder (no {MODEL_FILE} + {STATE_FILE})")


def save_checkpoint(folder: str | Path, model: nn.Module, state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``folder`` (e.g. ``run/checkpoint``) atomically as a whole."""
    folder = Path(folder)
    model = unwrap_model(model)
    tensors = {f"model/{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state = dict(state)
    state["arch"] = architecture(model).to_json()
    if optimizer is not None:
        opt_tensors, opt_state = _optimizer_to_flat(optimizer, model)
        tensors.update(opt_tensors)
        state["optimizer"] = opt_state
    tensors["rng/torch"] = torch.get_rng_state()
    tmp = folder.with_name(folder.name + ".new")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "dance-checkpoint"})
    atomic_write_json(tmp / STATE_FILE, state)
    fault_point("checkpoint-written")
    return finish_swap(folder)


def finish_swap(folder: str | Path) -> Path:
    """Swap a complete ``folder.new`` in for ``folder`` (keeping the previous one as
    ``folder.old`` until the new one is in place). Resume calls it too, to finish a swap a kill
    interrupted; without a complete ``.new`` it changes nothing."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".new")
    old = folder.with_name(folder.name + ".old")
    if not _complete(tmp):
        return folder
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    fault_point("checkpoint-swap")
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def _optimizer_to_flat(optimizer: torch.optim.Optimizer, model: nn.Module):
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, per_param = {}, {}
    for p, st in optimizer.state.items():
        name = names[id(p)]
        scalars = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{name}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[k] = v
        per_param[name] = scalars
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, {"groups": groups, "scalars": per_param}


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                         tensors: dict[str, torch.Tensor], opt_state: dict) -> None:
    model = unwrap_model(model)
    params = dict(model.named_parameters())
    for g, saved in zip(optimizer.param_groups, opt_state["groups"]):
        g.update(saved)
    for name, p in params.items():
        st = dict(opt_state["scalars"].get(name, {}))
        prefix = f"optim/{name}/"
        for k, v in tensors.items():
            if k.startswith(prefix):
                key = k[len(prefix):]
                # Adam's step count stays on the CPU (as torch keeps it unless capturable)
                st[key] = v if key == "step" and v.dim() == 0 else v.to(p.device)
        if st:
            optimizer.state[p] = st


def read_state(path: str | Path) -> tuple[dict, Path]:
    """``state.json`` of a run or checkpoint folder, without loading the weights."""
    folder = _checkpoint_dir(path)
    try:
        return json.loads((folder / STATE_FILE).read_text()), folder
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DanceError(f"{folder / STATE_FILE}: corrupt checkpoint state ({e})") from None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    state, folder = read_state(path)
    try:
        tensors = load_file(str(folder / MODEL_FILE))
    except (SafetensorError, OSError) as e:
        raise DanceError(f"{folder / MODEL_FILE}: corrupt checkpoint weights ({e})") from None
    if "arch" not in state:
        raise DanceError(f"{folder / STATE_FILE}: not a dance checkpoint (no architecture)")
    Architecture.from_json(state["arch"], str(folder / STATE_FILE))  # malformed: one line
    return tensors, state, folder


def build_from_arch(arch: dict) -> nn.Module:
    """Rebuild the (slimmed) architecture a checkpoint describes, untrained."""
    return Architecture.from_json(arch).build()


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``model/`` tensors; another architecture is a clear error."""
    model = unwrap_model(model)
    weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    bad_shape = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or unexpected or bad_shape:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {unexpected[:3]}" if unexpected else f"shape mismatch {bad_shape[:3]}")
        arch = getattr(model, "dance_arch", None)
        arch = arch.name if arch is not None else type(model).__name__
        raise DanceError(f"{source}: checkpoint weights do not fit model {arch} ({detail})")
    model.load_state_dict(weights)


def load_model(checkpoint: str | Path) -> nn.Module:
    """The slimmed architecture of a run or checkpoint folder with its weights, in eval mode."""
    tensors, state, folder = read_checkpoint(checkpoint)
    model = build_from_arch(state["arch"])
    load_weights(model, tensors, folder / MODEL_FILE)
    return model.eval()
