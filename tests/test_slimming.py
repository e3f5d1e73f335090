"""Network slimming controller on a toy segmentation task.

The toy net: a 1x1 stem, a gated multi-scale module with four branches of different cost and one
classifier. Each 16x16 image is a per-image brightness offset plus noise; a pixel is class 1 when
its channel-0 value plus its channel-1 neighbourhood, both relative to the offset, is positive.
So the task needs the ``pixel`` (1x1), ``local`` (3x3) and ``pool`` (image mean -> offset)
branches, while ``dead`` (the costliest, zero and frozen) contributes nothing.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dance
from dance.errors import DanceError
from dance.network.flops import count_gflops
from dance.network.gates import GatedBranches
from dance.network.slimming import NetworkSlimmer, PruneEvent, rebuild_optimizer

SHAPE = (1, 3, 16, 16)


class ImagePool(nn.Module):
    """Global-context branch: its conv runs on a 1x1 map, so its cost does not grow with the
    image -- its FLOPs share grows as the data side downsamples."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x.mean((2, 3), keepdim=True))).expand(-1, -1, *x.shape[2:])


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU())
        dead = nn.Conv2d(8, 16, 3, padding=2, dilation=2, bias=False)
        nn.init.zeros_(dead.weight)
        dead.weight.requires_grad_(False)
        self.context = GatedBranches(
            {"pixel": nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU()),
             "local": nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
             "dead": dead,
             "pool": ImagePool(8, 4)},
            branch_channels={"pixel": 4, "local": 8, "dead": 16, "pool": 4},
            project=nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU()),
        )
        self.classifier = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.context(self.stem(x)))


def toy_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    offset = torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1
    x = offset + torch.randn(n, 3, 16, 16, generator=gen)
    neighbourhood = F.avg_pool2d(x[:, 1:2] - offset, 3, 1, 1, count_include_pad=False)
    return x, ((x[:, 0:1] - offset) + 1.5 * neighbourhood > 0).long()[:, 0]


def train(model, optimizer, slimmer, images, masks, steps, start=0) -> list[float]:
    """The trainer's side: task loss + sparsity term, one SGD step per batch of 16."""
    losses = []
    for step in range(start, start + steps):
        i = torch.arange(step * 16, step * 16 + 16) % len(images)
        loss = F.cross_entropy(model(images[i]), masks[i])
        total = loss + (slimmer.sparsity_loss(model) if slimmer is not None else 0.0)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def probe_loss(model, probe) -> float:
    model.eval()
    with torch.no_grad():
        value = sum(F.cross_entropy(model(x), y).item() for x, y in probe) / len(probe)
    model.train()
    return value


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convs on a shared 2-core machine run ~7x faster on one thread than on two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy():
    """A ToyNet trained 100 steps with the sparsity term (the state at the first pruning point)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images, masks = toy_batch(128, gen)
    probe = [toy_batch(32, gen) for _ in range(2)]
    model = ToyNet()
    slimmer = NetworkSlimmer(model, lam=0.05, prune_at=(0.3, 0.5, 0.7), input_shape=SHAPE)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=0.1, momentum=0.9)
    train(model, optimizer, slimmer, images, masks, 100)
    return {"model": model, "optimizer": optimizer, "slimmer": slimmer, "images": images,
            "masks": masks, "probe": probe}


def fresh(toy):
    """Independent copies of the trained model, its optimizer and its slimmer."""
    return copy.deepcopy((toy["model"], toy["optimizer"], toy["slimmer"]))


def test_sparsity_weights_follow_flops_shares():
    model = ToyNet()
    slimmer = NetworkSlimmer(model, lam=0.5, input_shape=SHAPE)
    c = slimmer.sparsity_weights(model)
    assert set(c) == {"context.pixel", "context.local", "context.dead", "context.pool"}
    # dead: 16 outputs of a 3x3 conv over 8 channels + 16 projection columns; local: half of that
    assert c["context.dead"] == pytest.approx(2 * c["context.local"], rel=1e-3)
    assert c["context.dead"] > c["context.local"] > c["context.pixel"] > 0
    assert 0.5 < sum(c.values()) < 1  # the stem, projection and classifier take the rest
    # downsampled data: per-pixel branches keep their share, the image-pooling branch gains
    c_half = slimmer.sparsity_weights(model, mean_scale=0.5)
    assert c_half["context.pool"] > c["context.pool"]
    assert c_half["context.local"] < c["context.local"]

    with torch.no_grad():
        for name, value in zip(["pixel", "local", "dead", "pool"], [0.5, -2.0, 1.0, 0.25]):
            model.context.gates[name].fill_(value)
    loss = slimmer.sparsity_loss(model, mean_scale=0.5)
    expected = 0.5 * (0.5 * c_half["context.pixel"] + 2.0 * c_half["context.local"]
                      + c_half["context.dead"] + 0.25 * c_half["context.pool"])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert model.context.gates["local"].grad.item() == pytest.approx(
        -0.5 * c_half["context.local"], rel=1e-6)


def test_sparsity_drives_useless_gate_to_zero_and_prune_removes_it(toy):
    model, _, slimmer = fresh(toy)
    gates = {n: abs(g.item()) for n, g in model.context.gates.items()}
    assert gates["dead"] < 0.05 * max(gates.values())
    assert min(gates["pixel"], gates["local"], gates["pool"]) > 0.3

    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        reference.context.gates["dead"].zero_()
    assert model.training and not slimmer.due(0.29) and slimmer.due(0.3)
    event = slimmer.prune(model, toy["probe"], F.cross_entropy, progress=0.3)

    assert event.removed == ["context.dead"]
    assert event.importance["context.dead"]["removed_by"] == "gate_threshold"
    assert "context.dead" in event.message and "gate below 0.1" in event.message
    assert list(model.context.branches) == ["pixel", "local", "pool"]
    assert model.context.project[0].in_channels == 16
    assert event.gflops_before - event.gflops_after == pytest.approx(
        event.importance["context.dead"]["gflops_saved"], rel=1e-6)
    assert event.gflops_after == pytest.approx(count_gflops(model, SHAPE))
    assert event.gflops_after < 0.5 * event.gflops_before  # the costliest branch went
    assert model.training  # mode restored
    assert not slimmer.due(0.45) and slimmer.due(0.5)
    x = toy["probe"][0][0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_loss_importance_of_needed_branch_exceeds_useless(toy):
    model, _, slimmer = fresh(toy)
    event = slimmer.prune(model, toy["probe"], F.cross_entropy, progress=0.3)
    imp = event.importance
    assert set(imp) == {"context.pixel", "context.local", "context.dead", "context.pool"}
    assert imp["context.dead"]["loss_rise"] == pytest.approx(0.0, abs=1e-6)
    for needed in ("context.pixel", "context.local", "context.pool"):
        assert imp[needed]["rel_loss_rise"] > 0.5  # the loss grows by more than half
        assert imp[needed]["score"] > 100 * max(imp["context.dead"]["score"], 1e-3)
        assert imp[needed]["removed_by"] is None
    assert event.probe_loss == pytest.approx(probe_loss(toy["model"], toy["probe"]), rel=1e-6)


def test_loss_importance_finds_what_the_gates_cannot_single_out(toy):
    # Without the sparsity term the dead branch's gate never moves (it gets no gradient), so its
    # gate looks as important as any other; the loss probe still sees that it does nothing.
    torch.manual_seed(1)
    model = ToyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                                momentum=0.9)
    train(model, optimizer, None, toy["images"], toy["masks"], 100)
    assert model.context.gates["dead"].item() == 1.0

    by_gate = NetworkSlimmer(model, prune_at=(0.5,), importance="gate", input_shape=SHAPE)
    assert by_gate.prune(copy.deepcopy(model), [], F.cross_entropy, 0.5).removed == []
    by_loss = NetworkSlimmer(model, prune_at=(0.5,), input_shape=SHAPE)
    event = by_loss.prune(model, toy["probe"], F.cross_entropy, 0.5)
    assert event.removed == ["context.dead"]
    assert event.importance["context.dead"]["removed_by"] == "negligible_loss"
    assert event.importance["context.dead"]["rel_gate"] > 0.5  # far above the gate threshold


def test_training_continues_after_removal_with_rebuilt_optimizer(toy):
    model, optimizer, slimmer = fresh(toy)
    momentum_before = {id(p): optimizer.state[p]["momentum_buffer"].clone()
                       for p in model.stem.parameters()}
    old_projection = model.context.project[0].weight
    slimmer.prune(model, toy["probe"], F.cross_entropy, progress=0.3)
    loss_at_prune = probe_loss(model, toy["probe"])

    rebuilt = rebuild_optimizer(optimizer, model)
    assert type(rebuilt) is torch.optim.SGD
    assert rebuilt.param_groups[0]["lr"] == 0.1 and rebuilt.param_groups[0]["momentum"] == 0.9
    held = [p for g in rebuilt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(held) == len({id(p) for p in held})
    assert old_projection not in rebuilt.state
    assert model.context.project[0].weight not in rebuilt.state  # sliced conv: fresh state
    for p in model.stem.parameters():  # untouched parameters keep their momentum
        assert torch.equal(rebuilt.state[p]["momentum_buffer"], momentum_before[id(p)])

    losses = train(model, rebuilt, slimmer, toy["images"], toy["masks"], 100, start=100)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert probe_loss(model, toy["probe"]) < 0.9 * loss_at_prune


def test_rebuild_optimizer_puts_new_parameters_in_their_module_group(toy):
    model = copy.deepcopy(toy["model"])
    head = list(model.context.parameters())
    head_ids = {id(p) for p in head}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": [p for p in head
                                                                 if p.requires_grad],
                                                      "lr": 1e-3, "weight_decay": 0.0}], lr=1e-2)
    train(model, optimizer, None, toy["images"], toy["masks"], 2)
    model.context.remove_branches(["dead"])
    rebuilt = rebuild_optimizer(optimizer, model)
    assert rebuilt.param_groups[1]["lr"] == 1e-3 and rebuilt.param_groups[1]["weight_decay"] == 0
    assert any(p is model.context.project[0].weight for p in rebuilt.param_groups[1]["params"])
    assert all(p is not model.context.project[0].weight for p in rebuilt.param_groups[0]["params"])
    assert int(rebuilt.state[model.stem[0].weight]["step"]) == 2
    train(model, rebuilt, None, toy["images"], toy["masks"], 1)
    assert int(rebuilt.state[model.context.project[0].weight]["step"]) == 1


def test_new_branch_parameters_keep_weight_decay_not_the_gates_group():
    """A branch convolution sliced by channel removal is new to the optimizer; its nearest
    neighbours are its module's gates (no weight decay): it joins the weights' group, where the
    trainer's optimizer puts it after a resume (the resumed run diverged before)."""
    from dance.engine.config import load_config
    from dance.engine.train import make_optimizer
    from dance.network import channels as ch
    from dance.network.gates import remove_branches
    cfg = load_config(None)
    torch.manual_seed(0)
    model = dance.build_model("deeplabv3plus_mbv2", 5, width_mult=0.35, aspp_channels=16,
                              decoder_channels=16)
    optimizer = make_optimizer(model, cfg)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.train.weight_decay, 0.0]
    remove_branches(model, ["aspp.rate6", "aspp.rate12", "aspp.rate18", "aspp.pool"])
    ch.remove_channels(model, "aspp.branches.conv1x1.0", list(range(8)))
    rebuilt = rebuild_optimizer(optimizer, model)
    fresh = make_optimizer(model, cfg)
    group = {id(p): i for i, g in enumerate(rebuilt.param_groups) for p in g["params"]}
    names = dict(model.named_parameters())
    assert {n: group[id(p)] for n, p in names.items()} == \
        {n: i for i, g in enumerate(fresh.param_groups) for n in names if
         any(q is names[n] for q in g["params"])}
    assert group[id(model.aspp.branches.conv1x1[0].weight)] == 0


def test_network_budget_forces_removal_of_least_important(toy):
    model, _, _ = fresh(toy)
    slimmer = NetworkSlimmer(model, prune_at=(0.5,), network_budget=0.3, input_shape=SHAPE)
    event = slimmer.prune(model, toy["probe"], F.cross_entropy, progress=0.5)
    imp = event.importance
    assert event.removed[0] == "context.dead"  # by the gate threshold, then the budget
    forced = [n for n in event.removed if imp[n]["removed_by"] == "budget"]
    assert forced == ["context.local"]
    live = [n for n in imp if n not in event.removed]
    assert imp["context.local"]["score"] == min(imp[n]["score"] for n in live + forced)
    assert event.target_gflops == pytest.approx(0.3 * slimmer.original_gflops)
    assert event.gflops_after <= event.target_gflops
    assert list(model.context.branches) == ["pixel", "pool"]
    assert "NOT met" not in event.message


def test_budget_is_spread_over_points_and_says_when_it_cannot_be_met(toy):
    model, _, _ = fresh(toy)
    slimmer = NetworkSlimmer(model, prune_at=(0.3, 0.6), network_budget=0.01,
                             importance="gate", input_shape=SHAPE)
    assert slimmer.target_fraction(0.3) == pytest.approx(0.505)
    assert slimmer.target_fraction(0.6) == pytest.approx(0.01)
    first = slimmer.prune(model, [], F.cross_entropy, progress=0.3)
    assert first.removed == ["context.dead"]  # 39% of the original is under this point's 50.5%
    last = slimmer.prune(model, [], F.cross_entropy, progress=0.6)
    assert len(last.removed) == 2 and len(model.context.branches) == 1
    assert "NOT met" in last.message and "no removable branch" in last.message
    assert not slimmer.due(1.0)


def test_skipped_points_are_done_together_and_not_due_raises(toy):
    model, _, slimmer = fresh(toy)
    event = slimmer.prune(model, toy["probe"], F.cross_entropy, progress=0.55)
    assert slimmer.done == [0.3, 0.5] and event.progress == 0.55
    with pytest.raises(ValueError, match="no pruning point due"):
        slimmer.prune(model, toy["probe"], F.cross_entropy, progress=0.6)


def test_state_dict_round_trip(toy):
    model, _, slimmer = fresh(toy)
    slimmer.prune(model, toy["probe"], F.cross_entropy, progress=0.3)
    state = json.loads(json.dumps(slimmer.state_dict()))

    resumed = NetworkSlimmer(model, prune_at=(0.3, 0.5, 0.7), input_shape=SHAPE)
    assert resumed.original_gflops < slimmer.original_gflops  # built on the slimmed model ...
    resumed.load_state_dict(state)
    assert resumed.original_gflops == slimmer.original_gflops  # ... the reference is restored
    assert not resumed.due(0.4) and resumed.due(0.5)
    assert resumed.state_dict() == state
    assert isinstance(resumed.events[0], PruneEvent)
    assert resumed.events[0].removed == ["context.dead"]
    with pytest.raises(DanceError, match="input shape"):
        NetworkSlimmer(model, input_shape=(1, 3, 32, 32)).load_state_dict(state)



@pytest.mark.parametrize("after_last", [False, True])
def test_sparsity_term_stops_after_the_last_point_unless_asked(toy, after_last):
    """Nothing is removed after the last pruning point, so the L1 pull would only drive the
    scales the slim network keeps to zero: the term is off from then on (by default)."""
    model = ToyNet()
    slimmer = NetworkSlimmer(model, lam=0.5, prune_at=(0.3, 0.5), input_shape=SHAPE,
                             sparsity_after_last_point=after_last)
    assert slimmer.sparsity_loss(model).item() > 0
    slimmer.prune(model, toy["probe"], F.cross_entropy, progress=0.3)
    assert slimmer.sparsity_active() and slimmer.sparsity_loss(model).item() > 0
    slimmer.prune(model, toy["probe"], F.cross_entropy, progress=0.5)
    assert slimmer.sparsity_active() == after_last
    assert (slimmer.sparsity_loss(model).item() > 0) == after_last
    state = slimmer.state_dict()  # a resume after the last point stays off
    resumed = NetworkSlimmer(model, lam=0.5, prune_at=(0.3, 0.5), input_shape=SHAPE,
                             sparsity_after_last_point=after_last)
    resumed.load_state_dict(state)
    assert resumed.sparsity_active() == after_last

@pytest.mark.parametrize("kwargs, match", [
    ({"importance": "norm"}, "importance"),
    ({"network_budget": 1.5}, "network_budget"),
    ({"prune_at": (0.3, 1.2)}, "prune_at"),
    ({"lam": -1.0}, "lambda"),
])
def test_bad_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(DanceError, match=match):
        NetworkSlimmer(ToyNet(), input_shape=SHAPE, **kwargs)


def test_expected_fraction_averages_the_targets_over_training():
    # 1 until 0.3, 5/6 to 0.5, 2/3 to 0.7, then 1/2
    assert NetworkSlimmer.expected_fraction([0.3, 0.5, 0.7], 0.5) == pytest.approx(0.75)
    assert NetworkSlimmer.expected_fraction([0.1, 0.2, 0.3], 0.5) == pytest.approx(0.6)
    assert NetworkSlimmer.expected_fraction([0.5], None) == 1.0
    # over a part of training: the pieces it overlaps, weighted by overlap
    assert NetworkSlimmer.expected_fraction([0.3, 0.5, 0.7], 0.5, 0.0, 0.3) == 1.0
    assert NetworkSlimmer.expected_fraction([0.3, 0.5, 0.7], 0.5, 0.2, 0.4) == \
        pytest.approx((1.0 + 5 / 6) / 2)
    assert NetworkSlimmer.expected_fraction([0.3, 0.5, 0.7], 0.5, 0.9, 1.0) == pytest.approx(0.5)
    parts = [NetworkSlimmer.expected_fraction([0.3, 0.5, 0.7], 0.5, e / 7, (e + 1) / 7)
             for e in range(7)]
    assert sum(parts) / 7 == pytest.approx(0.75)
    with pytest.raises(ValueError, match="start < end"):
        NetworkSlimmer.expected_fraction([0.3], 0.5, 0.5, 0.5)


def test_may_slim_away_keeps_a_branch_that_is_not_global():
    aspp = dance.build_model("deeplabv3plus_mbv2", 3, width_mult=0.25, aspp_channels=8).aspp
    assert aspp.global_branches == {"pool"}
    spatial = ["conv1x1", "rate6", "rate12", "rate18"]
    assert aspp.may_slim_away(spatial[:3]) and aspp.may_slim_away(spatial[1:] + ["pool"])
    assert not aspp.may_slim_away(spatial)  # only image pooling left
    assert not aspp.may_slim_away(spatial + ["pool"])  # nothing left
    assert not GatedBranches({"a": nn.Identity()}).may_slim_away(["a"])
    only_global = GatedBranches({"g": nn.Identity(), "h": nn.Identity()}, global_branches=["g", "h"])
    assert only_global.may_slim_away(["g"]) and not only_global.may_slim_away(["g", "h"])
    # an explicit removal may still leave image pooling alone
    dance.remove_branches(aspp, spatial)
    assert list(aspp.branches) == ["pool"]


def test_gate_threshold_leaves_a_spatial_branch_beside_image_pooling():
    torch.manual_seed(0)
    model = dance.build_model("deeplabv3plus_mbv2", 3, width_mult=0.25, aspp_channels=8)
    with torch.no_grad():
        for gate, name in zip((0.02, 0.03, 0.04, 0.05), ("conv1x1", "rate6", "rate12", "rate18")):
            model.aspp.gates[name].fill_(gate)  # all under the threshold, rate18 the highest
        model.aspp.gates["pool"].fill_(1.0)
    slimmer = NetworkSlimmer(model, prune_at=(0.5,), importance="gate", input_shape=SHAPE)
    event = slimmer.prune(model, [], F.cross_entropy, progress=0.5)
    assert event.removed == ["aspp.conv1x1", "aspp.rate6", "aspp.rate12"]
    assert list(model.aspp.branches) == ["rate18", "pool"]
    assert event.importance["aspp.rate18"]["branch"] == "rate18"


def test_budget_keeps_a_spatial_branch_beside_a_global_one(toy):
    model, _, _ = fresh(toy)
    model.context.global_branches = frozenset({"pool"})
    with torch.no_grad():  # the global branch ranks first: the budget takes the others first
        for name in ("pixel", "local", "dead"):
            model.context.gates[name].mul_(0.01)
    slimmer = NetworkSlimmer(model, prune_at=(0.5,), network_budget=0.01, importance="gate",
                             input_shape=SHAPE)
    event = slimmer.prune(model, [], F.cross_entropy, progress=0.5)
    # the gate threshold takes local and dead, the budget the global pool: pixel is kept
    assert list(model.context.branches) == ["pixel"] and "NOT met" in event.message
    assert event.importance["context.pool"]["removed_by"] == "budget"
