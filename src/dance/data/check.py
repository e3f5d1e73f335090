"""`dance check-data`: validate a dataset split up front (docs/datasets.md#check-data).

It decodes only what it must. Image sizes come from file headers. Truncation is caught cheaply:
a PNG is walked chunk by chunk with PIL's ``verify`` (CRCs checked, pixels not inflated) and must
end with a complete IEND chunk within its last 1 KiB; a JPEG must end with its end-of-image
marker (FFD9) within its last 1 KiB (a little slack so trailing padding or metadata after EOI is
not flagged; entropy-coded data never contains FFD9, so a file cut inside its pixel data always
fails); any other format is decoded in full. Masks get the same check, then are decoded in full,
since their values are needed for the class histogram.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from dance.data.datasets import (
    SegmentationDataset,
    mask_value_counts,
    missing_mask_problem,
    open_dataset,
    size_mismatch_problem,
)
from dance.data.io import image_size, open_image, read_image, read_mask
from dance.errors import DanceError
from dance.faults import fault_point
from dance.parallel import parallel_map

_TAIL_BYTES = 1024
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC, the last 8 bytes of a PNG


@dataclass
class CheckReport:
    """What `dance check-data` found; ``to_json`` gives the fields of docs/cli.md#check-data-json."""

    dataset: str
    split: str
    num_samples: int
    num_classes: int
    class_pixels: list[int]  # pixels per train class, in class order, over problem-free samples
    ignore_pixels: int
    problems: list[dict] = field(default_factory=list)  # {"file": str, "problem": str}
    class_names: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _problem_text(err: DanceError, path: str | os.PathLike) -> str:
    """A DanceError's message without the leading file name (the report names the file)."""
    text, prefix = str(err), f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _tail(f, magic: bytes) -> bytes:
    f.seek(0, os.SEEK_END)
    f.seek(max(len(magic), f.tell() - _TAIL_BYTES))
    return f.read()


def _verify_file(path: str, decode) -> None:
    """Cheap integrity check of an image or mask file (module docstring); DanceError if it is
    broken. ``decode`` reads a format other than JPEG and PNG in full."""
    with open(path, "rb") as f:
        magic = f.read(8)
        if magic.startswith(b"\xff\xd8"):
            if b"\xff\xd9" not in _tail(f, magic):
                raise DanceError(f"{path}: truncated JPEG (no end-of-image marker)")
            return
        if magic == b"\x89PNG\r\n\x1a\n" and _PNG_END not in _tail(f, magic):
            # PIL's verify stops at IEND's type without reading its CRC: a cut there passes it
            raise DanceError(f"{path}: truncated PNG (no complete end chunk)")
    if magic != b"\x89PNG\r\n\x1a\n":
        decode(path)
        return
    with open_image(path, "PNG") as im:
        im.verify()


def _check_sample(item: tuple[str, str | None, str], valid_raw: np.ndarray
                  ) -> tuple[list[tuple[str, str]], np.ndarray | None]:
    """Problems ``[(file, problem)]`` of one sample, and its raw-value histogram if it has none."""
    image, mask, expected_mask = item
    fault_point("check-sample")
    problems: list[tuple[str, str]] = []
    image_hw = None
    try:
        image_hw = image_size(image)
        _verify_file(image, read_image)
    except DanceError as e:
        problems.append((image, _problem_text(e, image)))
    if mask is None:
        problems.append((image, missing_mask_problem(Path(expected_mask))))
        return problems, None
    try:
        _verify_file(mask, read_mask)
        raw = read_mask(mask)
    except DanceError as e:
        problems.append((mask, _problem_text(e, mask)))
        return problems, None
    if image_hw is not None and raw.shape != image_hw:
        problems.append((mask, size_mismatch_problem(raw.shape, image_hw, Path(image))))
    try:
        counts = mask_value_counts(raw, valid_raw, mask)
    except DanceError as e:
        problems.append((mask, _problem_text(e, mask)))
        return problems, None
    return problems, (None if problems else counts)


def check_dataset(dataset: SegmentationDataset, workers: int | None = None,
                  progress: bool = True) -> CheckReport:
    """Check every sample of ``dataset`` over a process pool; all problems are listed, not just
    the first. ``class_pixels``/``ignore_pixels`` count samples without problems only."""
    items = [(str(s.image), None if s.mask is None else str(s.mask), str(dataset.expected_mask(s)))
             for s in dataset.samples]
    worker = partial(_check_sample, valid_raw=dataset.valid_raw)
    problems: list[dict] = []
    value_counts = np.zeros(256, dtype=np.int64)
    split_problem = dataset.split_problem()
    if split_problem:
        problems.append({"file": str(dataset.image_dir), "problem": split_problem})
    # workers None: every core; 0 or 1: this process. Problems listed in sample order
    for sample_problems, counts in parallel_map(worker, items, workers, progress=progress,
                                                desc=f"check-data {dataset.name}/{dataset.split}",
                                                ordered=True, what="checking the data"):
        problems.extend({"file": f, "problem": p} for f, p in sample_problems)
        if counts is not None:
            value_counts += counts
    class_pixels, ignore_pixels = dataset.class_pixel_counts(value_counts)
    return CheckReport(dataset=dataset.name, split=dataset.split, num_samples=len(dataset),
                       num_classes=dataset.num_classes, class_pixels=class_pixels.tolist(),
                       ignore_pixels=ignore_pixels, problems=problems,
                       class_names=list(dataset.class_names))


def format_report(report: CheckReport, max_problems: int = 20) -> str:
    """A short human summary: pixels per class, then the problems."""
    total = sum(report.class_pixels) + report.ignore_pixels
    lines = [f"{report.dataset} {report.split}: {report.num_samples} samples, "
             f"{report.num_classes} classes, {len(report.problems)} problems"]
    width = max((len(n) for n in report.class_names), default=6)
    rows = list(zip(report.class_names, report.class_pixels)) + [("(ignore)", report.ignore_pixels)]
    for name, pixels in rows:
        share = 100.0 * pixels / total if total else 0.0
        lines.append(f"  {name:<{max(width, 8)}} {pixels:>14,d} px {share:6.2f}%")
    if report.problems:
        lines.append("problems:")
        lines += [f"  {p['file']}: {p['problem']}" for p in report.problems[:max_problems]]
        if len(report.problems) > max_problems:
            lines.append(f"  ... and {len(report.problems) - max_problems} more (--json lists all)")
    return "\n".join(lines)


def cli_check_data(args) -> int:
    """Handler of `dance check-data`: exit 1 when any problem is found, 0 otherwise."""
    dataset = open_dataset(args.dataset, args.root, args.split, allow_empty=True)
    report = check_dataset(dataset, workers=args.workers)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(format_report(report))
    return 1 if report.problems else 0
