"""Pretrained backbones: torchvision weight names or local files; offline, a missing
download fails fast with a clear error."""
import socket
import time

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import dance
from dance.errors import DanceError
from dance.network import pretrained
from dance.network.pretrained import load_backbone_weights


@pytest.fixture
def resnet18_file(tmp_path):
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def test_local_safetensors_file_loads_into_the_model_backbone(resnet18_file):
    path, state = resnet18_file
    model = dance.build_model("pspnet_r18", 3, pretrained_backbone=str(path), ppm_channels=8)
    torch.testing.assert_close(model.backbone.layer3[0].conv1.weight, state["layer3.0.conv1.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.bn1.running_var, state["bn1.running_var"])
    scratch = dance.build_model("pspnet_r18", 3, ppm_channels=8)
    assert not torch.equal(scratch.backbone.conv1.weight, state["conv1.weight"])


def test_pth_checkpoint_with_wrapper_and_ddp_prefix(tmp_path, resnet18_file):
    _, state = resnet18_file
    path = tmp_path / "r18.pth"
    # A training checkpoint saved under DDP, without the classifier head.
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()
                               if not k.startswith("fc.")}}, path)
    net = torchvision.models.resnet18()
    load_backbone_weights(net, str(path), "resnet18")
    torch.testing.assert_close(net.layer4[1].bn2.weight, state["layer4.1.bn2.weight"])


def test_weights_of_another_architecture_name_the_file_and_keys(tmp_path):
    path = tmp_path / "mbv2.safetensors"
    save_file(torchvision.models.mobilenet_v2(width_mult=0.25).state_dict(), str(path))
    with pytest.raises(DanceError) as e:
        load_backbone_weights(torchvision.models.resnet18(), str(path), "resnet18")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "another architecture" in msg
    assert "missing: conv1.weight" in msg and "unexpected: features.0.0.weight" in msg

    # Same keys, other shapes: a quarter-width MobileNetV2 file for a half-width model.
    wide = torchvision.models.mobilenet_v2(width_mult=0.5)
    with pytest.raises(DanceError, match=r"shape mismatch: features.0.0.weight \(8, 3, 3, 3\) "
                                         r"vs \(16, 3, 3, 3\)"):
        load_backbone_weights(wide, str(tmp_path / "mbv2.safetensors"), "mobilenet_v2")


def test_bad_names_and_missing_files_are_clear_errors(tmp_path):
    net = torchvision.models.resnet18()
    with pytest.raises(DanceError, match="unknown pretrained backbone 'IMAGENET9K'.*IMAGENET1K_V1"):
        load_backbone_weights(net, "IMAGENET9K", "resnet18")
    with pytest.raises(DanceError, match="for another architecture than resnet18"):
        load_backbone_weights(net, "ResNet50_Weights.IMAGENET1K_V2", "resnet18")
    with pytest.raises(DanceError, match="not found"):
        load_backbone_weights(net, str(tmp_path / "nope.safetensors"), "resnet18")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DanceError, match="junk.pth: cannot read pretrained weights"):
        load_backbone_weights(net, str(junk), "resnet18")


def _offline(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # empty cache


def test_offline_missing_download_fails_fast_with_where_to_put_it(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)

    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    start = time.monotonic()
    with pytest.raises(DanceError) as e:
        dance.build_model("pspnet_r18", 3, pretrained_backbone="DEFAULT")
    assert time.monotonic() - start < 15
    msg = str(e.value)
    assert "https://download.pytorch.org/models/resnet18-" in msg
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-") in msg
    assert "local .safetensors/.pth file" in msg and "\n" not in msg


def test_a_hanging_network_cannot_hang_us(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    monkeypatch.setattr(pretrained, "CONNECT_TIMEOUT_S", 1.0)
    # A DNS lookup that never returns ignores socket timeouts; the probe must give up anyway.
    def hang(*args, **kwargs):
        time.sleep(60)
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    with pytest.raises(DanceError, match="cannot be reached"):
        load_backbone_weights(torchvision.models.resnet18(), "IMAGENET1K_V1", "resnet18")
    assert time.monotonic() - start < 5


def test_dance_offline_skips_the_network_entirely(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    monkeypatch.setenv("DANCE_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed"))
    with pytest.raises(DanceError, match="DANCE_OFFLINE is set"):
        load_backbone_weights(torchvision.models.mobilenet_v2(), "DEFAULT", "mobilenet_v2")
