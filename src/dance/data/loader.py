"""Loading at the planned scale (docs/method.md#data-policy; bad samples: docs/datasets.md#check-data).

The sampler hands out keys ``(index, scale, epoch)``; `PlannedDataset` loads that image and mask
and transforms them at that scale. Random augmentation draws from a generator seeded by
``(seed, epoch, index)``, so a sample is the same whichever worker loads it and after a resume.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from dance.data.transforms import TrainTransform
from dance.errors import DanceError

ON_BAD_SAMPLE = ("error", "skip")


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch generator fixed by ``(seed, epoch, index)`` (negative values allowed)."""
    entropy = [v % 2 ** 64 for v in (seed, epoch, index)]
    lo, hi = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(hi) & 0x7FFFFFFF) << 32 | int(lo))


class PlannedDataset(torch.utils.data.Dataset):
    """A `SegmentationDataset` read by key ``(index, scale, epoch)``.

    Item: ``{"image": float 3xhxw, "mask": int64 hxw, "index": int, "scale": float}``. A bad
    sample with ``on_bad_sample="skip"`` gives ``{"skipped": sample id, "index", "scale"}``
    instead (warned once per process on stderr), which `collate_planned` drops and reports, so
    the id reaches the trainer even from a worker process.

    ``reduced_decode``: a JPEG image is decoded at the smallest DCT scale (eighths) that
    covers the sample's `Draw.decode_size` (the plan's scale, or the augmentation's
    zoom-out below it); the mask is always decoded whole and nearest-resized, so labels are
    exactly those of the full-resolution path (docs/method.md#data-policy). ``decode_cache``: a
    `DecodeCache` that other images (PNG) and every mask are decoded into once and then read
    from, an image at the smallest stored level that covers the sample.
    """

    def __init__(self, dataset, transform: TrainTransform, seed: int = 0,
                 on_bad_sample: str = "error", reduced_decode: bool = True,
                 decode_cache=None):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise DanceError(f"on_bad_sample must be one of {', '.join(ON_BAD_SAMPLE)}, "
                             f"got {on_bad_sample!r}")
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.on_bad_sample = on_bad_sample
        self.reduced_decode = reduced_decode
        self.decode_cache = decode_cache  # a `DecodeCache`, or None: every file decoded each time
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, float, int]) -> dict:
        index, scale, epoch = key
        index, scale = int(index), float(scale)
        generator = sample_generator(self.seed, int(epoch), index)
        drawn = []

        def size_for(stored_hw: tuple[int, int]) -> tuple[int, int]:
            # the sample's random resize is drawn from the header's size, before decoding, so
            # a JPEG is decoded at the smallest DCT scale that covers the plan's scale
            drawn.append(self.transform.draw(stored_hw, scale, generator))
            return drawn[0].decode_size if self.reduced_decode else stored_hw

        try:
            image, raw = self.dataset.load(index, size_for=size_for, map_labels=False,
                                           cache=self.decode_cache)
            # raw values mapped to train ids on the crop's pixels only
            x, y = self.transform.apply(image, raw, drawn[0],
                                        map_mask=partial(np.take, self.dataset.lut))
        except DanceError as e:
            if self.on_bad_sample == "error":
                if torch.utils.data.get_worker_info() is None:
                    raise
                # In a DataLoader worker: hand the one-line reason to the trainer as data, which
                # raises it (`raise_batch_errors`); raised here it would reach the user wrapped
                # in torch's worker traceback.
                return {"error": str(e), "index": index, "scale": scale}
            sample_id = self.dataset.samples[index].id
            if sample_id not in self._warned:
                self._warned.add(sample_id)
                print(f"warning: skipping bad sample {sample_id}: {e}", file=sys.stderr)
            return {"skipped": sample_id, "index": index, "scale": scale}
        return {"image": x, "mask": y, "index": index, "scale": scale}


def raise_batch_errors(batch: dict) -> None:
    """Raise the first bad-sample error a DataLoader worker put into ``batch``, as one line."""
    if batch.get("errors"):
        raise DanceError(batch["errors"][0])


def collate_planned(batch: Sequence[dict | None]) -> dict:
    """Stack a batch of one scale; skipped samples are dropped and listed under ``"skipped"``.
    A bad sample loaded in a worker with ``on_bad_sample="error"`` makes the batch carry
    ``"errors"`` instead (see `raise_batch_errors`).

    When every sample was skipped, ``image`` has zero rows (``batch["image"].shape[0] == 0``).
    """
    errors = [b["error"] for b in batch if b is not None and "error" in b]
    if errors:
        return {"image": torch.empty((0, 3, 0, 0)), "errors": errors, "skipped": []}
    skipped = [b["skipped"] for b in batch if b is not None and "skipped" in b]
    items = [b for b in batch if b is not None and "skipped" not in b]
    scales = {b["scale"] for b in items}
    if len(scales) > 1:
        raise ValueError(f"a batch mixes scales {sorted(scales)}; batches must hold one scale")
    if not items:
        return {"image": torch.empty((0, 3, 0, 0)),
                "mask": torch.empty((0, 0, 0), dtype=torch.int64),
                "index": torch.empty(0, dtype=torch.int64), "scale": None, "skipped": skipped}
    return {
        "image": torch.stack([b["image"] for b in items]),
        "mask": torch.stack([b["mask"] for b in items]),
        "index": torch.tensor([b["index"] for b in items], dtype=torch.int64),
        "scale": items[0]["scale"],
        "skipped": skipped,
    }
