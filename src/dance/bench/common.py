"""What every benchmark shares: the machine a number was measured on, markdown tables, runs
timed side by side, the SynthStreets set it runs on, progress lines and printing the result."""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from dance.errors import DanceError
from dance.parallel import usable_cores


def machine_info(device: str | torch.device = "cpu") -> dict:
    """What a number was measured on: platform, usable CPUs, load, torch, the CUDA device."""
    device = torch.device(device)
    info = {"platform": platform.platform(), "cpu_count": usable_cores(), "torch": torch.__version__,
            "load_average_start": os.getloadavg()[0], "device": str(device)}
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


def finish_machine(info: dict) -> dict:
    """``info`` with the load at the end too: a busy shared machine shows in it, and the reader
    can judge."""
    return {**info, "load_average_end": os.getloadavg()[0]}


def machine_line(info: Mapping) -> str:
    """One line naming the machine of ``info`` (`machine_info`)."""
    where = f"CUDA {info['cuda_device']}" if "cuda_device" in info else "CPU"
    load = f"load {info['load_average_start']:.1f}"
    if "load_average_end" in info:
        load += f" → {info['load_average_end']:.1f}"
    return (f"Machine: {info['platform']}, {info['cpu_count']} CPUs ({load}), "
            f"torch {info['torch']}, {where}.")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def side_by_side(runs: Mapping[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    """Best images/s of each run over ``repeats`` rounds. Each run returns how many images it
    processed; every round runs all of them once, in turn, so a busy moment of a shared machine
    falls on one round of each rather than on one run."""
    best = {name: 0.0 for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            images = run()
            best[name] = max(best[name], images / (time.perf_counter() - start))
    return best


def user_cache_dir() -> Path:
    """This user's private dance cache folder: ``$XDG_CACHE_HOME/dance`` (else
    ``~/.cache/dance``), created with mode 700. Not the shared temp folder: there another local
    user could create the folder first, or a symlink pointing elsewhere, and have a benchmark
    read their files or write into theirs. A folder that is a symlink, or is not this user's,
    is a DanceError."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "dance"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(folder)
    except OSError as e:
        raise DanceError(f"{folder}: cannot create the benchmark cache folder ({e.strerror}); "
                         "pass --data FOLDER") from None
    import stat
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise DanceError(f"{folder}: not a folder of this user (a symlink, or another user's); "
                         "refusing to use it for benchmark data; pass --data FOLDER")
    if st.st_mode & 0o022:
        raise DanceError(f"{folder}: other users may write into it (mode "
                         f"{stat.S_IMODE(st.st_mode):o}); chmod 700 it, or pass --data FOLDER")
    return folder


def synth_root(data: str | os.PathLike | None, train: int, val: int,
               size: tuple[int, int]) -> Path:
    """``data``, or a folder named by the set in this user's cache (``user_cache_dir``),
    reused by later runs."""
    if data is not None:
        return Path(data)
    h, w = size
    return user_cache_dir() / f"bench-synth-{train}-{val}-{h}x{w}"


def synth_dataset(root: Path, train: int, val: int, size: tuple[int, int]):
    """The train split of SynthStreets at ``root`` (generated unless complete there already),
    and `generate_synthstreets`'s summary of what it made."""
    from dance.data.datasets import open_dataset
    from dance.data.synth import generate_synthstreets
    made = generate_synthstreets(root, train=train, val=val, size=size, seed=0, progress=True)
    return open_dataset("synth", root, "train"), made


def jpeg_folder(dataset, root: Path, quality: int = 90):
    """``dataset``'s samples as a `folder`-layout dataset at ``root`` with JPEG images (quality
    ``quality``) and train-id PNG masks: the format of BDD100K, ADE20K and most users' own
    photos, for benchmarks of JPEG decoding. Written once, reused while complete."""
    from PIL import Image

    from dance.data.datasets import open_dataset
    from dance.fileio import atomic_write_bytes
    images, masks = root / "images" / "train", root / "masks" / "train"
    for index, sample in enumerate(dataset.samples):
        stem = sample.id.replace("/", "_")
        jpg, png = images / f"{stem}.jpg", masks / f"{stem}.png"
        if jpg.is_file() and png.is_file():
            continue
        image, mask = dataset.load(index)
        for path, im, kw in ((jpg, Image.fromarray(image), {"quality": quality}),
                             (png, Image.fromarray(mask), {})):
            buf = io.BytesIO()
            im.save(buf, "JPEG" if path.suffix == ".jpg" else "PNG", **kw)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buf.getvalue())
    (root / "classes.json").write_text(json.dumps(dataset.class_names))
    return open_dataset("folder", root, "train")


def say(message: str) -> None:
    """A progress line on stderr (stdout is for the table or the JSON)."""
    print(f"[dance bench] {message}", file=sys.stderr, flush=True)


def cli_runner(bench: Callable[..., dict], format: Callable[[dict], str], *options: str
               ) -> Callable[[argparse.Namespace], int]:
    """The ``dance bench NAME`` handler: ``bench`` called with the parsed ``options`` in order,
    its result printed by ``show``."""
    def run(args: argparse.Namespace) -> int:
        return show(args, bench(*(getattr(args, o) for o in options)), format)
    run.__doc__ = f"``dance bench``: {bench.__name__} with --{', --'.join(options)}."
    return run


def show(args: argparse.Namespace, result: dict, format: Callable[[dict], str]) -> int:
    """Print ``result`` as one JSON object with ``--json``, else as ``format`` prints it."""
    if args.json:
        from dance.fileio import jsonable  # NaN (a constant column) -> null
        print(json.dumps(jsonable(result), indent=2))
    else:
        print(format(result))
    return 0
