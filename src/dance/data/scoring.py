"""Score every image of a split by spatial complexity, cached (docs/method.md#complexity-indicators;
`dance score`: docs/cli.md#dance-score).

One decode per image serves every requested indicator; images are scored in parallel by a
process pool. The cache is a JSON file keyed by each file's resolved path, size, mtime and ctime
(``dance.data.io.file_key``): an unchanged file is never decoded again, a changed one is
re-scored. Image indicators are keyed by the image file, label indicators by the mask file
(plus the scale and the dataset's label table, which change what they measure). A cache made by
other indicator code or other decoders (``cache_tag``) is not used.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dance.data.complexity import (
    IMAGE_INDICATORS,
    INDICATORS_VERSION,
    LABEL_INDICATORS,
    LUMA_INDICATORS,
    all_indicators,
    check_indicators,
)
from dance.data.io import file_key, read_image, read_luma, read_mask
from dance.errors import DanceError
from dance.faults import fault_point
from dance.fileio import atomic_write_json, atomic_write_text
from dance.parallel import parallel_map, worker_count

CSV_HEADER = ("id", "path", "indicator", "score")
CACHE_FORMAT = "dance-score-cache"
CACHE_VERSION = 2  # 2: entries carry the ctime; the file records the code that scored them
DEFAULT_CACHE_NAME = "dance-scores.cache.json"  # inside the dataset root when there is no --out

# Files decoded by scoring in this process and its workers (workers report theirs back), so a
# test or a benchmark can count that a cached image is never decoded again.
decode_counts: dict[str, int] = {"image": 0, "mask": 0}


class ScoreRow(NamedTuple):
    id: str
    path: str
    indicator: str
    score: float


class CacheWarning(UserWarning):
    """The score cache could not be read or written; scoring goes on without it."""


# --- cache ------------------------------------------------------------------------------------

def _label_table_tag(dataset) -> str:
    """Short digest of the raw-value -> train-id table: a new table re-scores label indicators."""
    return hashlib.sha1(np.ascontiguousarray(dataset.lut).tobytes()).hexdigest()[:10]


def _score_key(indicator: str, scale: float, table_tag: str) -> str:
    if indicator == "label_aliasing":
        return f"{indicator}@{scale:g}#{table_tag}"
    if indicator in LABEL_INDICATORS:
        return f"{indicator}#{table_tag}"
    return indicator


_STAMP = ("size", "mtime_ns", "ctime_ns")


def cache_tag() -> dict[str, str]:
    """The code a cached score came from: the indicators' formulas and the decoders, whose
    versions can change decoded pixels (libjpeg-turbo's IDCT, say)."""
    import PIL
    tag = {"indicators": str(INDICATORS_VERSION), "pillow": PIL.__version__}
    try:
        import simplejpeg
        tag["simplejpeg"] = simplejpeg.__version__
    except ImportError:
        tag["simplejpeg"] = "absent"
    return tag


def _finite_scores(entry: Any) -> bool:
    return (isinstance(entry, dict) and all(
                isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool)
                for k in _STAMP)
            and isinstance(entry.get("scores"), dict)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in entry["scores"].values()))


def _stamp(entry: dict) -> tuple[int, int, int]:
    return tuple(entry[k] for k in _STAMP)


def load_cache(path: Path) -> dict[str, dict]:
    """``{resolved path: {size, mtime_ns, ctime_ns, scores}}`` from a cache file; empty if
    there is none.

    A corrupt or foreign file, or one made by other code (``cache_tag``), is ignored with a
    CacheWarning: scoring never fails on its cache, and the file is replaced only by a complete
    new one (atomic write). A malformed entry (a NaN score, a missing stamp) is dropped alone:
    that image is re-scored.
    """
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        warnings.warn(f"{path}: unreadable score cache ignored, images are re-scored "
                      f"({str(e)[:100]})", CacheWarning, stacklevel=2)
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("format") != CACHE_FORMAT
            or data.get("version") != CACHE_VERSION or not isinstance(files, dict)):
        warnings.warn(f"{path}: not a dance score cache (version {CACHE_VERSION}); ignored, "
                      "images are re-scored", CacheWarning, stacklevel=2)
        return {}
    if data.get("code") != cache_tag():
        warnings.warn(f"{path}: scores made by other indicator or decoder versions "
                      f"({data.get('code')}); ignored, images are re-scored", CacheWarning,
                      stacklevel=2)
        return {}
    return {k: e for k, e in files.items() if _finite_scores(e)}


def save_cache(path: Path, files: dict[str, dict]) -> None:
    """Write the cache atomically; a failure (read-only dataset folder, disk full) only warns,
    and leaves the previous cache file as it was."""
    try:
        atomic_write_json(path, {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                                 "code": cache_tag(), "files": files})
    except OSError as e:
        warnings.warn(f"could not write the score cache: {e}", CacheWarning, stacklevel=2)


def _stat(path: Path) -> tuple[str, tuple[int, int, int]]:
    try:
        return file_key(path)
    except FileNotFoundError:
        raise DanceError(f"{path}: file not found") from None
    except OSError as e:
        raise DanceError(f"{path}: cannot read file ({e})") from None


# --- scoring one image (runs in the worker processes) -----------------------------------------

def _score_sample(dataset, index: int, indicators: tuple[str, ...],
                  scale: float) -> tuple[dict[str, float], int, int]:
    """Scores of one sample for ``indicators``, and how many images and masks it decoded."""
    sample = dataset.samples[index]
    need_image = any(n in IMAGE_INDICATORS for n in indicators)
    need_mask = any(n in LABEL_INDICATORS for n in indicators)
    if need_image and need_mask:
        image, mask = dataset.load(index)  # checks that the mask fits its image
    else:
        # luma-only indicators (si, gradient, edges, entropy) never need the RGB array
        reader = read_luma if set(indicators) <= LUMA_INDICATORS else read_image
        image = reader(sample.image) if need_image else None
        mask = dataset.map_mask(read_mask(sample.mask), sample.mask) if need_mask else None
    scores = all_indicators(image, mask, indicators, scale=scale)
    return scores, int(need_image), int(need_mask)


_worker_state: dict[str, Any] = {}


def _init_worker(dataset, scale: float) -> None:
    _worker_state.update(dataset=dataset, scale=scale)


def _score_task(task: tuple[int, tuple[str, ...]]) -> tuple[int, dict[str, float], int, int]:
    index, indicators = task
    fault_point("score-task")
    return (index, *_score_sample(_worker_state["dataset"], index, indicators,
                                  _worker_state["scale"]))


# The pool lives in dance.parallel; dance.bench imports both names from here.
resolve_workers = worker_count


# --- the dataset ------------------------------------------------------------------------------

def score_dataset(dataset, indicators: str | Iterable[str] = ("si",),
                  cache_path: str | os.PathLike | None = None, workers: int | None = None,
                  progress: bool = True, scale: float = 0.5) -> list[ScoreRow]:
    """Score every sample of ``dataset`` (a SegmentationDataset) by each indicator
    (docs/method.md#complexity-indicators).

    Returns one row per (sample, indicator), samples in dataset order and indicators in the
    order given. ``scale`` is label_aliasing's round-trip scale. With ``cache_path`` unchanged
    files are read from the cache and the cache is rewritten (atomically) with the new scores,
    also when scoring stops on a bad file, so a rerun resumes where it stopped.
    """
    names = check_indicators(indicators)
    if not 0.0 < scale <= 1.0:
        raise DanceError(f"label_aliasing scale must be in (0, 1], got {scale}")
    table_tag = _label_table_tag(dataset) if any(n in LABEL_INDICATORS for n in names) else ""
    cache = load_cache(Path(cache_path)) if cache_path is not None else {}

    samples = dataset.samples
    image_names = [n for n in names if n in IMAGE_INDICATORS]
    label_names = [n for n in names if n in LABEL_INDICATORS]
    scores: list[dict[str, float]] = [{} for _ in samples]
    file_keys: list[dict[str, tuple[str, tuple]]] = []  # per sample: indicator -> file key
    tasks: list[tuple[int, tuple[str, ...]]] = []
    for i, sample in enumerate(samples):
        if label_names and sample.mask is None:
            raise DanceError(f"{sample.image}: no label mask, which indicator "
                             f"{label_names[0]} needs")
        image_key = _stat(sample.image) if image_names else None
        mask_key = _stat(sample.mask) if label_names else None
        file_keys.append({n: image_key if n in IMAGE_INDICATORS else mask_key for n in names})
        for name, (path, stamp) in file_keys[i].items():
            entry = cache.get(path)
            score_key = _score_key(name, scale, table_tag)
            if entry is not None and _stamp(entry) == stamp and score_key in entry["scores"]:
                scores[i][name] = float(entry["scores"][score_key])
        missing = tuple(n for n in names if n not in scores[i])
        if missing:
            tasks.append((i, missing))

    try:
        with closing(parallel_map(_score_task, tasks, workers, _init_worker, (dataset, scale),
                                  progress=progress, desc="scoring", what="scoring images")) as results:
            for i, sample_scores, n_images, n_masks in results:
                decode_counts["image"] += n_images
                decode_counts["mask"] += n_masks
                scores[i].update(sample_scores)
                for name, value in sample_scores.items():
                    path, stamp = file_keys[i][name]
                    entry = cache.get(path)
                    if entry is None or _stamp(entry) != stamp:
                        entry = cache[path] = {**dict(zip(_STAMP, stamp)), "scores": {}}
                    entry["scores"][_score_key(name, scale, table_tag)] = value
    finally:  # keep what was scored, also when a bad file or Ctrl-C stops the run
        if cache_path is not None and tasks:
            save_cache(Path(cache_path), cache)

    return [ScoreRow(sample.id, str(sample.image), name, scores[i][name])
            for i, sample in enumerate(samples) for name in names]


# --- CSV --------------------------------------------------------------------------------------

def scores_csv_text(rows: Iterable[ScoreRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows((r.id, r.path, r.indicator, repr(float(r.score))) for r in rows)
    return buf.getvalue()


def write_scores_csv(rows: Iterable[ScoreRow], path: str | os.PathLike) -> None:
    """CSV with header ``id,path,indicator,score``, one row per (image, indicator); atomic."""
    atomic_write_text(path, scores_csv_text(rows))


def read_scores_csv(path: str | os.PathLike,
                    indicator: str | None = None) -> tuple[list[str], np.ndarray]:
    """``(ids, scores)`` of one indicator of a `dance score` CSV (default: its first indicator).

    DanceError naming the file (and line) for a missing file, a wrong header, a bad or
    non-finite score, a repeated id, an indicator the file lacks, or no rows.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DanceError(f"{path}: scores file not found (write it with `dance score --out`)") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise DanceError(f"{path}: cannot read scores file ({e})") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != CSV_HEADER:
        raise DanceError(f"{path}: not a scores CSV: header must be {','.join(CSV_HEADER)}, "
                         f"got {','.join(header) if header else 'an empty file'}")
    ids: list[str] = []
    values: list[float] = []
    seen: set[str] = set()
    found: list[str] = []
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(CSV_HEADER):
            raise DanceError(f"{path}:{line}: expected {len(CSV_HEADER)} fields, got {len(row)}")
        sample_id, _, name, text_score = row
        if name not in found:
            found.append(name)
        if name != (indicator or found[0]):
            continue
        try:
            value = float(text_score)
        except ValueError:
            raise DanceError(f"{path}:{line}: score {text_score!r} is not a number") from None
        if not np.isfinite(value):
            raise DanceError(f"{path}:{line}: score {text_score!r} is not finite")
        if sample_id in seen:
            raise DanceError(f"{path}:{line}: id {sample_id!r} appears twice for {name}")
        seen.add(sample_id)
        ids.append(sample_id)
        values.append(value)
    if not found:
        raise DanceError(f"{path}: no scores (only a header)")
    if not ids:
        raise DanceError(f"{path}: no scores for indicator {indicator!r}; "
                         f"the file has {', '.join(found)}")
    return ids, np.asarray(values, dtype=np.float64)


# --- command line -----------------------------------------------------------------------------

def default_cache_path(out: str | os.PathLike | None, root: str | os.PathLike) -> Path:
    """Beside the CSV (``<out>.cache.json``), or inside the dataset root without ``--out``."""
    if out is not None:
        out = Path(out)
        return out.with_name(out.name + ".cache.json")
    return Path(root) / DEFAULT_CACHE_NAME


def cli_score(args) -> int:
    """`dance score --dataset NAME --root DIR [--split S] [--indicator I[,J]] [--out FILE]`."""
    from dance.data.datasets import open_dataset

    names = check_indicators([n.strip() for n in str(args.indicator).split(",") if n.strip()])
    if args.workers is not None and args.workers < 0:
        raise DanceError(f"--workers must be >= 0, got {args.workers}")
    dataset = open_dataset(args.dataset, args.root, args.split)
    cache_path = Path(args.cache) if args.cache else default_cache_path(args.out, dataset.root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheWarning)
        before = sum(decode_counts.values())
        rows = score_dataset(dataset, names, cache_path=cache_path, workers=args.workers)
        decoded = sum(decode_counts.values()) - before
    for w in caught:  # one line each, like the CLI's errors, instead of a warnings traceback line
        print(f"dance score: warning: {w.message}", file=sys.stderr)
    if args.out is None:
        sys.stdout.write(scores_csv_text(rows))
    else:
        write_scores_csv(rows, args.out)
        print(f"dance score: {len(rows)} scores ({len(dataset.samples)} images x "
              f"{len(names)} indicator(s)) -> {args.out}; {decoded} files decoded, cache "
              f"{cache_path}", file=sys.stderr)
    return 0


__all__ = [
    "CSV_HEADER",
    "CacheWarning",
    "ScoreRow",
    "cli_score",
    "decode_counts",
    "default_cache_path",
    "read_scores_csv",
    "score_dataset",
    "write_scores_csv",
]
