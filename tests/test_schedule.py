"""Learning-rate schedules and optimizers of the trainer; AdamW state survives a checkpoint."""
import math

import pytest
import torch

from dance.engine import checkpoint as ckpt
from dance.engine.config import config_from_dict
from dance.engine.train import make_optimizer, scheduled_lr
from dance.network.registry import build_model


def cfg(**train):
    return config_from_dict({"train": {"lr": 0.1, **train}})


def test_poly_is_the_default_and_every_schedule_ends_at_zero():
    c = cfg()
    assert scheduled_lr(c, 0.0) == pytest.approx(0.1)
    assert scheduled_lr(c, 0.5) == pytest.approx(0.1 * 0.5 ** 0.9)
    for name in ("poly", "cosine", "linear"):
        assert scheduled_lr(cfg(lr_schedule=name), 1.0) == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr(cfg(lr_schedule="cosine"), 0.5) == pytest.approx(0.05)
    assert scheduled_lr(cfg(lr_schedule="linear"), 0.25) == pytest.approx(0.075)


def test_warmup_rises_linearly_then_the_decay_spans_the_rest():
    c = cfg(lr_schedule="linear", warmup_fraction=0.2)
    assert scheduled_lr(c, 0.0) < 0.001
    assert scheduled_lr(c, 0.1) == pytest.approx(0.1 * 0.101 / 0.2)
    assert scheduled_lr(c, 0.2) == pytest.approx(0.1)
    assert scheduled_lr(c, 0.6) == pytest.approx(0.05)
    with pytest.raises(Exception, match="warmup_fraction"):
        cfg(warmup_fraction=0.5)


def test_adamw_without_decay_on_gates_and_its_state_round_trips(tmp_path):
    c = cfg(optimizer="adamw", weight_decay=0.05)
    model = build_model("deeplabv3plus_mbv2", 3, width_mult=0.35, aspp_channels=16)
    opt = make_optimizer(model, c)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    model(torch.rand(2, 3, 32, 64)).mean().backward()
    opt.step()
    ckpt.save_checkpoint(tmp_path / "checkpoint", model, {}, opt)
    tensors, state, folder = ckpt.read_checkpoint(tmp_path / "checkpoint")
    fresh = build_model("deeplabv3plus_mbv2", 3, width_mult=0.35, aspp_channels=16)
    ckpt.load_weights(fresh, tensors, folder)
    opt2 = make_optimizer(fresh, c)
    ckpt.load_optimizer_state(opt2, fresh, tensors, state["optimizer"])
    p, q = next(model.parameters()), next(fresh.parameters())
    assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
    assert opt2.state[q]["step"].device.type == "cpu" and float(opt2.state[q]["step"]) == 1
    assert math.isclose(opt2.param_groups[0]["lr"], 0.1)


def test_adamw_is_fused_only_where_the_fused_kernel_steps(monkeypatch):
    """Some torch versions (2.3 on the CPU) accept AdamW(fused=True) and fail at its first step:
    the optimizer is then the unfused one, and it steps."""
    from dance.engine import train as engine
    real = torch.optim.AdamW

    class FusedFailsAtStep(real):
        def step(self, closure=None):
            if self.defaults.get("fused"):
                raise NotImplementedError("Could not run 'aten::_fused_adamw_' with arguments "
                                          "from the 'CPU' backend")
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", FusedFailsAtStep)
    monkeypatch.setattr(engine, "_FUSED_ADAMW", {})
    model = build_model("deeplabv3plus_mbv2", 3, width_mult=0.35, aspp_channels=16)
    opt = make_optimizer(model, cfg(optimizer="adamw", weight_decay=0.05))
    assert not opt.defaults.get("fused")
    model(torch.rand(2, 3, 32, 64)).mean().backward()
    before = next(model.parameters()).detach().clone()
    opt.step()
    assert not torch.equal(before, next(model.parameters()))
    assert engine._FUSED_ADAMW == {"cpu": False}
    monkeypatch.setattr(torch.optim, "AdamW", real)  # this torch: fused where its kernel steps
    monkeypatch.setattr(engine, "_FUSED_ADAMW", {})
    opt = make_optimizer(model, cfg(optimizer="adamw", weight_decay=0.05))
    assert bool(opt.defaults.get("fused")) == engine._FUSED_ADAMW["cpu"]
