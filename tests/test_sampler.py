"""Bucketed batch sampler."""
from collections import Counter

import numpy as np
import pytest

from dance.data.plan import plan, progressive_plan
from dance.data.sampler import BucketedBatchSampler

SCORES = np.random.default_rng(0).random(103)


def _sampler(p, batch_size=8, epochs=3, seed=0, rank=0, world_size=1):
    return BucketedBatchSampler(p, batch_size, epochs, seed=seed, rank=rank, world_size=world_size)


def test_one_scale_per_batch_every_kept_image_once():
    p = plan(SCORES, 0.5)
    s = _sampler(p)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        assert all(len({scale for _, scale, _ in b}) == 1 for b in batches)
        assert all(1 <= len(b) <= 8 for b in batches)
        assert all(e == epoch for b in batches for _, _, e in b)
        idx = [i for b in batches for i, _, _ in b]
        assert len(idx) == len(set(idx))  # once each
        scale_of = {i: sc for b in batches for i, sc, _ in b}
        assert all(scale_of[i] == p.per_image[i].scale for i in idx)
        # images with keep 1 are always there; at most one short batch per scale
        assert {i for i, q in enumerate(p.per_image) if q.keep_prob == 1} <= set(idx)
        assert sum(len(b) < 8 for b in batches) <= len(p.scales)
        # the epoch's realised cost (kept pixels relative to the plain run) follows the plan
        realised = sum(scale ** 2 for b in batches for _, scale, _ in b) / len(SCORES)
        assert realised == pytest.approx(p.predicted_cost, rel=0.02)


def test_keeps_are_redrawn_each_epoch_with_the_planned_probability():
    p = plan(np.arange(40.0), 0.75)  # the lowest half kept with probability 0.5, scale 1
    s = _sampler(p, epochs=200)
    low = [i for i, q in enumerate(p.per_image) if q.keep_prob == 0.5]
    assert len(low) == 20
    counts = Counter(i for e in range(200) for b in s.epoch_batches(e) for i, _, _ in b)
    seen = np.array([counts[i] for i in low]) / 200
    assert abs(seen.mean() - 0.5) < 0.03 and seen.min() > 0.3  # re-drawn, not a fixed subset
    assert all(counts[i] == 200 for i in range(40) if i not in low)
    # exactly the expected 20 + 20 * 0.5 images every epoch: the realised cost follows the plan
    assert {sum(len(b) for b in s.epoch_batches(e)) for e in range(200)} == {30}


def test_deterministic_for_seed_and_epoch_and_varies_otherwise():
    p = plan(SCORES, 0.4)
    a, b = _sampler(p, seed=3), _sampler(p, seed=3)
    assert a.epoch_batches(1) == b.epoch_batches(1)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert a.epoch_batches(1) != _sampler(p, seed=4).epoch_batches(1)
    # a re-planned plan swapped in between epochs is used, not a cached plan
    a.epoch_batches(2)
    a.plan = plan(SCORES, 0.9)
    assert {sc for bt in a.epoch_batches(2) for _, sc, _ in bt} == {1.0}


def test_two_ddp_ranks_run_in_step():
    p = plan(SCORES, 0.5)
    r0, r1 = (_sampler(p, batch_size=4, rank=r, world_size=2) for r in (0, 1))
    single = _sampler(p, batch_size=4)
    for epoch in range(3):
        r0.set_epoch(epoch)
        r1.set_epoch(epoch)
        b0, b1 = list(r0), list(r1)
        assert len(r0) == len(r1) == len(b0) == len(b1)
        assert r0.epoch_batches(epoch) == r1.epoch_batches(epoch)  # independent of rank
        for x, y, g in zip(b0, b1, r0.epoch_batches(epoch)):
            assert len(x) == len(y) and x + y == g  # each rank its half of the global batch
            assert len({sc for _, sc, _ in x + y}) == 1  # same scale at the same step
        global_idx = [i for g in r0.epoch_batches(epoch) for i, _, _ in g]
        single_idx = [i for g in single.epoch_batches(epoch) for i, _, _ in g]
        # same keep draws as one process; padding repeats images of the same bucket only
        assert set(global_idx) == set(single_idx)
        # at most 2 * world_size - 1 repeats per bucket (BatchNorm needs two images per rank)
        assert len(global_idx) - len(single_idx) <= 3 * len(p.scales)


def test_tiny_bucket_is_padded_for_every_rank():
    p = plan(np.arange(3.0), 1.0)  # three images, one bucket, keep 1
    ranks = [_sampler(p, batch_size=2, rank=r, world_size=4) for r in range(4)]
    got = [list(r) for r in ranks]
    # 3 images padded to 8: two per rank, since BatchNorm cannot train on one
    assert all(len(g) == 1 and len(g[0]) == 2 for g in got)
    assert {i for g in got for i, _, _ in g[0]} == {0, 1, 2}


def test_no_rank_ever_gets_a_single_image_batch():
    p = plan(np.arange(37.0), 0.5)
    for world in (1, 2):
        for rank in range(world):
            s = _sampler(p, batch_size=4, rank=rank, world_size=world)
            for epoch in range(3):
                s.set_epoch(epoch)
                assert all(len(b) >= 2 for b in s)


def test_progressive_control_has_one_growing_scale_per_epoch():
    s = _sampler(progressive_plan([str(i) for i in range(20)], 0.5), epochs=4)
    scales = [{sc for b in s.epoch_batches(e) for _, sc, _ in b} for e in range(4)]
    assert all(len(x) == 1 for x in scales)
    flat = [x.pop() for x in scales]
    assert flat == sorted(flat) and flat[0] == 0.5
    assert all(sum(len(b) for b in s.epoch_batches(e)) == 20 for e in range(4))


def test_multigrid_batches_hold_the_pixels_of_a_full_scale_batch():
    p = progressive_plan([str(i) for i in range(64)], 0.5)
    plain = BucketedBatchSampler(p, 4, epochs=4, seed=0)
    mg = BucketedBatchSampler(p, 4, epochs=4, seed=0, multigrid=True)
    for epoch in range(4):
        scale = p.epoch_policy(epoch, 4).scale[0]
        batches = mg.epoch_batches(epoch)
        assert mg.bucket_batch_size(scale) == max(1, round(4 / scale ** 2))
        # (a one-image tail joins the batch before it: BatchNorm needs two)
        assert max(len(b) for b in batches) - mg.bucket_batch_size(scale) in (0, 1)
        # every image once, in fewer steps than without multigrid
        assert sorted(i for b in batches for i, _, _ in b) == list(range(64))
        assert len(batches) <= len(plain.epoch_batches(epoch))
    assert len(mg.epoch_batches(0)) < len(plain.epoch_batches(0))  # scale 0.5: 16-image batches
