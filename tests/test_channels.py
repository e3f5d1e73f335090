"""Channel slimming: removing a channel group equals masking it, for one model of every family
and the torchvision adapters; params and FLOPs fall; branches still come off a channel-slimmed
model; exports match; a checkpoint rebuilds the slimmed shapes; bad input is a clear error."""
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dance
from dance.engine.checkpoint import load_model, save_checkpoint
from dance.errors import DanceError
from dance.network.channels import ROUND_TO, channel_groups, mask_channels, remove_channels
from dance.network.flops import count_gflops
from dance.network.registry import Architecture
from dance.network.slimming import NetworkSlimmer, _Probe

# Narrow but real: every coupling of each family is there (concats, residual sums, depthwise
# groups, attention products, HRNet's fusion), at widths that keep the test fast.
FAMILIES = {
    "deeplabv3plus_mbv2": {"aspp_channels": 16, "decoder_channels": 16, "width_mult": 0.5},
    "pspnet_r18": {"ppm_channels": 16, "bin_channels": 16},
    "hrnet_w18_small": {"widths": (16, 24, 32, 40), "stem_channels": 16,
                        "modules_per_stage": (1, 1, 1)},
    "bisenet_v1_r18": {"spatial_channels": 16, "context_channels": 24, "fusion_channels": 32},
    "lraspp_mobilenet_v3_large": {},
    "deeplabv3_mobilenet_v3_large": {},
}
SHAPE = (1, 3, 64, 96)


def randomized(name: str) -> nn.Module:
    """The model with BatchNorm affine terms away from their init and statistics calibrated on
    random images (so activations neither vanish nor explode, and a masked channel that is not
    really cut off from the output would show), in eval mode."""
    torch.manual_seed(0)
    model = dance.build_model(name, 5, **FAMILIES[name])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.momentum = None  # cumulative average: one pass sets the statistics
        model.train()(torch.rand(4, 3, 64, 96))
    return model.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def chunks(model: nn.Module) -> list[tuple[str, list[int], int]]:
    """One removable chunk per group: (root layer, channel indices, width), not the first
    channels, so index bookkeeping must hold."""
    return [(g.layer, list(range(1, g.chunk() + 1)), g.channels)
            for g in channel_groups(model, SHAPE) if g.chunk()]


def masked_and_removed(model: nn.Module, cuts: list[tuple[str, list[int], int]], x: torch.Tensor):
    masked, removed = copy.deepcopy(model), copy.deepcopy(model)
    for layer, idx, _ in cuts:
        mask_channels(masked, layer, idx)
        remove_channels(removed, layer, idx)
    with torch.no_grad():
        return masked, removed, masked(x), removed(x)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_removing_channel_groups_equals_masking_them(name):
    """A chunk of every group at once (groups are disjoint, so indices stay valid), in float64:
    the comparison is about the surgery, not float32 rounding (1e-5 of logits around 3)."""
    model = randomized(name).double()
    x = torch.rand(1, 3, 65, 97, dtype=torch.float64)  # odd sizes: every resize and pooling path
    cuts = chunks(model)
    assert len(cuts) >= 10
    _, removed, ym, yr = masked_and_removed(model, cuts, x)
    torch.testing.assert_close(yr, ym, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert (ym - model(x)).abs().max() > 1e-3  # masking is not a no-op
    for layer, idx, width in cuts:
        assert removed.get_submodule(layer).out_channels == width - len(idx)
        assert (width - len(idx)) % ROUND_TO == 0
    assert count_gflops(removed, SHAPE) < count_gflops(model, SHAPE)
    assert n_params(removed) < n_params(model)
    assert removed.dance_arch.removed == [{"layer": layer, "channels": idx}
                                          for layer, idx, _ in cuts]
    # the groups re-read after the removals are those a new trace of the slimmed model finds
    fresh = copy.deepcopy(removed)
    assert ([(g.layer, g.channels, g.layers) for g in channel_groups(removed, SHAPE)]
            == [(g.layer, g.channels, g.layers) for g in channel_groups(fresh, SHAPE)])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_hidden_layer_as_wide_as_the_classes_is_still_slimmable(name):
    # the logits' convolutions are found by where their output goes, not by their width: with as
    # many classes as a hidden layer has channels, the same groups stay removable
    hidden = 16 if name in ("deeplabv3plus_mbv2", "pspnet_r18", "hrnet_w18_small",
                            "bisenet_v1_r18") else 40
    wide = dance.build_model(name, 5, **FAMILIES[name])
    widths = {m.out_channels for m in wide.modules() if isinstance(m, nn.Conv2d)}
    assert hidden in widths
    same = dance.build_model(name, hidden, **FAMILIES[name])

    def outputs(model):
        names = {m: n for n, m in model.named_modules()}
        return [names[m] for m in dance.network.channels.output_layers(model)]

    assert outputs(same) == outputs(wide)
    assert all(same.get_submodule(n).out_channels == hidden for n in outputs(same))
    assert ([g.layer for g in channel_groups(same, SHAPE)]
            == [g.layer for g in channel_groups(wide, SHAPE)])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_removing_each_channel_group_alone_equals_masking_it(name):
    """The exhaustive version, one group at a time: names the group that breaks, and checks
    each one reaches the output."""
    model = randomized(name).double()
    x = torch.rand(1, 3, 65, 97, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    cuts = chunks(model)
    reaching = 0
    for cut in cuts:
        _, removed, ym, yr = masked_and_removed(model, [cut], x)
        torch.testing.assert_close(yr, ym, atol=1e-5, rtol=0, msg=f"{name}: {cut[0]}")
        reaching += bool((ym - before).abs().max() > 1e-4)
        assert count_gflops(removed, SHAPE) < count_gflops(model, SHAPE), cut[0]
    assert reaching >= 0.8 * len(cuts)


@pytest.mark.parametrize("name", ["deeplabv3plus_mbv2", "pspnet_r18", "hrnet_w18_small"])
def test_branches_come_off_a_channel_slimmed_model(name):
    """A concatenation's branch bookkeeping follows its branches' widths after channel
    slimming (ASPP, PPM, HRNet's head), so branch removal still equals its gate at zero."""
    model = randomized(name)
    for g in channel_groups(model, SHAPE):
        if g.chunk():
            remove_channels(model, g.layer, range(g.chunk()))
    x = torch.rand(1, 3, 64, 96)
    for info in dance.branches(model, SHAPE)[:-1]:
        gated = copy.deepcopy(model)
        with torch.no_grad():
            gated.get_submodule(info.module_path).gates[info.branch].zero_()
            expected = gated(x)
            dance.remove_branches(model, [info.name])
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    # and channels still come off the branch-slimmed model
    g = next(g for g in channel_groups(model, SHAPE) if g.chunk())
    remove_channels(model, g.layer, range(g.chunk()))
    assert model(x).shape == (1, 5, 64, 96)


def test_architecture_replays_channels_and_branches_in_order(tmp_path):
    model = randomized("deeplabv3plus_mbv2")
    dance.remove_branches(model, ["aspp.rate18"])
    decoder = next(g for g in channel_groups(model, SHAPE) if g.layer.startswith("decoder"))
    remove_channels(model, decoder.layer, [0, 3, 5, 7, 9, 11, 13, 15][:decoder.chunk()])
    dance.remove_branches(model, ["aspp.rate6"])
    save_checkpoint(tmp_path / "ckpt", model, {"train_state": {}})
    loaded = load_model(tmp_path / "ckpt")
    assert [type(r) for r in loaded.dance_arch.removed] == [str, dict, str]
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)
    assert {n: p.shape for n, p in loaded.named_parameters()} == \
        {n: p.shape for n, p in model.named_parameters()}


def test_bad_channel_removals_are_one_line_errors_and_change_nothing():
    model = randomized("pspnet_r18")
    ref = copy.deepcopy(model.state_dict())
    groups = channel_groups(model, SHAPE)
    g = groups[0]
    for layer, idx, match in [
        ("classifier", [0], "not the root convolution of a removable channel group"),
        ("nope.conv", [0], "not the root convolution"),
        (g.layer, [g.channels], rf"must be distinct and in \[0, {g.channels}\)"),
        (g.layer, [1, 1], "must be distinct"),
        (g.layer, range(g.channels), f"cannot remove all {g.channels} channels"),
    ]:
        with pytest.raises(DanceError, match=match) as e:
            remove_channels(model, layer, idx)
        assert "\n" not in str(e.value)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert model.dance_arch.removed == []
    for bad in ([{"layer": "x", "channels": ["a"]}], [{"channels": [1]}], [3]):
        with pytest.raises(DanceError, match="run.json: malformed architecture"):
            Architecture.from_json({"name": "pspnet_r18", "num_classes": 5, "removed": bad},
                                   "run.json")


def test_network_budget_is_met_by_channels_and_branches_within_5_percent():
    torch.manual_seed(0)
    model = dance.build_model("deeplabv3plus_mbv2", 5, **FAMILIES["deeplabv3plus_mbv2"])
    slimmer = NetworkSlimmer(model, network_budget=0.5, input_shape=SHAPE, channels=True)
    probe = [(torch.rand(4, 3, 64, 96), torch.randint(0, 5, (4, 64, 96)))]
    term = slimmer.sparsity_loss(model, 0.75)
    term.backward()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert term > 0 and bn.weight.grad is not None  # the BatchNorm scales are pushed down
    model.zero_grad()
    fractions = []
    for p in slimmer.prune_at:
        event = slimmer.prune(model, probe, F.cross_entropy, p)
        fractions.append(event.gflops_after / slimmer.original_gflops)
        assert event.channels and all(c["gflops_saved"] > 0 for c in event.channels)
        assert set(event.widths) == {g.layer for g in channel_groups(model, SHAPE)}
    assert fractions[0] > fractions[1] > fractions[2]  # progressive
    assert abs(fractions[-1] / 0.5 - 1) <= 0.05, fractions
    assert all(p.grad is None for p in model.parameters())  # Taylor's gradients are cleared
    rebuilt = model.dance_arch.build()
    rebuilt.load_state_dict(model.state_dict())


def test_a_channels_activation_traffic_is_exact_for_one_group_at_a_time():
    """``melems_per_channel`` is what removing a chunk of the group takes off the model's
    activation traffic, as ``gflops_per_channel`` is for its FLOPs."""
    from dance.network.channels import activation_traffic
    model = randomized("deeplabv3plus_mbv2")
    before = activation_traffic(model, SHAPE)
    groups = [g for g in channel_groups(model, SHAPE) if g.chunk()]
    assert before > 0 and all(g.melems_per_channel > 0 for g in groups)
    for g in groups[::5]:
        slim = copy.deepcopy(model)
        remove_channels(slim, g.layer, list(range(g.chunk())))
        moved = before - activation_traffic(slim, SHAPE)
        assert moved == pytest.approx(g.chunk() * g.melems_per_channel, rel=1e-6), g.layer
        assert g.cost(0.5) == pytest.approx(g.gflops_per_channel + 0.5 * g.melems_per_channel)


def test_max_channel_cut_keeps_every_group_at_its_share_and_survives_a_resume():
    """No group loses more than max_channel_cut of the width it had as training started, over
    every point and across a resume (the slimmer is rebuilt on the slimmed model there); the
    budget is still met."""
    torch.manual_seed(0)
    model = randomized("deeplabv3plus_mbv2")
    start = {g.layer: g.channels for g in channel_groups(model, SHAPE)}
    probe = [(torch.rand(4, 3, 64, 96), torch.randint(0, 5, (4, 64, 96)))]
    slimmer = NetworkSlimmer(model, network_budget=0.5, input_shape=SHAPE, channels=True,
                             max_channel_cut=0.5)
    slimmer.prune(model, probe, F.cross_entropy, slimmer.prune_at[0])
    resumed = NetworkSlimmer(model, network_budget=0.5, input_shape=SHAPE, channels=True,
                             max_channel_cut=0.5)
    resumed.load_state_dict(json.loads(json.dumps(slimmer.state_dict())))
    assert resumed.original_widths == start
    for p in resumed.prune_at[1:]:
        event = resumed.prune(model, probe, F.cross_entropy, p)
    assert abs(event.gflops_after / resumed.original_gflops / 0.5 - 1) <= 0.05
    now = {g.layer: g.channels for g in channel_groups(model, SHAPE)}
    assert all(now[k] >= start[k] / 2 for k in now if k in start), now
    unlimited = randomized("deeplabv3plus_mbv2")  # the same cut without the limit goes further
    free = NetworkSlimmer(unlimited, network_budget=0.5, input_shape=SHAPE, channels=True)
    for p in free.prune_at:
        free.prune(unlimited, probe, F.cross_entropy, p)
    assert min(g.channels / start[g.layer] for g in channel_groups(unlimited, SHAPE)
               if g.layer in start) < 0.5
    with pytest.raises(DanceError, match="max_channel_cut"):
        NetworkSlimmer(model, network_budget=0.5, input_shape=SHAPE, channels=True,
                       max_channel_cut=0.0)

def test_taylor_batches_averages_each_probe_batchs_importance():
    """``taylor_batches`` is the mean over the probe batches of each batch's Taylor importance
    (so gradients of opposite sign on two batches do not cancel); with one batch it is
    ``taylor``."""
    from dance.network.channels import channel_importance
    model = randomized("deeplabv3plus_mbv2")
    torch.manual_seed(1)
    probe = [(torch.rand(2, 3, 64, 96), torch.randint(0, 5, (2, 64, 96))) for _ in range(3)]

    def scores(kind: str, batches) -> dict[str, torch.Tensor]:
        slimmer = NetworkSlimmer(model, network_budget=0.5, input_shape=SHAPE, channels=True,
                                 channel_importance=kind)
        return slimmer._channel_scores(model, _Probe(model, batches, F.cross_entropy))

    def taylor_of(batch) -> dict[str, torch.Tensor]:
        model.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        out = channel_importance(model, "taylor")
        model.zero_grad(set_to_none=True)
        return out

    per_batch = [taylor_of(b) for b in probe]
    averaged, pooled = scores("taylor_batches", probe), scores("taylor", probe)
    assert all(p.grad is None for p in model.parameters())
    finite = [k for k, v in averaged.items() if torch.isfinite(v).all()]
    assert finite
    for k in finite:
        assert torch.allclose(averaged[k], sum(b[k] for b in per_batch) / 3, rtol=1e-5)
    assert any(not torch.allclose(averaged[k], pooled[k]) for k in finite)
    assert all((averaged[k] >= pooled[k] - 1e-6).all() for k in finite)  # |mean| <= mean |.|
    one = scores("taylor_batches", probe[:1])
    assert all(torch.equal(one[k], v) for k, v in scores("taylor", probe[:1]).items())


def test_revive_dead_gives_dead_channels_their_scale_back_at_the_last_point_only():
    """Channels with no output (BatchNorm scale and shift 0 across their group) have zero
    importance; with ``revive_dead`` the last pruning point gives the survivors a small scale
    back, after which none is dead once training goes on; earlier points and runs without the
    option leave them."""
    def with_dead_channels() -> nn.Module:
        model = randomized("deeplabv3plus_mbv2")
        with torch.no_grad():
            for g in channel_groups(model, SHAPE):
                for name in g.bns:
                    bn = model.get_submodule(name)
                    bn.weight[:3] = 0.0
                    bn.bias[:3] = 0.0
        return model

    torch.manual_seed(1)
    probe = [(torch.rand(4, 3, 64, 96), torch.randint(0, 5, (4, 64, 96)))]

    def dead(model: nn.Module, slimmer: NetworkSlimmer) -> int:
        scores = slimmer._channel_scores(model, _Probe(model, probe, F.cross_entropy))
        return sum(int((v == 0).sum()) for v in scores.values())

    events = {}
    for revive in (False, True):
        model = with_dead_channels()
        slimmer = NetworkSlimmer(model, network_budget=0.9, input_shape=SHAPE, channels=True,
                                 revive_dead=revive)
        assert dead(model, slimmer) > 0
        events[revive] = [slimmer.prune(model, probe, F.cross_entropy, p)
                          for p in slimmer.prune_at]
        left = dead(model.train(), slimmer)  # as training goes on: batch statistics
        assert (left == 0) if revive else (left > 0)
    assert [e.revived for e in events[False]] == [0, 0, 0]
    *earlier, last = events[True]
    assert [e.revived for e in earlier] == [0, 0] and last.revived > 0
    assert f"revived {last.revived} dead channels" in last.message
    assert last.to_json()["revived"] == last.revived


@pytest.mark.parametrize("memory_weight", [0.0, 0.3])
def test_a_network_budget_lands_within_2_percent_on_a_small_model(memory_weight):
    """On the demo's model at 64x128 one 8-channel chunk of the stride-4 decoder is 7% of the
    FLOPs: the last picks pass over chunks that would overshoot (it landed at 0.46 for 0.5)."""
    from dance.bench.models import slim_to
    torch.manual_seed(0)
    model = dance.build_model("deeplabv3plus_mbv2", 19, width_mult=0.5, aspp_channels=64,
                              decoder_channels=64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    shape = (1, 3, 64, 128)
    before = count_gflops(model, shape)
    slim_to(model, 0.5, shape, memory_weight)
    assert count_gflops(model, shape) / before == pytest.approx(0.5, abs=0.01)


def test_a_memory_weight_moves_the_cut_to_high_resolution():
    """Ranked by FLOPs plus activation traffic, a cut to the same FLOPs removes channels that
    move more activations (the memory-bound part of CPU time)."""
    from dance.bench.models import slim_to
    from dance.network.channels import activation_traffic
    traffic = []
    for weight in (0.0, 1.0):
        model = randomized("deeplabv3plus_mbv2")
        before = activation_traffic(model, SHAPE)
        slim_to(model, 0.5, SHAPE, weight)
        traffic.append(activation_traffic(model, SHAPE) / before)
    assert traffic[1] < traffic[0] - 0.05, traffic
    with pytest.raises(DanceError, match="memory_weight must be >= 0"):
        NetworkSlimmer(randomized("deeplabv3plus_mbv2"), network_budget=0.5, input_shape=SHAPE,
                       channels=True, memory_weight=-1.0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream
# two families in the CI run (a decoder concat; HRNet's streams and head), the rest marked slow
@pytest.mark.parametrize("name", [n if n in ("deeplabv3plus_mbv2", "hrnet_w18_small")
                                  else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(FAMILIES)])
def test_channel_slimmed_exports_match_pytorch_at_two_sizes(tmp_path, name):
    model = randomized(name)
    for g in channel_groups(model, SHAPE):
        if g.chunk():
            remove_channels(model, g.layer, range(g.chunk()))
    onnx_path = dance.export(model, tmp_path / "m.onnx", format="onnx", input_shape=SHAPE)
    ts_path = dance.export(model, tmp_path / "m.pt", format="torchscript", input_shape=SHAPE)
    script = ("import sys, numpy as np, onnxruntime, torch\n"
              "s = onnxruntime.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
              "t = torch.jit.load(sys.argv[2])\n"
              "for i in (0, 1):\n"
              "    x = np.load(f'{sys.argv[3]}/x{i}.npy')\n"
              "    np.save(f'{sys.argv[3]}/onnx{i}.npy', s.run(['logits'], {'image': x})[0])\n"
              "    np.save(f'{sys.argv[3]}/ts{i}.npy', t(torch.from_numpy(x)).detach().numpy())\n")
    xs = [torch.rand(1, 3, 64, 96), torch.rand(2, 3, 81, 113)]
    for i, x in enumerate(xs):
        np.save(tmp_path / f"x{i}.npy", x.numpy())
    subprocess.run([sys.executable, "-c", script, str(onnx_path), str(ts_path), str(tmp_path)],
                   check=True, timeout=120)
    for i, x in enumerate(xs):
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(np.load(tmp_path / f"onnx{i}.npy"), expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.load(tmp_path / f"ts{i}.npy"), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["deeplabv3plus_mbv2", "hrnet_w18_small", "bisenet_v1_r18"])
def test_kept_optimizer_state_is_each_surviving_slice_of_the_old_state(name):
    """After channel and branch removals every parameter keeps Adam's state of the elements
    that survived, sliced as the weights were (checked against the gradients, which the
    surgery slices alike), in its old parameter's group; untouched ones keep theirs."""
    from dance.network.slimming import OptimizerSnapshot, rebuild_optimizer
    model = randomized(name).train()
    gates = [p for p in model.parameters() if p.dim() == 0]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.dim() > 0]},
         {"params": gates, "weight_decay": 0.0}], lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.rand(2, 3, 64, 96)).square().mean().backward()
        optimizer.step()
    for p in model.parameters():  # what the surgery's own slicing of gradients gives
        p.grad = optimizer.state[p]["exp_avg_sq"].clone()
    snapshot = OptimizerSnapshot(optimizer, model)
    old = dict(model.named_parameters())
    for layer, idx, _ in chunks(model)[::2]:
        remove_channels(model, layer, idx)
    branch = next((b.name for b in dance.branches(model)), None)
    if branch is not None:
        dance.remove_branches(model, [branch])
    replaced = [n for n, p in model.named_parameters() if p is not old[n]]
    assert len(replaced) > 10
    assert snapshot.carry(model) == len([n for n in replaced if model.get_parameter(n).grad
                                         is not None])
    rebuilt = rebuild_optimizer(optimizer, model)
    group = {id(p): i for i, g in enumerate(rebuilt.param_groups) for p in g["params"]}
    for p in model.parameters():
        assert group[id(p)] == (1 if p.dim() == 0 else 0)
        if p.grad is None:  # a layer rebuilt without its gradient: fresh state, as before
            assert p not in rebuilt.state
            continue
        state = rebuilt.state[p]
        assert int(state["step"]) == 2
        torch.testing.assert_close(state["exp_avg_sq"], p.grad, rtol=0, atol=0)
        assert state["exp_avg"].shape == p.shape
    assert not any(p in rebuilt.state for n, p in old.items() if n in replaced)
    optimizer.zero_grad()
    model(torch.rand(2, 3, 64, 96)).square().mean().backward()
    rebuilt.step()
