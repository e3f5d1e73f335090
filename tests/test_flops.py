"""The FLOPs counter: FlopCounterMode on a meta copy, multiply-add = 2 FLOPs, cached per
architecture state."""
import pytest
import torch
from torch import nn

import dance
from dance.network import flops
from dance.network.flops import count_gflops
from dance.network.gates import branches, remove_branches

MBV2 = {"aspp_channels": 16, "decoder_channels": 16, "width_mult": 0.5}
PSP18 = {"ppm_channels": 16, "bin_channels": 8}


def test_a_convolution_costs_two_flops_per_multiply_add():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    macs = 3 * 8 * 9 * 10 * 10
    assert count_gflops(conv, (1, 3, 10, 10)) == pytest.approx(2 * macs / 1e9, rel=1e-12)
    # Backward: the weight gradient costs as much again; the input (no grad) gets none.
    assert count_gflops(conv, (1, 3, 10, 10), backward=True) == pytest.approx(4 * macs / 1e9)
    # Grouped (here depthwise) convolutions too; torch's own formula over-counts their backward.
    depthwise = nn.Sequential(nn.Conv2d(3, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=64))
    forward = (3 * 64 + 64 * 9) * 2 * 100
    assert count_gflops(depthwise, (1, 3, 10, 10)) == pytest.approx(forward / 1e9)
    # Backward: both weight gradients, plus the depthwise conv's input gradient.
    backward = forward + 64 * 9 * 2 * 100
    assert count_gflops(depthwise, (1, 3, 10, 10), backward=True) == pytest.approx(
        (forward + backward) / 1e9)


@pytest.mark.parametrize("name,kwargs", [("deeplabv3plus_mbv2", MBV2), ("pspnet_r18", PSP18)])
def test_flops_grow_with_pixels_and_backward_costs_two_to_three_forwards(name, kwargs):
    model = dance.build_model(name, 19, **kwargs)
    small = count_gflops(model, (1, 3, 256, 512))
    large = count_gflops(model, (1, 3, 512, 1024))
    assert large / small == pytest.approx(4.0, rel=0.02)
    assert count_gflops(model, (2, 3, 256, 512)) == pytest.approx(2 * small, rel=1e-9)
    train = count_gflops(model, (1, 3, 256, 512), backward=True)
    assert 2.0 <= train / small <= 3.0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # fvcore traces with torch.jit
@pytest.mark.parametrize("name,kwargs", [("pspnet_r18", PSP18),
                                         ("lraspp_mobilenet_v3_large", {})])
def test_agrees_with_fvcore(name, kwargs):
    from fvcore.nn import FlopCountAnalysis
    model = dance.build_model(name, 3, **kwargs).eval()
    x = torch.rand(1, 3, 64, 128)
    analysis = FlopCountAnalysis(model, x)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    by_op = analysis.by_operator()
    ours = count_gflops(model, tuple(x.shape))
    # fvcore counts one "flop" per multiply-add; it also charges BatchNorm, pooling and
    # upsampling about one per element, which FlopCounterMode leaves out.
    assert ours == pytest.approx(2 * (by_op["conv"] + by_op.get("matmul", 0)) / 1e9, rel=1e-9)
    assert ours == pytest.approx(2 * analysis.total() / 1e9, rel=0.05)


def test_counts_are_cached_per_architecture_and_leave_the_model_alone(monkeypatch):
    model = dance.build_model("deeplabv3plus_mbv2", 19, **MBV2)  # train mode, CPU
    weight = model.classifier.weight.detach().clone()
    before = count_gflops(model, (1, 3, 128, 256))
    assert model.training and model.classifier.weight.device.type == "cpu"
    torch.testing.assert_close(model.classifier.weight.detach(), weight, rtol=0, atol=0)

    calls = []
    real = flops.count_flops
    monkeypatch.setattr(flops, "count_flops", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert count_gflops(model, (1, 3, 128, 256)) == before and calls == []
    remove_branches(model, ["aspp.rate18"])
    after = count_gflops(model, (1, 3, 128, 256))
    assert len(calls) == 1 and after < before


@pytest.mark.parametrize("name", dance.list_models())
def test_the_hook_count_equals_flop_counter_mode_on_every_model(name):
    model = dance.build_model(name, 5)
    if name == "deeplabv3plus_mbv2":  # and on a channel-slimmed one
        from dance.network.channels import channel_groups, remove_channels
        group = channel_groups(model, (1, 3, 64, 96))[3]
        remove_channels(model, group.layer, list(range(8)))
    for shape, backward in (((1, 3, 64, 96), False), ((2, 3, 72, 104), True)):
        assert flops._count_by_hooks(model, shape, backward) == \
            flops.count_flops_torch(model, shape, backward), (shape, backward)


@pytest.mark.parametrize("name", dance.list_models())
def test_counts_from_layer_sites_equal_a_forward_through_removals_and_copies(name, monkeypatch):
    """Sites measured once per architecture as built serve the model after branch and channel
    removals, and a copy measured first serves the fuller model: every count and layer cost
    equals a meta forward's, to the last bit."""
    from dance.network.channels import channel_groups, layer_costs, remove_channels
    flops.clear_cache()
    model = dance.build_model(name, 5)
    shapes = ((1, 3, 64, 96), (2, 3, 72, 104))

    def is_meta(m):  # a meta copy has no gate values to read
        return next(m.parameters()).is_meta

    def site_counts(m):
        flops._GFLOPS_CACHE.clear()
        return ([flops._count_by_hooks(m, s, b) for s in shapes for b in (False, True)],
                [list(layer_costs(m, s).items()) for s in shapes],
                [(b.name, b.gflops_share) for b in branches(m, shapes[1])]
                if not is_meta(m) else [])

    def forward_counts(m):  # the counts from sites measured on this very model, uncached
        with monkeypatch.context() as mp:
            mp.setattr(flops, "layer_sites", lambda *a: None)
            return site_counts(m)

    live = [b for b in branches(model, shapes[0])
            if b.gflops_share > 0
            and model.get_submodule(b.module_path).may_slim_away([b.branch])]
    if live:  # a copy without a branch is measured first, the full model after it
        copy = flops.meta_copy(model)
        remove_branches(copy, [live[0].name])
        flops.clear_cache()
        assert site_counts(copy) == forward_counts(copy)
    assert site_counts(model) == forward_counts(model)
    assert flops.layer_sites(model, shapes[0]) is not None
    if live:
        remove_branches(model, [live[-1].name])
    groups = [g for g in channel_groups(model, shapes[0]) if g.channels > 8]
    for g in groups[:: max(1, len(groups) // 3)]:
        remove_channels(model, g.layer, list(range(8)))
    assert site_counts(model) == forward_counts(model)
    assert site_counts(model)[0][0] == flops.count_flops_torch(model, shapes[0])


def test_a_model_the_hooks_miss_is_counted_by_flop_counter_mode():
    class Functional(nn.Module):  # a convolution the layer hooks cannot see
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, 3, 3, 3))

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.w, padding=1)

    model = Functional()
    assert flops._count_by_hooks(model, (1, 3, 8, 8), False) == 0
    assert flops.count_flops(model, (1, 3, 8, 8), True) == \
        flops.count_flops_torch(model, (1, 3, 8, 8), True) > 0


def test_branch_shares_are_the_flops_their_removal_saves():
    model = dance.build_model("deeplabv3plus_mbv2", 19, **MBV2)
    shape = (1, 3, 512, 1024)
    total_flops = count_gflops(model, shape) * 1e9
    info = {b.name: b for b in branches(model, shape)}
    c_in = model.aspp.branches["rate6"][0].in_channels
    a = 16  # aspp_channels
    pixels = (512 // 16) * (1024 // 16)  # ASPP runs at output stride 16
    projection_slice = 2 * a * a * pixels  # the projection's input channels this branch fed
    expected = {
        "aspp.conv1x1": 2 * c_in * a * pixels + projection_slice,
        "aspp.rate6": 2 * 9 * c_in * a * pixels + projection_slice,
        "aspp.rate12": 2 * 9 * c_in * a * pixels + projection_slice,
        "aspp.rate18": 2 * 9 * c_in * a * pixels + projection_slice,
        "aspp.pool": 2 * c_in * a + projection_slice,  # its conv runs on one pixel
    }
    assert list(info) == list(expected)
    for name, saved in expected.items():
        assert info[name].gflops_share == pytest.approx(saved / total_flops, rel=1e-9), name
    # A module's last branch cannot go, so it saves nothing.
    remove_branches(model, ["aspp.conv1x1", "aspp.rate6", "aspp.rate12", "aspp.rate18"])
    assert [(b.name, b.gflops_share) for b in branches(model, shape)] == [("aspp.pool", 0.0)]
