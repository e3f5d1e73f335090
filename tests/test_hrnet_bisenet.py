"""HRNet-W18-small and BiSeNet V1: gated branches, structural removal.

The contract every gated model keeps: in eval mode, a branch's gate at 0 gives the same output as
the branch removed structurally, and the removal really shrinks the model.
"""
import copy
import keyword

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import dance
from dance.errors import DanceError

# Narrow versions for CPU tests; the architecture (streams, fusions, paths) is the full one.
TINY = {
    "hrnet_w18_small": {"widths": (4, 8, 16, 32), "stem_channels": 8, "stage1_blocks": 1,
                        "blocks_per_branch": 1, "modules_per_stage": (1, 2, 1)},
    "bisenet_v1_r18": {"spatial_channels": 16, "context_channels": 16, "fusion_channels": 32},
}
BRANCHES = {
    "hrnet_w18_small": ["hrnet.stream2", "hrnet.stream3", "hrnet.stream4"],
    "bisenet_v1_r18": ["context_path.arm16", "context_path.arm32",
                       "context_path.global_context"],
}
SHAPE = (1, 3, 64, 128)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run fastest on one thread; more only contend on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(name: str, num_classes: int = 5, **kwargs) -> torch.nn.Module:
    """A built model with random BatchNorm statistics and gates != 1, in eval mode, so that
    every gate, every BN and every removed path visibly changes the output."""
    torch.manual_seed(0)
    model = dance.build_model(name, num_classes, **TINY[name], **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
        for b in BRANCHES[name]:
            gate(model, b).fill_(0.5 + torch.rand((), generator=gen).item())
    return model.eval()


def gate(model, full_name: str) -> torch.nn.Parameter:
    path, branch = full_name.rsplit(".", 1)
    return model.get_submodule(path).gates[branch]


def image(shape=SHAPE) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(2))


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def gated_off_and_removed(model, names):
    """Outputs of ``model`` with the gates of ``names`` at 0 and of a copy with them removed."""
    removed = dance.remove_branches(copy.deepcopy(model), names)
    for n in names:
        gate(model, n).zero_()
    return model(image()), removed(image()), removed


@pytest.mark.parametrize("name,branch", [(m, b) for m, bs in BRANCHES.items() for b in bs])
def test_gate_zero_equals_structural_removal(name, branch):
    model = tiny_model(name)
    with torch.no_grad():
        full = model(image())
    gflops, n_params = dance.count_gflops(model, SHAPE), params(model)

    gated, removed_out, removed = gated_off_and_removed(model, [branch])

    assert gated.shape == (1, 5, 64, 128)
    assert (full - gated).abs().max() > 1e-3          # the branch matters...
    torch.testing.assert_close(removed_out, gated, atol=1e-5, rtol=0)  # ...and removal == gate 0
    assert params(removed) < n_params
    assert dance.count_gflops(removed, SHAPE) < gflops
    assert branch.rsplit(".", 1)[1] not in removed.get_submodule(branch.rsplit(".", 1)[0]).gates
    assert removed.dance_arch.removed == [branch]


def test_hrnet_stream_removal_deletes_its_modules():
    model = tiny_model("hrnet_w18_small")
    backbone = model.hrnet.backbone
    stream3_blocks = sum(params(m.branches[2]) for m in backbone.stage3) \
        + sum(params(m.branches[2]) for m in backbone.stage4)
    before = params(model)
    dance.remove_branches(model, ["hrnet.stream3"])
    assert backbone.transition2 is None                       # what created it
    assert all(m.branches[2] is None and m.fuse_layers[2] is None   # its blocks, its fuse row
               for m in [*backbone.stage3, *backbone.stage4])
    assert all(m.fuse_layers[i][2] is None                     # fuse paths from it
               for m in backbone.stage4 for i in (0, 1, 3))
    assert backbone.transition3.paths[2] is None               # stream 4 is made from 1 and 2
    assert model.hrnet.head.fuse[0].in_channels == 4 + 8 + 32  # its slice of the head's concat
    assert before - params(model) > stream3_blocks


def test_hrnet_two_streams_in_sequence_then_last_is_refused():
    model = tiny_model("hrnet_w18_small")
    with torch.no_grad():
        gate(model, "hrnet.stream2").zero_()
        gate(model, "hrnet.stream4").zero_()
        expected = model(image())
    slim = copy.deepcopy(model)
    dance.remove_branches(slim, ["hrnet.stream4"])
    dance.remove_branches(slim, ["hrnet.stream2"])
    with torch.no_grad():
        torch.testing.assert_close(slim(image()), expected, atol=1e-5, rtol=0)
    assert [b.name for b in dance.branches(slim)] == ["hrnet.stream3"]
    assert slim.hrnet.head.fuse[0].in_channels == 4 + 16
    with torch.no_grad():  # only the 1/4 trunk and the 1/16 stream are left, still any size
        assert slim(image((2, 3, 65, 97))).shape == (2, 5, 65, 97)

    with pytest.raises(DanceError) as err:
        dance.remove_branches(slim, ["hrnet.stream3"])
    assert "last branch" in str(err.value) and "\n" not in str(err.value)


def test_bisenet_layer4_goes_when_nothing_reads_the_1_32_features():
    model = tiny_model("bisenet_v1_r18")
    layer4 = params(model.context_path.backbone.layer4)
    before = params(model)

    dance.remove_branches(model, ["context_path.arm32"])  # global context still pools layer4
    assert hasattr(model.context_path.backbone, "layer4")
    assert not hasattr(model.context_path, "arm32") and not hasattr(model.context_path, "refine32")

    with torch.no_grad():
        gate(model, "context_path.global_context").zero_()
        expected = model(image())
    dance.remove_branches(model, ["context_path.global_context"])
    assert not hasattr(model.context_path.backbone, "layer4")
    assert before - params(model) > layer4  # layer4 (8.4M at full width) and the branch heads
    with torch.no_grad():
        torch.testing.assert_close(model(image()), expected, atol=1e-5, rtol=0)
        assert model(image((1, 3, 65, 97))).shape == (1, 5, 65, 97)
    assert model.dance_arch.removed == ["context_path.arm32", "context_path.global_context"]

    with pytest.raises(DanceError) as err:
        dance.remove_branches(model, ["context_path.arm16"])
    assert "last branch" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(BRANCHES))
def test_branch_names(name):
    model = tiny_model(name)
    assert [b.name for b in dance.branches(model)] == BRANCHES[name]
    # A gate's name becomes an attribute in the code torch.export / ONNX export generate.
    assert all(b.split(".")[-1].isidentifier() and not keyword.iskeyword(b.split(".")[-1])
               for b in BRANCHES[name])


@pytest.mark.parametrize("name", sorted(BRANCHES))
def test_unknown_branch_is_one_line_error(name):
    model = tiny_model(name)
    with pytest.raises(DanceError) as err:
        dance.remove_branches(model, [BRANCHES[name][0].rsplit(".", 1)[0] + ".stream9"])
    assert "unknown branch" in str(err.value) and "\n" not in str(err.value)
    module = model.get_submodule(BRANCHES[name][0].rsplit(".", 1)[0])
    with pytest.raises(DanceError, match="unknown branch"):
        module.remove_branches(["nope"])
    assert module.branch_names() == [b.rsplit(".", 1)[1] for b in BRANCHES[name]]


@pytest.mark.parametrize("name", sorted(BRANCHES))
@pytest.mark.parametrize("size", [(65, 97), (33, 47)])
def test_logits_at_input_size_for_odd_sizes(name, size):
    model = tiny_model(name, num_classes=3)
    with torch.no_grad():
        out = model(image((2, 3, *size)))
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(BRANCHES))
def test_every_gate_gets_a_gradient_in_training(name):
    model = tiny_model(name).train()
    model(image((2, 3, 64, 96))).square().mean().backward()
    for b in BRANCHES[name]:
        assert gate(model, b).grad is not None and gate(model, b).grad.abs() > 0


def test_bisenet_loads_a_local_resnet18_file(tmp_path):
    torch.manual_seed(3)
    resnet = torchvision.models.resnet18()
    path = tmp_path / "resnet18.safetensors"
    save_file(resnet.state_dict(), str(path))  # the classifier's fc.* is ignored
    model = dance.build_model("bisenet_v1_r18", 4, pretrained_backbone=str(path),
                              **TINY["bisenet_v1_r18"])
    backbone = model.context_path.backbone
    torch.testing.assert_close(backbone.conv1.weight, resnet.conv1.weight, atol=0, rtol=0)
    torch.testing.assert_close(backbone.layer4[1].bn2.running_var,
                               resnet.layer4[1].bn2.running_var, atol=0, rtol=0)


def test_hrnet_pretrained_backbone_is_a_local_file(tmp_path):
    source = tiny_model("hrnet_w18_small")
    path = tmp_path / "hrnet_backbone.safetensors"
    save_file(source.hrnet.backbone.state_dict(), str(path))
    model = dance.build_model("hrnet_w18_small", 7, pretrained_backbone=str(path),
                              **TINY["hrnet_w18_small"])
    for (k, v), w in zip(source.hrnet.backbone.state_dict().items(),
                         model.hrnet.backbone.state_dict().values()):
        torch.testing.assert_close(w, v, atol=0, rtol=0, msg=k)

    with pytest.raises(DanceError) as err:  # torchvision has no HRNet
        dance.build_model("hrnet_w18_small", 7, pretrained_backbone="IMAGENET1K_V1",
                          **TINY["hrnet_w18_small"])
    assert "hrnet_w18_small" in str(err.value) and "\n" not in str(err.value)
    wide = dict(TINY["hrnet_w18_small"], widths=(6, 12, 24, 48))
    with pytest.raises(DanceError, match="another architecture"):
        dance.build_model("hrnet_w18_small", 7, pretrained_backbone=str(path), **wide)
