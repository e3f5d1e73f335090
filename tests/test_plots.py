"""The report's figures: what they show, read back from the matplotlib figure before saving."""
import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from dance.data.datasets import class_colors, layout_class_names
from dance.engine.checkpoint import save_checkpoint
from dance.engine.config import RunConfig
from dance.network.registry import build_model
from dance.report import plots
from tiny import tiny_synth


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions hand to _save, still open."""
    made = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: made.append(fig) or str(path))
    return made


def test_gate_plot_marks_removals_and_keeps_the_legend_off_the_lines(figures, tmp_path):
    hist = [{"epoch": e, "gates": {"aspp.rate6": 1.0 - 0.1 * e, "aspp.rate12": 0.9}}
            for e in (1, 2)] + [{"epoch": 3, "gates": {"aspp.rate6": 0.7}},
                                {"epoch": 4, "gates": {"aspp.rate6": 0.65}}]
    events = [{"progress": 0.5, "removed": ["aspp.rate12"], "widths": {}, "channels": []}]
    plots.plot_gates({"history": hist, "prune_events": events}, tmp_path / "g.png", "dance")
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["aspp.rate12 (removed at 50%)", "aspp.rate6"]
    assert ax.get_legend().get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1
    assert not [t for t in ax.texts if "removed" in t.get_text()]  # no rotated text over lines


def test_cost_plot_has_seed_error_bars(figures, tmp_path):
    report = {"runs": {"baseline": {"miou": 40.0, "miou_std": 1.5},
                       "dance": {"miou": 39.0, "miou_std": 0.8}},
              "ratios": {"baseline": {"train_gflops": 1.0, "infer_gflops": 1.0},
                         "dance": {"train_gflops": 0.5, "infer_gflops": 0.5}}}
    plots.plot_cost_vs_miou(report, tmp_path / "c.png")
    bars = [c for c in figures[0].axes[0].containers if isinstance(c, ErrorbarContainer)]
    spans = sorted(float(np.ptp(seg[:, 1])) for c in bars for seg in c.lines[2][0].get_segments())
    assert spans == pytest.approx([1.6, 3.0])  # 2 std each: the error bars are the seed spread


def test_predictions_use_the_dataset_palette_with_a_legend(figures, tmp_path_factory, tmp_path):
    root = tiny_synth(tmp_path_factory, train=2, val=3, seed=4)
    cfg = RunConfig.model_validate({"dataset": {"name": "synth", "root": str(root)}})
    model = build_model("deeplabv3plus_mbv2", 19, None, width_mult=0.35, aspp_channels=16)
    save_checkpoint(tmp_path / "run" / "checkpoint", model, {"config": cfg.to_dict()})
    report = {"run_dirs": {"baseline": [str(tmp_path / "run")]}}
    plots.plot_predictions(report, cfg, tmp_path / "p.png")
    names = [t.get_text() for t in figures[0].legends[0].get_texts()]
    assert "road" in names and names[-1] == "ignored"
    gt = figures[0].axes[1].get_images()[0].get_array()
    road = tuple(class_colors(layout_class_names("synth"))[0])
    assert road == (128, 64, 128)  # Cityscapes' own road colour
    assert (np.asarray(gt).reshape(-1, 3) == road).all(1).any()
