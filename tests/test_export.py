"""Export: ONNX and TorchScript files of a slimmed model run without dance, at any batch
size, height and width, and match PyTorch."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import dance
from dance.errors import DanceError

# Runs in a fresh interpreter where ``import dance`` fails: the files must stand alone.
RUN_WITHOUT_DANCE = """
import sys
sys.modules["dance"] = None
import numpy as np, onnxruntime, torch
onnx_path, ts_path, out = sys.argv[1:4]
session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
scripted = torch.jit.load(ts_path)
results = {}
for i, shape in enumerate([(1, 3, 64, 96), (2, 3, 81, 113)]):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(i))
    np.save(f"{out}/x{i}.npy", x.numpy())
    np.save(f"{out}/onnx{i}.npy", session.run(["logits"], {"image": x.numpy()})[0])
    with torch.no_grad():
        np.save(f"{out}/ts{i}.npy", scripted(x).numpy())
"""


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream
def test_slimmed_model_exports_run_standalone_at_two_sizes(tmp_path):
    torch.manual_seed(0)
    # PSPNet: its 2x2, 3x3 and 6x6 pooling bins are what ONNX cannot express at dynamic sizes.
    model = dance.build_model("pspnet_r18", 4, ppm_channels=16, bin_channels=8)
    dance.remove_branches(model, ["ppm.bin1"])
    model.train()
    onnx_path = dance.export(model, tmp_path / "m.onnx", format="onnx", input_shape=(1, 3, 64, 96))
    ts_path = dance.export(model, tmp_path / "m.pt", format="torchscript",
                           input_shape=(1, 3, 64, 96))
    assert model.training  # the caller's model keeps its mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt"]  # no temp files left

    subprocess.run([sys.executable, "-c", RUN_WITHOUT_DANCE, str(onnx_path), str(ts_path),
                    str(tmp_path)], check=True, timeout=120)
    model.eval()
    for i, shape in enumerate([(1, 4, 64, 96), (2, 4, 81, 113)]):
        x = torch.from_numpy(np.load(tmp_path / f"x{i}.npy"))
        with torch.no_grad():
            expected = model(x).numpy()
        assert expected.shape == shape
        np.testing.assert_allclose(np.load(tmp_path / f"onnx{i}.npy"), expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.load(tmp_path / f"ts{i}.npy"), expected, atol=1e-4, rtol=0)
    extra = {"dance.json": ""}
    torch.jit.load(str(ts_path), _extra_files=extra)
    meta = json.loads(extra["dance.json"])
    assert meta["dance.model"] == "pspnet_r18" and "dance.classes" not in meta  # none given


def test_unknown_format_is_a_clear_error(tmp_path):
    model = torch.nn.Conv2d(3, 2, 1)
    with pytest.raises(DanceError, match="unknown export format 'tflite'"):
        dance.export(model, tmp_path / "m.tflite", format="tflite")
    assert not any(tmp_path.iterdir())
