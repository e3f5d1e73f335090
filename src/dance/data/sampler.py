"""Bucketed batch sampler (docs/method.md#data-policy: batching, determinism, DDP).

Each epoch: bucket the images by scale, shuffle within buckets, draw which images are kept (each
with its keep probability, re-drawn every epoch; systematic sampling, so the number kept per
bucket is its expected number rounded), chunk each bucket into global batches of
``batch_size * world_size``, shuffle the batches across buckets. Every draw comes from a generator
seeded by ``(seed, epoch)`` alone, so every rank computes the same global plan and takes its own
slice of each global batch: all ranks run the same scale at the same step, for the same number of
steps. A short last chunk is padded to a multiple of ``world_size`` by repeating images of its
bucket (as ``DistributedSampler`` pads). A tail that would leave a rank one image (BatchNorm needs
two) joins the batch before it; only a bucket with a single image per rank in all is padded. With
one process every kept image appears exactly once otherwise.

With ``multigrid`` (Wu et al., "A Multigrid Method for Efficiently Training Video Models", CVPR
2020) a bucket at scale s is cut into batches of ``round(batch_size / s²)`` images, so every
step holds about the pixels of a full-scale batch; the trainer scales the learning rate by the
batch's size over ``batch_size`` (the linear scaling rule).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dance.data.plan import DataSlimmingPlan
from dance.errors import DanceError

Key = tuple[int, float, int]  # (image index, scale, epoch): what `PlannedDataset` loads


def _systematic_draw(keep_prob: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which items to keep: item i with probability keep_prob[i] (systematic sampling).

    One uniform offset walks the cumulative keep probabilities, so the number kept is the
    expected number rounded up or down: the epoch's realised cost matches the plan
    (docs/method.md#data-policy, within ±3%) even for small datasets, where independent coin
    flips would wander.
    """
    cum = np.cumsum(keep_prob)
    u = rng.random()
    return np.floor(cum + u) > np.floor(np.concatenate(([0.0], cum[:-1])) + u)


class BucketedBatchSampler(torch.utils.data.Sampler):
    """Batches of one scale each, from the plan's policy of the current epoch."""

    def __init__(self, plan: DataSlimmingPlan, batch_size: int, epochs: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, multigrid: bool = False):
        if batch_size < 1:
            raise DanceError(f"batch_size must be >= 1, got {batch_size}")
        if epochs < 1:
            raise DanceError(f"epochs must be >= 1, got {epochs}")
        if seed < 0:
            raise DanceError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.plan = plan  # the trainer may swap in a re-planned one between epochs
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.multigrid = multigrid
        self.epoch = 0
        self._cache: tuple[DataSlimmingPlan, int, list[list[Key]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def bucket_batch_size(self, scale: float) -> int:
        """Images per rank in a batch of ``scale``: ``batch_size``, or with multigrid about
        ``batch_size / scale²`` (the same pixels as a full-scale batch)."""
        if not self.multigrid:
            return self.batch_size
        return max(1, round(self.batch_size / (scale * scale)))

    def epoch_batches(self, epoch: int) -> list[list[Key]]:
        """The global batches of ``epoch`` (all ranks together), in step order."""
        if self._cache is not None and self._cache[0] is self.plan and self._cache[1] == epoch:
            return self._cache[2]
        policy = self.plan.epoch_policy(epoch, self.epochs)
        rng = np.random.default_rng([self.seed, epoch])
        chunks: list[tuple[float, np.ndarray]] = []
        for scale in np.unique(policy.scale):  # sorted, so the draws are order-stable
            per_rank = self.bucket_batch_size(float(scale))
            global_size = per_rank * self.world_size
            members = rng.permutation(np.flatnonzero(policy.scale == scale))
            bucket = members[_systematic_draw(policy.keep_prob[members], rng)]
            pieces = [bucket[s:s + global_size] for s in range(0, len(bucket), global_size)]
            # BatchNorm in train mode cannot take one sample per rank: fold such a tail into
            # the batch before it (one slightly larger batch of the same scale)
            min_size = self.world_size * (2 if per_rank > 1 else 1)
            if len(pieces) > 1 and len(pieces[-1]) < min_size:
                tail = pieces.pop()
                pieces[-1] = np.concatenate([pieces[-1], tail])
            for chunk in pieces:
                short = max(-len(chunk) % self.world_size, min_size - len(chunk))
                if short > 0:  # repeat images of this bucket so every rank gets the same count
                    chunk = np.concatenate([chunk, np.resize(bucket, short)])
                chunks.append((float(scale), chunk))
        batches = [[(int(i), scale, epoch) for i in chunk]
                   for scale, chunk in (chunks[j] for j in rng.permutation(len(chunks)))]
        self._cache = (self.plan, epoch, batches)
        return batches

    def full_factor(self, epoch: int) -> float:
        """The dataset's images over the images ``epoch``'s batches hold: what prices the
        epoch as the plain run would train it (every image kept)."""
        kept = sum(len(b) for b in self.epoch_batches(epoch))
        return len(self.plan.per_image) / max(kept, 1)

    def __iter__(self) -> Iterator[list[Key]]:
        for batch in self.epoch_batches(self.epoch):
            per_rank = len(batch) // self.world_size
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))
