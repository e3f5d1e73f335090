"""What keeps a run folder honest (docs/checkpoints.md#run-folder):

* a fingerprint of everything that determines a run's result (the resolved config, the
  dataset's identity, the package version), so a resume or a reused compare run can be checked
  against the config it is asked to continue;
* a lock, so one process at a time writes a folder;
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dance.engine.config import prune_window
from dance.errors import DanceError

FINGERPRINT_FILE = "fingerprint.json"
LOCK_FILE = ".lock"
# Config keys that change how fast a run goes, never what it computes (beyond the order of
# floating-point sums).
_NOT_RESULT_KEYS = (("train", "workers"), ("train", "threads"), ("train", "profile"),
                    ("train", "warmup_shapes"), ("train", "small_map_convs"))


def dataset_identity(dataset) -> dict:
    """Split, number of samples and a hash of every sample's id and file sizes."""
    h = hashlib.sha256()
    for s in dataset.samples:
        sizes = [_size(s.image), _size(s.mask) if s.mask is not None else -1]
        h.update(f"{s.id}\0{sizes[0]}\0{sizes[1]}\n".encode())
    return {"split": dataset.split, "samples": len(dataset.samples), "ids_sha256": h.hexdigest()}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


# data_slimming keys a plan file replaces (its scales, drops and weights were made with them)
_PLAN_FILE_KEYS = ("indicator", "schedule", "drop", "downsample", "drop_above", "weighting",
                   "keep_floor", "scales_per_epoch", "final_full")


# (section, key, value): a key whose value gives what every run did before the key existed,
# dropped so those runs keep their fingerprints (stretch 1: as many epochs as the plain run;
# max_channel_cut 1: no limit; probe_loss pixel: the loss every run measured on)
_AS_BEFORE_THE_KEY = (("data_slimming", "stretch", 1.0), ("data_slimming", "drop_above", None),
                      ("network_slimming", "max_channel_cut", 1.0),
                      ("network_slimming", "revive_dead", False),
                      ("network_slimming", "probe_loss", "pixel"))


def result_config(config: dict) -> dict:
    """The resolved config less what cannot change the result: speed-only keys, and the
    settings of a slimming part that is switched off."""
    cfg = json.loads(json.dumps(config))
    for section, key in _NOT_RESULT_KEYS:
        cfg.get(section, {}).pop(key, None)
    for part in ("data_slimming", "network_slimming"):
        if part in cfg and not cfg[part].get("enabled", True):
            cfg[part] = {"enabled": False}
    ds = cfg.get("data_slimming", {})
    if ds.get("policy") in ("uniform", "progressive") and ds.get("enabled", True):
        # these controls plan from the budget alone: no scores, drops, weights or re-plans
        kept = {"enabled": True, "policy": ds["policy"], "budget": ds["budget"]}
        if ds.get("stretch", 1.0) != 1.0:
            kept["stretch"] = ds["stretch"]
        if ds["policy"] == "progressive" and ds.get("final_full"):
            kept["final_full"] = ds["final_full"]  # the one setting of its schedule
        cfg["data_slimming"] = kept
    if ds.get("plan") and ds.get("policy") in ("dance", "shuffled") and ds.get("enabled", True):
        for key in _PLAN_FILE_KEYS:  # the plan file decides these
            ds.pop(key, None)
    if cfg.get("data_slimming") == {"enabled": False}:  # every image at scale 1
        cfg.get("train", {}).pop("jitter_follows_scale", None)
    for section, key, value in _AS_BEFORE_THE_KEY:  # settings that left runs as they were
        part = cfg.get(section, {})
        if key in part and part[key] == value:
            del part[key]
    ns, epochs = cfg.get("network_slimming", {}), cfg.get("train", {}).get("epochs", 0)
    if "prune_within_epochs" in ns and prune_window(ns["prune_within_epochs"], epochs) is None:
        del ns["prune_within_epochs"]  # points over the whole run: as before the key existed
    if ns.get("sparsity_after_last_point"):
        del ns["sparsity_after_last_point"]  # what every run did before the key existed
    if ns.get("keep_optimizer_state") is False or (
            ns.get("keep_optimizer_state") == "auto" and not ds.get("enabled", True)):
        del ns["keep_optimizer_state"]  # off (auto is off without a data plan): as before
    train = cfg.get("train", {})
    if not train.get("decode_cache"):  # off: as a run made before the cache existed
        train.pop("decode_cache", None)
        train.pop("decode_cache_gb", None)
    else:  # on: which images it serves at a reduced level counts, not where the folder is
        train["decode_cache"] = True
    return cfg


def dataset_fingerprint(train_ds, val_ds) -> dict:
    """The dataset part of a fingerprint: one pass over the two splits' files."""
    return {"name": train_ds.name, "train_split": dataset_identity(train_ds),
            "val_split": dataset_identity(val_ds)}


def run_fingerprint(config: dict, dataset: dict) -> dict:
    """What determines a run's result: its config (``result_config``), the dataset part
    (``dataset_fingerprint``, the same for every run on that data) and the version."""
    from dance import __version__
    return {"config": result_config(_plan_by_content(config)), "dataset": dataset,
            "dance_version": __version__}


def _plan_by_content(config: dict) -> dict:
    """``config`` with a plan file's path replaced by its content's SHA-256: an edited file is a
    different run, a moved one the same. An unreadable file is left as its path (training names
    the problem when it reads it)."""
    path = config.get("data_slimming", {}).get("plan")
    if not path:
        return config
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return config
    config = json.loads(json.dumps(config))
    config["data_slimming"]["plan"] = f"sha256:{digest}"
    return config


def fingerprint_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprints (or configs)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys = list(dict.fromkeys([*old, *new]))
        return [d for k in keys
                for d in fingerprint_diff(old.get(k, _MISSING), new.get(k, _MISSING),
                                          f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "fingerprint"]


_MISSING = object()


def describe_diff(keys: list[str], limit: int = 6) -> str:
    """``config.data_slimming.budget, ...`` shortened for a one-line message."""
    shown = [k.removeprefix("config.") for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@contextlib.contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs; a second writer gets a one-line DanceError
    naming the holder's pid. The lock (``flock`` on ``.lock``) dies with its process, so a
    killed run never leaves its folder locked. A folder this call created and that the block
    left holding nothing but the lock (a run that failed on its data, say) is removed when the
    block raises, so a failed start leaves no empty run folder behind."""
    import fcntl
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DanceError(f"{folder}: being written by another dance process (pid {holder}); "
                         "wait for it to finish or choose another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    except BaseException:
        if created and os.listdir(folder) == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                os.unlink(folder / LOCK_FILE)
                folder.rmdir()
        raise
    finally:
        os.close(fd)  # releases the lock

