"""Confusion-matrix metrics against torchmetrics and direct computations; DDP-style summing."""
import math
import multiprocessing as mp

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from dance.engine.metrics import ConfusionMatrix

C = 7


def random_batch(seed: int, n: int = 3, present: int = 5):
    """Predictions and targets over classes 0..present-1 (so classes >= present are absent
    from both), plus ~10% ignore pixels and some class-5 predictions never in the targets."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, present, (n, 24, 32), generator=g)
    # A decent model: right on ~60% of pixels, random elsewhere.
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target,
                       torch.randint(0, present, target.shape, generator=g))
    pred[:, :2, :3] = present  # predicted, never true: IoU 0
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    return pred, target


def test_iou_and_miou_match_torchmetrics():
    cm = ConfusionMatrix(C)
    ref_macro = MulticlassJaccardIndex(C, ignore_index=255, average="macro")
    ref_none = MulticlassJaccardIndex(C, ignore_index=255, average="none")
    for seed in range(3):
        pred, target = random_batch(seed)
        cm.update(pred, target)
        ref_macro.update(pred, target)
        ref_none.update(pred, target)
    iou = cm.iou()
    # Class 6 is absent from targets and predictions: NaN here, 0 in torchmetrics' per-class
    # output (its zero_division), and left out of both means ("macro" skips such classes).
    assert math.isnan(iou[6]) and ref_none.compute()[6] == 0
    assert iou[5] == 0  # predicted but never true
    assert torch.allclose(iou[:6].float(), ref_none.compute()[:6], atol=1e-6)
    assert cm.miou() == pytest.approx(100 * ref_macro.compute().item(), abs=1e-4)  # 1e-6 of 1
    assert cm.miou() == pytest.approx(100 * iou[:6].mean().item(), abs=1e-9)


def test_pixel_accuracy_and_ignore_pixels():
    pred, target = random_batch(0)
    cm = ConfusionMatrix(C)
    cm.update(pred, target)
    valid = target != 255
    assert cm.matrix.sum() == valid.sum()  # ignore pixels count nowhere
    expected = 100.0 * (pred[valid] == target[valid]).double().mean().item()
    assert cm.pixel_acc() == pytest.approx(expected, abs=1e-9)
    # Rows are targets, columns predictions.
    t, p = int(target[valid][0]), int(pred[valid][0])
    assert cm.matrix[t, p] == ((target == t) & (pred == p)).sum()


def test_matrices_of_parts_sum_to_the_matrix_of_the_whole():
    (p1, t1), (p2, t2) = random_batch(1), random_batch(2, n=2)
    whole, a, b = ConfusionMatrix(C), ConfusionMatrix(C), ConfusionMatrix(C)
    whole.update(torch.cat([p1, p2]), torch.cat([t1, t2]))
    a.update(p1, t1)
    b.update(p2, t2)
    assert torch.equal(a.matrix + b.matrix, whole.matrix)
    a.all_reduce()  # not distributed: a no-op
    a.matrix += b.matrix
    assert a.miou() == whole.miou() and a.pixel_acc() == whole.pixel_acc()


def _rank(rank: int, init_file: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2)
    cm = ConfusionMatrix(C)
    cm.update(*random_batch(rank + 1, n=2 + rank))
    cm.all_reduce()
    # plain numbers: a tensor would travel by a file descriptor that its sender, exiting right
    # after, may take with it before the parent has read it (ConnectionResetError)
    queue.put((rank, cm.matrix.tolist()))
    torch.distributed.destroy_process_group()


def test_all_reduce_sums_the_ranks_matrices(tmp_path):
    """Two gloo processes (what DDP on CPU uses) end with the sum of both matrices."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = {r: torch.tensor(m, dtype=torch.int64) for r, m in
               (queue.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = ConfusionMatrix(C)
    expected.update(*random_batch(1, n=2))
    expected.update(*random_batch(2, n=3))
    assert torch.equal(results[0], expected.matrix) and torch.equal(results[1], expected.matrix)


def test_summary_is_json_ready_in_points():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 1, 255]]))
    s = cm.summary(["road", "car", "sky"])
    assert s["per_class_iou"] == {"road": 100.0, "car": 100.0, "sky": None}
    assert s["miou"] == 100.0 and s["pixel_acc"] == 100.0
    assert cm.summary()["per_class_iou"] == [100.0, 100.0, None]
    empty = ConfusionMatrix(3).summary()
    assert empty["miou"] is None and empty["pixel_acc"] is None


def test_out_of_range_ids_are_an_error():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
