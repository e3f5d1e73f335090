"""Checkpoints (docs/checkpoints.md): ``model.safetensors`` + ``state.json``, no pickle anywhere.

A checkpoint folder is written whole into a sibling temp folder and swapped in by renames, so a
kill at any moment leaves either the previous checkpoint or the new one, never a mix. The state
holds everything a resume needs: the architecture (model name, classes, removed branches), the
optimizer's tensors (in the safetensors file under ``optim/``), RNG state, the data plan, the
slimmer, the per-image hardness and the running cost totals.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from dance.engine.runtime import unwrap_model
from dance.errors import DanceError, WriteError
from dance.faults import fault_point
from dance.fileio import atomic_write_json, fsync_dir, write_file_synced
from dance.network.registry import Architecture, architecture, check_options

MODEL_FILE = "model.safetensors"  # the weights alone: safetensors.torch.load_file + load_state_dict
TRAINER_FILE = "trainer.safetensors"  # what only a resume needs: optimizer state, RNG states
STATE_FILE = "state.json"
_FILES = (MODEL_FILE, TRAINER_FILE)
CHECKPOINT = "checkpoint"  # the folder's name inside a run folder
# state.json's "integrity": the SHA-256 of both tensor files and of the rest of state.json, so a
# truncated, bit-flipped or hand-edited checkpoint is an error naming the file, never a silent load
INTEGRITY = "integrity"


def _complete(folder: Path) -> bool:
    # state.json is written (atomically) after the tensors, so its presence means complete
    return all((folder / f).is_file() for f in (STATE_FILE, *_FILES))


def _real(folder: Path) -> Path:
    """A checkpoint folder that is a symlink (to a bigger disk, say) is written where it points,
    so the link stays valid across swaps."""
    return Path(os.path.realpath(folder)) if folder.is_symlink() else folder


def _generations(folder: Path) -> list[Path]:
    """A checkpoint folder's name with its swap siblings, newest first: a complete ``.new`` (a
    kill during the swap left it), the folder, a ``.old`` (a kill between the two renames)."""
    folder = _real(folder)
    return [folder.with_name(folder.name + ".new"), folder,
            folder.with_name(folder.name + ".old")]


def find_checkpoint(path: str | Path) -> Path | None:
    """The complete checkpoint folder of a run folder or checkpoint folder, or None. Only the
    run's own ``checkpoint``, ``checkpoint.new`` and ``checkpoint.old`` are looked at: never a
    sibling of the run folder."""
    p = Path(os.path.abspath(path))  # "." inside a checkpoint folder has a name
    if p.name == CHECKPOINT:
        cands = _generations(p)
    else:
        cands = [p, *_generations(p / CHECKPOINT)]
    return next((cand for cand in cands if _complete(cand)), None)


def _checkpoint_dir(path: str | Path) -> Path:
    """A run folder or a checkpoint folder -> the checkpoint folder, or a DanceError."""
    p = Path(path)
    found = find_checkpoint(p)
    if found is not None:
        return found
    if not p.exists():
        raise DanceError(f"{p}: checkpoint not found")
    old = next((c for c in (p, p / CHECKPOINT) if (c / MODEL_FILE).is_file()
                and (c / STATE_FILE).is_file()), None)
    if old is not None:
        raise DanceError(f"{old}: a checkpoint of dance 0.1 (no {TRAINER_FILE}, no checksums); "
                         "this version cannot load it")
    raise DanceError(f"{p}: not a run or checkpoint folder (no {MODEL_FILE}, {TRAINER_FILE} "
                     f"and {STATE_FILE})")


def _remove(path: Path) -> None:
    """Delete a file, a symlink (not what it points to) or a folder tree, if it is there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def rng_tensors() -> dict[str, torch.Tensor]:
    """Every random generator a resumed run must continue: the CPU's, and each CUDA device's
    once CUDA is in use (dropout and random crops on the GPU draw from those)."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = st
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Put back what ``rng_tensors`` saved. A checkpoint from another number of GPUs restores
    the devices both have."""
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in tensors.items()
                  if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        for i, st in cuda[:torch.cuda.device_count()]:
            torch.cuda.set_rng_state(st, i)


def save_checkpoint(folder: str | Path, model: nn.Module, state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``folder`` (e.g. ``run/checkpoint``) atomically as a whole: into ``folder.new``,
    every file and the folder fsynced, then swapped in (``finish_swap``). A failed write (disk
    full) is a one-line WriteError naming the file, and the previous checkpoint is untouched."""
    folder = _real(Path(folder))
    model = unwrap_model(model)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state = dict(state)
    state["arch"] = architecture(model).to_json()
    trainer = rng_tensors()
    if optimizer is not None:
        opt_tensors, opt_state = _optimizer_to_flat(optimizer, model)
        trainer.update(opt_tensors)
        state["optimizer"] = opt_state
    blobs = {MODEL_FILE: save_safetensors(weights, metadata={"format": "dance-weights"}),
             TRAINER_FILE: save_safetensors(trainer, metadata={"format": "dance-trainer"})}
    state = json.loads(json.dumps(state))  # as it will read back (tuples as lists)
    state[INTEGRITY] = {**{f: hashlib.sha256(b).hexdigest() for f, b in blobs.items()},
                        STATE_FILE: hashlib.sha256(_canonical(state)).hexdigest()}
    tmp = folder.with_name(folder.name + ".new")
    try:
        _remove(tmp)
        tmp.mkdir(parents=True)
        for name, blob in blobs.items():
            write_file_synced(tmp / name, blob)
        fault_point("checkpoint-weights")
        atomic_write_json(tmp / STATE_FILE, state)
        fsync_dir(tmp)
    except OSError as e:
        try:
            _remove(tmp)
        except OSError:
            pass
        intact = (f"the previous checkpoint {folder} is intact" if _complete(folder)
                  else "no earlier checkpoint was there")
        where = e.filename or tmp
        reason = getattr(e, "reason", None) or e.strerror or e
        raise WriteError(f"{where}: cannot write the checkpoint ({reason}); {intact}", e.errno,
                         str(where), str(reason)) from None
    fault_point("checkpoint-written")
    return finish_swap(folder)


def finish_swap(folder: str | Path) -> Path:
    """Swap a complete ``folder.new`` in for ``folder`` (keeping the previous one as
    ``folder.old`` until the new one is in place), each rename fsynced. Resume calls it too, to
    finish a swap a kill interrupted; without a complete ``.new`` it only clears what a kill
    left beside a complete ``folder``."""
    folder = _real(Path(folder))
    tmp, _, old = _generations(folder)
    if not _complete(tmp):
        if _complete(folder):  # a swap killed before its clean-up, or a .new cut short
            _remove(old)
            _remove(tmp)
        return folder
    if folder.exists():
        _remove(old)
        folder.rename(old)
    fault_point("checkpoint-swap")
    tmp.rename(folder)
    fsync_dir(folder.parent)
    fault_point("checkpoint-swapped")
    _remove(old)
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
    """``state.json`` of a run or checkpoint folder, its checksum verified, without loading the
    weights. Every way it can be damaged is one DanceError naming it."""
    folder = _checkpoint_dir(path)
    file = folder / STATE_FILE
    try:
        state = json.loads(file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DanceError(f"{file}: corrupt checkpoint state ({str(e)[:120]})") from None
    except OSError as e:
        raise DanceError(f"{file}: cannot read the checkpoint state ({e.strerror})") from None
    digests = state.pop(INTEGRITY, None) if isinstance(state, dict) else None
    if not isinstance(digests, dict) or not all(
            isinstance(digests.get(k), str) for k in (*_FILES, STATE_FILE)):
        raise DanceError(f"{file}: not a dance checkpoint, or one without checksums (damaged, "
                         "or written by dance before 0.2)")
    if hashlib.sha256(_canonical(state)).hexdigest() != digests[STATE_FILE]:
        raise DanceError(f"{file}: checksum mismatch: the checkpoint state was damaged or "
                         "edited after it was written")
    state[INTEGRITY] = digests
    return state, folder


def _read_tensors(folder: Path, name: str, digest: str) -> dict[str, torch.Tensor]:
    file = folder / name
    try:
        blob = file.read_bytes()
    except OSError as e:
        raise DanceError(f"{file}: cannot read the checkpoint's tensors ({e.strerror})") from None
    if hashlib.sha256(blob).hexdigest() != digest:
        raise DanceError(f"{file}: checksum mismatch: the file is truncated or damaged "
                         f"({len(blob):,} bytes)")
    try:
        return load_safetensors(blob)
    except (SafetensorError, OSError, ValueError) as e:
        raise DanceError(f"{file}: corrupt checkpoint tensors ({e})") from None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """The tensors and state of a run or checkpoint folder, every checksum verified and the
    architecture checked, so what reaches the model builder is what was saved. The tensors
    come as one dict: the weights under ``model/``, then ``optim/`` and ``rng/``."""
    state, folder = read_state(path)
    digests = state[INTEGRITY]
    tensors = {f"model/{k}": v for k, v in
               _read_tensors(folder, MODEL_FILE, digests[MODEL_FILE]).items()}
    tensors.update(_read_tensors(folder, TRAINER_FILE, digests[TRAINER_FILE]))
    file = folder / TRAINER_FILE
    source = str(folder / STATE_FILE)
    if "arch" not in state:
        raise DanceError(f"{source}: not a dance checkpoint (no architecture)")
    arch = Architecture.from_json(state["arch"], source)  # malformed: one line
    problem = check_options(arch.name, arch.kwargs)
    if problem is not None:
        raise DanceError(f"{source}: architecture: {problem}")
    if "rng/torch" not in tensors:
        raise DanceError(f"{file}: not a dance checkpoint (no random-generator state)")
    return tensors, state, folder


def build_from_arch(arch: dict, source: str = "architecture") -> nn.Module:
    """Rebuild the (slimmed) architecture a checkpoint describes, untrained; one that does not
    build (a removal naming a layer or channel the model has not) is a DanceError naming
    ``source``."""
    try:
        return Architecture.from_json(arch, source).build()
    except DanceError as e:
        text = str(e)
        raise DanceError(text if text.startswith(source) else
                         f"{source}: the architecture does not rebuild ({text})") from None


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


def open_checkpoint(checkpoint: str | Path) -> tuple[nn.Module, dict, Path]:
    """The slimmed model of a run or checkpoint folder with its weights, in eval mode; its
    ``state.json``; and the checkpoint folder it came from. One read of each file."""
    tensors, state, folder = read_checkpoint(checkpoint)
    model = build_from_arch(state["arch"], str(folder / STATE_FILE))
    load_weights(model, tensors, folder / MODEL_FILE)
    return model.eval(), state, folder


def load_model(checkpoint: str | Path) -> nn.Module:
    """The slimmed architecture of a run or checkpoint folder with its weights, in eval mode."""
    return open_checkpoint(checkpoint)[0]
