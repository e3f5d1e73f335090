"""Gated models: every branch's zero gate equals its structural removal, and
removal makes the model physically smaller."""
import copy

import pytest
import torch
from torch import nn

import dance
from dance.errors import DanceError
from dance.network.flops import count_gflops
from dance.network.gates import multiscale_modules, remove_branches

# Narrow heads keep the CPU tests fast; the backbones are the real torchvision ones.
SMALL = {
    "deeplabv3plus_r50": {"aspp_channels": 16, "decoder_channels": 16},
    "deeplabv3plus_mbv2": {"aspp_channels": 16, "decoder_channels": 16, "width_mult": 0.5},
    "pspnet_r18": {"ppm_channels": 16, "bin_channels": 8},
    "pspnet_r50": {"ppm_channels": 16, "bin_channels": 8},
    "deeplabv3_mobilenet_v3_large": {},
    "deeplabv3_resnet50": {},
    "lraspp_mobilenet_v3_large": {},
}
EXPECTED_BRANCHES = {
    "deeplabv3plus_r50": ["aspp.conv1x1", "aspp.rate6", "aspp.rate12", "aspp.rate18", "aspp.pool"],
    "deeplabv3plus_mbv2": ["aspp.conv1x1", "aspp.rate6", "aspp.rate12", "aspp.rate18",
                           "aspp.pool"],
    "pspnet_r18": ["ppm.bin1", "ppm.bin2", "ppm.bin3", "ppm.bin6"],
    "pspnet_r50": ["ppm.bin1", "ppm.bin2", "ppm.bin3", "ppm.bin6"],
    "deeplabv3_mobilenet_v3_large": ["aspp.conv1x1", "aspp.rate12", "aspp.rate24", "aspp.rate36",
                                     "aspp.pool"],
    "deeplabv3_resnet50": ["aspp.conv1x1", "aspp.rate12", "aspp.rate24", "aspp.rate36",
                           "aspp.pool"],
    "lraspp_mobilenet_v3_large": ["lraspp.context", "lraspp.detail"],
}
HEAVY = {"deeplabv3plus_r50", "pspnet_r50", "deeplabv3_resnet50"}


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Give BatchNorm the statistics of ``x`` (fresh init has mean 0, var 1, which lets deep
    activations vanish or explode, so a branch's effect would be invisible), leave the model in
    eval mode and return the train-mode output."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one pass sets the batch statistics
    with torch.no_grad():
        out = model.train()(x)
    model.eval()
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_branch_gate_zero_equals_removal(name):
    torch.manual_seed(0)
    model = dance.build_model(name, 5, **SMALL[name])
    # Odd sizes on purpose: logits come back at exactly the input size, batch included.
    batch = torch.rand(2, 3, 33, 49) if name in HEAVY else torch.rand(2, 3, 65, 97)
    assert calibrate_batchnorm(model, batch).shape == (2, 5, *batch.shape[2:])
    x = torch.rand(1, 3, 33, 49)
    shape = tuple(x.shape)
    names = [f"{path}.{b}" for path, m in multiscale_modules(model) for b in m.branch_names()]
    assert names == EXPECTED_BRANCHES[name]
    fresh = copy.deepcopy(model)

    with torch.no_grad():
        before = model(x)
    gflops_before, params_before = count_gflops(model, shape), n_params(model)
    *removable, last = names
    for full in removable:
        path, branch = full.rsplit(".", 1)
        with torch.no_grad():
            model.get_submodule(path).gates[branch].zero_()
            gated = model(x)
            remove_branches(model, [full])
            removed = model(x)
        assert (gated - before).abs().max() > 1e-4, f"{full} has no effect on the output"
        torch.testing.assert_close(removed, gated, atol=1e-5, rtol=0)
        gflops, params = count_gflops(model, shape), n_params(model)
        assert gflops < gflops_before and params < params_before, full
        before, gflops_before, params_before = removed, gflops, params
    assert model.dance_arch.removed == removable

    with pytest.raises(DanceError, match=f"cannot remove branch '{last}'.*last branch") as e:
        remove_branches(model, [last])
    assert "\n" not in str(e.value)

    # The module's last live branch is still a branch: check it alone on the untouched model.
    path, branch = last.rsplit(".", 1)
    with torch.no_grad():
        fresh.get_submodule(path).gates[branch].zero_()
        gated = fresh(x)
        remove_branches(fresh, [last])
        torch.testing.assert_close(fresh(x), gated, atol=1e-5, rtol=0)


def test_unknown_branch_is_a_one_line_error_and_removes_nothing():
    model = dance.build_model("pspnet_r18", 3, **SMALL["pspnet_r18"])
    with pytest.raises(DanceError, match="unknown branch 'ppm.bin4'") as e:
        remove_branches(model, ["ppm.bin1", "ppm.bin4"])
    assert "\n" not in str(e.value) and "ppm.bin6" in str(e.value)  # it lists the real ones
    assert model.ppm.branch_names() == ["bin1", "bin2", "bin3", "bin6"]
    with pytest.raises(DanceError, match="'ppm.bin6'.*last branch"):
        remove_branches(model, ["ppm.bin1", "ppm.bin2", "ppm.bin3", "ppm.bin6"])
    assert model.dance_arch.removed == []


def test_gates_scale_branch_outputs_and_are_trainable():
    torch.manual_seed(0)
    model = dance.build_model("deeplabv3plus_mbv2", 4, **SMALL["deeplabv3plus_mbv2"])
    gates = [p for path, m in multiscale_modules(model) for p in m.gates.values()]
    assert len(gates) == 5 and all(g.requires_grad and g.item() == 1.0 for g in gates)
    model.train()(torch.rand(2, 3, 64, 96)).square().mean().backward()
    assert all(g.grad is not None and g.grad.abs() > 0 for g in gates)
    # The public API reports gate values as floats.
    with torch.no_grad():
        model.aspp.gates["rate12"].fill_(0.25)
    info = {b.name: b for b in dance.branches(model)}  # shares at 512x1024: see test_flops
    assert info["aspp.rate12"].gate == 0.25 and info["aspp.rate12"].module_path == "aspp"
    assert info["aspp.rate12"].branch == "rate12"


def test_list_models_has_every_model_of_this_file():
    assert set(SMALL) <= set(dance.list_models())
