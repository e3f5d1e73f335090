"""The library surface for a training loop of one's own (dance.loop, examples/own_loop.py)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import dance
from dance.data.plan import plan_for_policy, uniform_plan
from dance.engine.config import DataSlimmingConfig
from dance.errors import DanceError
from tiny import tiny_synth

EXAMPLE = Path(__file__).parent.parent / "examples" / "own_loop.py"


class Pairs(torch.utils.data.Dataset):
    """A user's dataset: (uint8 3xHxW image, HxW mask) pairs of one size."""

    def __init__(self, n=12, hw=(64, 64), classes=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, *hw), generator=g, dtype=torch.uint8)
        self.masks = torch.randint(0, classes, (n, *hw), generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.masks[i]


class ConvNet(nn.Module):
    """No multi-scale module: only channel slimming applies."""

    def __init__(self, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Conv2d(32, classes, 1)

    def forward(self, x):
        return self.head(self.body(x))


def test_plan_has_train_defaults():
    scores = np.random.default_rng(0).random(20)
    ids = [str(i) for i in range(20)]
    mine = dance.plan(scores, 0.5, ids)
    assert mine.to_json() == plan_for_policy(DataSlimmingConfig(), 0.5, ids, scores).to_json()
    assert mine.schedule == "progressive"
    assert dance.plan(scores, 0.5, ids, schedule="static").schedule == "static"


def test_scaled_dataset_resizes_image_and_mask():
    ds = dance.ScaledDataset(Pairs())
    full = ds[(3, 1.0, 0)]
    half = ds[(3, 0.5, 0)]
    assert full["image"].shape == (3, 64, 64) and full["image"].dtype == torch.float32
    assert torch.equal(full["image"], Pairs()[3][0].float() / 255)
    assert half["image"].shape == (3, 32, 32) and half["mask"].shape == (32, 32)
    assert half["full_hw"] == (64, 64) and half["scale"] == 0.5 and half["index"] == 3
    assert set(half["mask"].unique().tolist()) <= set(full["mask"].unique().tolist())
    # numpy H x W x 3 uint8 and a PIL-like mask array are accepted too
    arr = dance.ScaledDataset([(np.zeros((16, 24, 3), np.uint8), np.ones((16, 24), np.uint8))])
    assert arr[(0, 0.5, 0)]["image"].shape == (3, 8, 16)


@pytest.mark.parametrize("item, message", [
    ((torch.zeros(3, 8, 8),), "is not an (image, mask) pair"),
    ((torch.zeros(8, 8), torch.zeros(8, 8)), "image must be C x H x W"),
    ((torch.zeros(3, 8, 8), torch.zeros(8, 9)), "mask shape (8, 9) differs from the image's (8, 8)"),
])
def test_scaled_dataset_names_bad_items(item, message):
    with pytest.raises(DanceError, match="item 0") as e:
        dance.ScaledDataset([item])[(0, 1.0, 0)]
    assert message in str(e.value)


def test_loader_batches_follow_the_plan():
    data = Pairs(n=16)
    scores = np.arange(16.0)
    p = dance.plan(scores, 0.5, drop=True, scales_per_epoch=0, schedule="static")
    loader = dance.PlannedLoader(data, p, batch_size=4, epochs=2)
    policy = p.epoch_policy(0, 2)
    seen = []
    for batch in loader:
        scale = batch["scale"]
        assert np.allclose(policy.scale[batch["index"].numpy()], scale)
        assert torch.equal(batch["weight"], torch.as_tensor(policy.weight[batch["index"]],
                                                             dtype=torch.float32))
        h = batch["image"].shape[-1]
        assert h == max(8, round(64 * scale / 8) * 8) and batch["full_hw"] == (64, 64)
        seen += batch["index"].tolist()
    dropped = policy.keep_prob < 1
    assert len(set(seen)) < 16 and dropped.any()  # the plan's drops are left out
    assert set(seen) >= set(np.flatnonzero(~dropped).tolist())


def test_loader_cost_account_matches_the_plan():
    """Uniform at budget 0.25: every image at half size, so a conv net's FLOPs are a quarter."""
    data = Pairs(n=8)
    p = uniform_plan([str(i) for i in range(8)], 0.25)
    loader = dance.PlannedLoader(data, p, batch_size=4, epochs=1)
    model = ConvNet()
    for batch in loader:
        model(batch["image"])
        loader.charge(model, batch)
    assert loader.realised_cost == pytest.approx(0.25, rel=0.02)
    assert loader.ledger.epochs_trained == pytest.approx(1.0)
    assert loader.ledger.off_plan(p.predicted_cost) is None


def test_loader_adaptive_replans_from_hardness():
    data = Pairs(n=16)
    p = dance.plan(np.arange(16.0), 0.5, schedule="static", scales_per_epoch=0)
    loader = dance.PlannedLoader(data, p, batch_size=4, epochs=2, adaptive=True)
    for batch in loader:  # hardness reversed against complexity
        loader.observe(batch, 100.0 - batch["index"].float())
    loader.set_epoch(1)
    assert loader.plan is not p
    assert loader.plan.to_json()["per_image"] != p.to_json()["per_image"]
    with pytest.raises(DanceError, match="adaptive=True"):
        dance.PlannedLoader(data, p, 4, 2).observe(batch, torch.zeros(4))


def test_loader_refuses_mismatches():
    p = dance.plan(np.arange(10.0), 0.5)
    with pytest.raises(DanceError, match="the plan covers 10 images, the dataset has 16"):
        dance.PlannedLoader(Pairs(n=16), p, 4, 2)
    with pytest.raises(DanceError, match="PlannedLoader sets shuffle itself"):
        dance.PlannedLoader(Pairs(n=10), p, 4, 2, shuffle=True)
    with pytest.raises(DanceError, match="must be a DataSlimmingPlan"):
        dance.PlannedLoader(Pairs(n=10), {"budget": 0.5}, 4, 2)
    with pytest.raises(DanceError, match="sizes"):
        mixed = [(torch.zeros(3, 16, 16), torch.zeros(16, 16)),
                 (torch.zeros(3, 24, 24), torch.zeros(24, 24))]
        next(iter(dance.PlannedLoader(mixed, uniform_plan(["a", "b"], 1.0), 2, 1)))


@pytest.mark.parametrize("build", [
    torchvision.models.segmentation.lraspp_mobilenet_v3_large,
    torchvision.models.segmentation.deeplabv3_mobilenet_v3_large,
])
def test_slimmable_gates_torchvision_heads_without_changing_outputs(build):
    torch.manual_seed(0)
    model = build(weights=None, weights_backbone=None, num_classes=5).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        before = model(x)["out"]
    with pytest.raises(DanceError, match="no multi-scale module"):
        dance.branches(model, (1, 3, 64, 96))
    dance.slimmable(model, 5)
    with torch.no_grad():
        assert torch.allclose(model(x)["out"], before, atol=1e-5)
    names = [b.name for b in dance.branches(model, (1, 3, 64, 96))]
    assert len(names) >= 2
    dance.remove_branches(model, names[-1:])
    assert model(x)["out"].shape == (1, 5, 64, 96)
    assert model.dance_arch.removed == names[-1:]
    dance.slimmable(model, 5)  # idempotent
    with pytest.raises(DanceError, match="made for 5 classes, not 4"):
        dance.slimmable(model, 4)


def test_model_without_multiscale_module_gets_clear_messages():
    model = ConvNet()
    with pytest.raises(DanceError, match="no multi-scale module"):
        dance.branches(model)
    with pytest.raises(DanceError, match="unknown branch 'foo'; the model has no multi-scale"):
        dance.remove_branches(model, ["foo"])
    with pytest.raises(DanceError, match="channel slimming needs to know which layers"):
        dance.NetworkSlimmer(model, network_budget=0.5, channels=True, input_shape=(1, 3, 32, 32))
    dance.slimmable(model, 3)
    with pytest.raises(DanceError, match="give channels=True with a network_budget"):
        dance.NetworkSlimmer(model, input_shape=(1, 3, 32, 32))
    with pytest.raises(DanceError, match="give network_budget"):
        dance.NetworkSlimmer(model, channels=True, input_shape=(1, 3, 32, 32))


def test_channel_slimming_of_a_model_of_ones_own():
    torch.manual_seed(0)
    model = dance.slimmable(ConvNet(), 3)
    shape = (1, 3, 32, 32)
    slimmer = dance.NetworkSlimmer(model, network_budget=0.5, channels=True, input_shape=shape,
                                   prune_at=(0.5,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 3, (4, 32, 32))
    loss = dance.weighted_cross_entropy(model(x), y)[0] + slimmer.sparsity_loss(model)
    loss.backward()
    opt.step()
    event = slimmer.prune(model, [(x, y)], lambda out, t: dance.weighted_cross_entropy(out, t)[0],
                          0.5)
    dance.rebuild_optimizer(opt, model)
    assert event.gflops_after <= 0.5 * slimmer.original_gflops * 1.001
    assert model.head.out_channels == 3  # the logits are never slimmed
    # the record rebuilds the slimmed shapes on a fresh copy, which loads the weights
    fresh = dance.replay(dance.slimmable(ConvNet(), 3), model.dance_arch.removed)
    fresh.load_state_dict(model.state_dict())
    opt.zero_grad()
    dance.weighted_cross_entropy(model(x), y)[0].backward()
    opt.step()  # the rebuilt optimizer steps the slimmed parameters


def test_example_loop_runs(tmp_path_factory):
    root = tiny_synth(tmp_path_factory, train=12, val=3, seed=3)
    r = subprocess.run([sys.executable, str(EXAMPLE), "--data", str(root), "--epochs", "2",
                        "--batch-size", "4", "--crop", "64x64"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "val mIoU" in r.stdout and "70.0% of the original" in r.stdout
    assert "epoch 2/2" in r.stdout and r.stdout.count("prune @") == 3


def test_example_loop_names_a_missing_dataset(tmp_path):
    r = subprocess.run([sys.executable, str(EXAMPLE), "--data", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr


def test_export_of_a_model_of_ones_own_claims_no_input_convention(tmp_path):
    import onnx
    model = dance.slimmable(ConvNet(), 3)
    path = dance.export(model, tmp_path / "mine.onnx", input_shape=(1, 3, 32, 32))
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["dance.model"] == "custom:ConvNet" and "dance.input" not in meta
    with pytest.raises(DanceError, match="ConvNet is a model of your own"):
        model.dance_arch.build()


SMP_MODELS = {  # segmentation_models.pytorch, as a user builds them (no download)
    "Unet": lambda smp: smp.Unet("resnet18", encoder_weights=None, classes=5),
    "DeepLabV3Plus": lambda smp: smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=5),
    "FPN": lambda smp: smp.FPN("mobilenet_v2", encoder_weights=None, classes=5),
}


def _calibrated(model):
    """BatchNorm affine terms away from their init, statistics from random images, eval mode:
    a masked channel still wired to the output would show."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.momentum = None
        model.train()(torch.rand(4, 3, 64, 96))
    return model.eval()


@pytest.mark.parametrize("name", sorted(SMP_MODELS))
def test_segmentation_models_pytorch_models_slim(name):
    import copy

    import segmentation_models_pytorch as smp  # the [test] extra

    from dance.network.channels import channel_groups, mask_channels, remove_channels
    torch.manual_seed(0)
    model = _calibrated(SMP_MODELS[name](smp))
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
    dance.slimmable(model, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)  # gating changed nothing
    if name == "DeepLabV3Plus":  # smp's ASPP is gated like torchvision's
        assert [b.name.rpartition(".")[2] for b in dance.branches(model, (1, 3, 64, 96))] == [
            "conv1x1", "rate12", "rate24", "rate36", "pool"]
    else:
        with pytest.raises(DanceError, match="no multi-scale module"):
            dance.branches(model, (1, 3, 64, 96))
    # removing a chunk of every channel group equals masking it (float64: the surgery, not
    # the rounding, is compared)
    model = model.double()
    xd = x.double()
    cuts = [(g.layer, list(range(1, g.chunk() + 1))) for g in channel_groups(model, (1, 3, 64, 96))
            if g.chunk()]
    assert len(cuts) >= 10
    masked, removed = copy.deepcopy(model), copy.deepcopy(model)
    for layer, idx in cuts:
        mask_channels(masked, layer, idx)
        remove_channels(removed, layer, idx)
    with torch.no_grad():
        torch.testing.assert_close(removed(xd), masked(xd), atol=1e-5, rtol=0)
    # the slimmer meets a network budget from the weights alone
    model = model.float()
    slimmer = dance.NetworkSlimmer(model, network_budget=0.7, channels=True,
                                   input_shape=(1, 3, 64, 96), prune_at=(0.5,),
                                   importance="gate", channel_importance="bn_scale")
    event = slimmer.prune(model, [], None, 0.5)
    if name == "FPN":  # most of its FLOPs sit in GroupNorm blocks, which stay whole
        assert "NOT met" in event.message and "GroupNorm" in event.message
        assert event.gflops_after < 0.9 * slimmer.original_gflops
    else:
        assert event.gflops_after <= 0.7 * slimmer.original_gflops * 1.01, event.message
    assert model(x).shape == (1, 5, 64, 96)
