"""Evaluation, inference cost and complexity-guided inference resolution."""
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dance.data.complexity import spatial_complexity
from dance.engine.evaluate import (
    AdaptiveResolution,
    evaluate,
    measure_inference,
    miou_flops_curve,
)
from dance.errors import DanceError

H, W = 32, 48
BLOCKS = (24, 16, 8, 6, 5, 3)  # checkerboard block sizes: from a few large regions to many small
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)


class BlockScenes:
    """A tiny stand-in for SegmentationDataset: class c is painted in pure colour c (red, green,
    blue), so a model can read the ground truth off the pixels; the top row is ignore (255)."""

    class_names = ("red", "green", "blue")
    num_classes = 3

    def __init__(self, blocks=BLOCKS, noise=0.0):
        self.blocks = blocks
        self.noise = noise
        self.samples = [SimpleNamespace(id=f"blocks{b}") for b in blocks]

    def __len__(self):
        return len(self.blocks)

    def load(self, i):
        b = self.blocks[i]
        yy, xx = np.mgrid[:H, :W]
        mask = (((yy // b) + 2 * (xx // b)) % 3).astype(np.uint8)
        image = COLOURS[mask]
        if self.noise:
            rng = np.random.default_rng(i)
            image = np.clip(image + rng.normal(0, self.noise, image.shape), 0, 255).astype(np.uint8)
        mask[0] = 255
        return image, mask


def colour_oracle() -> nn.Module:
    """A 1x1 convolution whose logit for class c is colour channel c: on BlockScenes it predicts
    the ground truth exactly, at any input size (fully convolutional, per pixel)."""
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1) * 10)
        conv.bias.zero_()
    return conv


class Constant(nn.Module):
    """Predicts class ``cls`` everywhere."""

    def __init__(self, cls, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.copy_(torch.eye(num_classes)[cls])

    def forward(self, x):
        return self.conv(x)


def oracle_gflops(h, w):
    # FlopCounterMode: 2 FLOPs per multiply-add, 3 in x 3 out channels per pixel, bias free.
    return 2 * 3 * 3 * h * w / 1e9


def test_perfect_model_scores_100():
    res = evaluate(colour_oracle(), BlockScenes(), progress=False)
    assert res["miou"] == pytest.approx(100.0)
    assert res["pixel_acc"] == pytest.approx(100.0)
    assert res["num_images"] == len(BLOCKS)
    assert "mean_gflops" not in res  # only a resolution policy asks for FLOPs


def test_constant_model_has_known_miou():
    ds = BlockScenes()
    masks = np.stack([ds.load(i)[1] for i in range(len(ds))])
    valid = masks != 255
    n_red = np.count_nonzero(masks == 0)
    # Predicting "red" everywhere: red IoU = red pixels / valid pixels, green and blue IoU 0.
    expected_red_iou = n_red / valid.sum()
    res = evaluate(Constant(0), ds, progress=False)
    assert res["miou"] == pytest.approx(100 * expected_red_iou / 3)
    assert res["pixel_acc"] == pytest.approx(100 * n_red / valid.sum())


def test_eval_restores_the_model_mode():
    model = colour_oracle().train()
    evaluate(model, BlockScenes(blocks=(8,)), progress=False)
    assert model.training


@pytest.mark.parametrize("crop,stride", [((16, 20), (10, 12)), ((16, 20), None), (64, None)])
def test_slide_equals_whole_for_a_per_pixel_model(crop, stride):
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 1)  # random per-pixel classifier: a window sees what the image sees
    ds = BlockScenes(noise=60.0)
    whole = evaluate(model, ds, progress=False)
    slide = evaluate(model, ds, mode="slide", crop=crop, stride=stride, progress=False)
    assert 5.0 < whole["miou"] < 95.0  # a non-trivial prediction
    assert slide["miou"] == pytest.approx(whole["miou"], abs=1e-9)
    assert slide["pixel_acc"] == pytest.approx(whole["pixel_acc"], abs=1e-9)


def test_slide_needs_a_crop():
    with pytest.raises(DanceError, match="crop"):
        evaluate(colour_oracle(), BlockScenes(), mode="slide", progress=False)


def test_measure_inference_on_cpu():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    small = measure_inference(model, (32, 32), repeats=3, warmup=1)
    large = measure_inference(model, (64, 64), repeats=3, warmup=1)
    assert small["params"] == (8 * 3 * 9 + 8) + (3 * 8 + 3)
    assert small["gflops"] == pytest.approx(2 * (8 * 3 * 9 + 3 * 8) * 32 * 32 / 1e9)
    assert large["gflops"] == pytest.approx(4 * small["gflops"])
    assert small["latency_ms"] > 0
    assert small["input_size"] == [32, 32]
    # At least the 8-channel float32 activation map is held at once.
    assert small["peak_memory_mb"] >= 8 * 32 * 32 * 4 / 2**20
    assert large["peak_memory_mb"] > 3 * small["peak_memory_mb"]
    json.dumps(small)


def noisy_image(amplitude, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(128 + rng.normal(0, amplitude, (H, W, 3)), 0, 255).astype(np.uint8)


def test_adaptive_resolution_gives_flatter_images_lower_scales():
    train_scores = np.array([spatial_complexity(noisy_image(a, seed=a)) for a in range(0, 90, 5)])
    policy = AdaptiveResolution(train_scores)
    assert policy(noisy_image(0)) == 0.5
    assert policy(noisy_image(30)) == 0.75
    assert policy(noisy_image(80)) == 1.0
    # Thresholds are the training scores' terciles (the documented default).
    assert policy.thresholds == pytest.approx(np.quantile(train_scores, [1 / 3, 2 / 3]))
    again = AdaptiveResolution.from_json(json.loads(json.dumps(policy.to_json())))
    assert [again(noisy_image(a)) for a in (0, 30, 80)] == [0.5, 0.75, 1.0]


def test_adaptive_resolution_custom_scales_and_quantiles():
    policy = AdaptiveResolution(np.arange(1, 101), scales=(0.25, 1.0), quantiles=(0.9,))
    assert policy.scale_for_score(50) == 0.25
    assert policy.scale_for_score(95) == 1.0


@pytest.mark.parametrize("kwargs,match", [
    ({"indicator": "label_boundary"}, "needs labels"),
    ({"quantiles": (0.5,)}, "3 scales need 2 quantiles"),
    ({"quantiles": (0.7, 0.3)}, "increase strictly"),
    ({"scales": (1.0, 0.5)}, "ascending"),
])
def test_adaptive_resolution_rejects_bad_settings(kwargs, match):
    with pytest.raises(DanceError, match=match):
        AdaptiveResolution(np.arange(10.0), **kwargs)


def test_miou_flops_curve_adaptive_beats_fixed_half_scale_for_less():
    ds = BlockScenes()
    # "gradient" (mean Sobel magnitude) grows with the number of block edges.
    train_scores = np.array([spatial_complexity(ds.load(i)[0], "gradient")
                             for i in range(len(ds))])
    curve = miou_flops_curve(colour_oracle(), ds, train_scores, indicator="gradient",
                             progress=False)
    points = {p["name"]: p for p in curve}
    assert list(points) == ["scale 0.5", "scale 0.75", "scale 1", "adaptive"]
    # FLOPs per image at the scaled size: 16x24, 24x36, 32x48.
    assert points["scale 0.5"]["mean_gflops"] == pytest.approx(oracle_gflops(16, 24))
    assert points["scale 1"]["mean_gflops"] == pytest.approx(oracle_gflops(H, W))
    assert points["scale 1"]["miou"] == pytest.approx(100.0)
    # The two flattest scenes at 0.5, the middle two at 0.75, the busiest two at full size.
    assert points["adaptive"]["scales"] == {"0.5": 2, "0.75": 2, "1": 2}
    assert points["adaptive"]["mean_gflops"] == pytest.approx(
        (oracle_gflops(16, 24) + oracle_gflops(24, 36) + oracle_gflops(H, W)) / 3)
    assert points["adaptive"]["mean_gflops"] < points["scale 1"]["mean_gflops"]
    # Half resolution blurs the smallest blocks away; adaptive runs those at full size and is
    # perfect for 60% of the full-resolution FLOPs.
    assert points["scale 0.5"]["miou"] < 95.0
    assert points["adaptive"]["miou"] == pytest.approx(100.0)


def _ddp_worker(rank, world_size, store, out):
    torch.set_num_threads(1)  # a forked child cannot use the parent's OpenMP pool
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world_size)
    try:
        res = evaluate(Constant(1), BlockScenes(), rank=rank, world_size=world_size,
                       progress=False, resolution=lambda image: 0.5 if rank else 1.0)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(res, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_ddp_ranks_split_images_and_agree(tmp_path):
    # Two gloo ranks, forked: the children inherit the imported torch instead of paying seconds
    # for a fresh interpreter each. A hang fails the test instead of stalling the suite.
    ranks = torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, tmp_path / "store", tmp_path / "res"), nprocs=2, join=False,
        start_method="fork")
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail("DDP evaluation did not finish in 120 s")
    single = evaluate(Constant(1), BlockScenes(), progress=False)
    r0, r1 = (json.loads((tmp_path / f"res.{r}").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["num_images"] == len(BLOCKS)
    assert r0["miou"] == pytest.approx(single["miou"])
    # Rank 0 ran images 0, 2, 4 at full size and rank 1 images 1, 3, 5 at half size.
    assert r0["scales"] == {"0.5": 3, "1": 3}
