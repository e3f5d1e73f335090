"""The report's plots (docs/cli.md#dance-compare): complexity histogram with the plan, scale
distribution, gate trajectories with removal points, training cost vs mIoU, mIoU vs inference
FLOPs, and baseline vs DANCE predictions. Each plot is skipped (not faked) when the runs it
needs are not in the compare.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dance.data.labels import IGNORE_INDEX  # noqa: E402
from dance.engine.config import RunConfig  # noqa: E402
from dance.engine.train import stretched  # noqa: E402
from dance.fileio import atomic_write_bytes  # noqa: E402

_GUIDED = ("dance", "data", "shuffled")  # runs whose plan is complexity-derived


def _plan_run(report: dict) -> str | None:
    return next((k for k in _GUIDED if k in report["run_dirs"]), None)


def _save(fig, path: Path) -> str:
    """Write the figure atomically (a killed compare never leaves a half-written plot)."""
    import io
    fig.tight_layout()
    buf = io.BytesIO()
    # "tight": legends placed beside the axes or below the panels are kept in the picture
    fig.savefig(buf, dpi=110, format=Path(path).suffix.lstrip(".") or "png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


def plot_complexity(plan_json: dict, path: Path) -> str:
    per = plan_json["per_image"]
    score = np.array([p["score"] for p in per])
    order = np.argsort(score)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(score, bins=30, color="#9bb7d4", edgecolor="white", label="images")
    ax.set_xlabel(f"spatial complexity ({plan_json.get('indicator', 'score')})")
    ax.set_ylabel("images")
    ax2 = ax.twinx()
    ax2.plot(score[order], np.array([p["scale"] for p in per])[order], color="#d1495b",
             lw=2, label="scale")
    ax2.plot(score[order], np.array([p["keep_prob"] for p in per])[order], color="#00798c",
             lw=2, ls="--", label="keep probability")
    ax2.plot(score[order], np.array([p["weight"] for p in per])[order], color="#edae49",
             lw=1.5, ls=":", label="loss weight")
    ax2.set_ylabel("policy")
    ax2.set_ylim(0, max(1.6, max(p["weight"] for p in per) * 1.1))
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax.set_title(f"Complexity and the data plan (budget {plan_json['budget']}, "
                 f"predicted cost {plan_json['predicted_cost']:.3f})")
    return _save(fig, path)


def plot_scales(plan_json: dict, epochs: int, path: Path) -> str:
    from dance.data.plan import DataSlimmingPlan
    p = DataSlimmingPlan.from_json(plan_json)
    policies = [p.epoch_policy(e, epochs) for e in range(epochs)]
    # bin by the scales actually used: controls and boundary images may sit between set values
    scale_set = sorted({round(float(s), 3) for pol in policies for s in pol.scale})
    counts = np.zeros((epochs, len(scale_set)))
    for e, pol in enumerate(policies):
        rounded = np.round(pol.scale, 3)
        for j, s in enumerate(scale_set):
            counts[e, j] = float(pol.keep_prob[rounded == s].sum())
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(epochs)
    cmap = plt.get_cmap("viridis")
    for j, s in enumerate(scale_set):
        ax.bar(np.arange(1, epochs + 1), counts[:, j], bottom=bottom, label=f"{s:g}×",
               color=cmap(j / max(len(scale_set) - 1, 1)))
        bottom += counts[:, j]
    ax.set_xlabel("epoch")
    ax.set_ylabel("expected images trained")
    ax.set_title("Scale distribution per epoch (expected, after drops)")
    ax.legend(title="scale", fontsize=8)
    return _save(fig, path)


def plot_gates(metrics: dict, path: Path, run: str) -> str:
    """Branch gates over training, and (with channel slimming) every channel group's width as a
    fraction of its original, at each pruning point. A removed branch's line ends in a cross at
    its pruning point, and its legend entry says when; the legend sits beside the axes, never
    on the lines."""
    hist = metrics.get("history", [])
    names = sorted({n for h in hist for n in h.get("gates", {})})
    events = metrics.get("prune_events", [])
    epochs = len(hist) or 1
    removed_at = {n: e["progress"] for e in events for n in e.get("removed", [])}
    widths = [e for e in events if e.get("widths")]
    if widths:
        fig, (ax, cax) = plt.subplots(1, 2, figsize=(15, 4.5))
        _plot_widths(cax, events, epochs, run)
    else:
        fig, ax = plt.subplots(figsize=(8.5, 4.5))
    cmap = plt.get_cmap("tab20", max(len(names), 2))
    for i, n in enumerate(names):
        xs = [0] + [h["epoch"] for h in hist if n in h["gates"]]
        ys = [1.0] + [h["gates"][n] for h in hist if n in h["gates"]]
        label = n
        if n in removed_at:  # the line ends where the branch went
            end = removed_at[n] * epochs
            kept = [k for k, x in enumerate(xs) if x <= end]
            xs, ys = [xs[k] for k in kept] + [end], [ys[k] for k in kept] + [ys[kept[-1]]]
            label = f"{n} (removed at {removed_at[n]:.0%})"
        line, = ax.plot(xs, ys, marker="o", ms=3, color=cmap(i), label=label)
        if n in removed_at:
            ax.plot(xs[-1], ys[-1], marker="X", ms=9, color=line.get_color(), ls="none")
    for ev in events:
        ax.axvline(ev["progress"] * epochs, color="grey", ls="--", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("gate value")
    ax.set_xlim(0, epochs)
    ax.set_title(f"Branch gates ({run}); dashed: pruning points, ×: removed")
    if names:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, path)


def _plot_widths(ax, events: list[dict], epochs: int, run: str) -> None:
    """Each group's width over the pruning points, as a fraction of its width before the first."""
    original: dict[str, int] = {}
    for e in events:
        for c in e.get("channels", []):
            original.setdefault(c["layer"], c["width_before"])
        for layer, w in e.get("widths", {}).items():
            original.setdefault(layer, w)
    xs = [0.0] + [e["progress"] * epochs for e in events]
    cut = {layer: 1.0 - min(e.get("widths", {}).get(layer, 0) for e in events) / w
           for layer, w in original.items()}
    top = sorted(cut, key=cut.get, reverse=True)[:6]
    for layer, w in original.items():
        ys = [1.0] + [e.get("widths", {}).get(layer, 0) / w for e in events]
        ax.plot(xs, ys, marker="o", ms=2, lw=1.5 if layer in top else 0.6,
                alpha=1.0 if layer in top else 0.4, label=layer if layer in top else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("channels kept (fraction of original)")
    ax.set_xlim(0, epochs)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Channel groups ({run}); most slimmed named")
    ax.legend(fontsize=6, loc="lower left")  # widths only fall: the corner stays clear


def plot_inference_pareto(report: dict, path: Path) -> str:
    """mIoU vs inference GFLOPs of every deployed model (DANCE's, the thin one, the plain one at
    a lower input resolution...), with the Pareto front: the models nothing beats on both."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = []
    for kind, r in report["runs"].items():
        x = report["ratios"][kind]["infer_gflops"]
        points.append((x, r["miou"]))
        ax.errorbar(x, r["miou"], yerr=r.get("miou_std", 0) or None, fmt="o", capsize=3)
        ax.annotate(kind, (x, r["miou"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        base = report["runs"]["baseline"]["gflops"]
        curve = [c for c in r.get("miou_flops_curve", []) if c["name"] == "adaptive"]
        for c in curve:
            points.append((c["mean_gflops"] / base, c["miou"]))
            ax.plot(c["mean_gflops"] / base, c["miou"], marker="*", ms=12, ls="none")
            ax.annotate(f"{kind}, adaptive input", (c["mean_gflops"] / base, c["miou"]),
                        textcoords="offset points", xytext=(6, -10), fontsize=8)
    front, best = [], -float("inf")
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    ax.plot(*zip(*front), ls="--", color="grey", lw=1, label="Pareto front")
    ax.set_xlabel("inference GFLOPs / plain model")
    ax.set_ylabel("mIoU (points)")
    ax.set_title("Deployed models: accuracy vs inference cost")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_cost_vs_miou(report: dict, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for kind, r in report["runs"].items():
        x = report["ratios"][kind]["train_gflops"]
        ax.errorbar(x, r["miou"], yerr=r.get("miou_std", 0) or None, fmt="o", capsize=3)
        ax.annotate(f"{kind}\n(infer ×{report['ratios'][kind]['infer_gflops']:.2f})", (x, r["miou"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("training GFLOPs / baseline")
    ax.set_ylabel("mIoU (points)")
    ax.set_title("Training cost vs accuracy")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_miou_vs_flops(curve: list[dict], path: Path, run: str) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    fixed = [c for c in curve if c["name"] != "adaptive"]
    ax.plot([c["mean_gflops"] for c in fixed], [c["miou"] for c in fixed], marker="o",
            label="fixed input scale")
    for c in fixed:
        ax.annotate(c["name"], (c["mean_gflops"], c["miou"]), textcoords="offset points",
                    xytext=(5, -10), fontsize=8)
    for c in curve:
        if c["name"] == "adaptive":
            ax.plot(c["mean_gflops"], c["miou"], marker="*", ms=14, ls="none",
                    label="complexity-guided scale")
    ax.set_xlabel("inference GFLOPs per image (mean)")
    ax.set_ylabel("mIoU (points)")
    ax.set_title(f"Inference resolution: mIoU vs FLOPs ({run})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_predictions(report: dict, cfg: RunConfig, path: Path, n: int = 3) -> str:
    """Validation images, their ground truth and each run's prediction, in the dataset's palette
    (Cityscapes' own colours where the classes are Cityscapes'), with a legend of the classes
    that appear."""
    import torch
    from matplotlib.patches import Patch

    from dance.data.datasets import class_colors, open_dataset
    from dance.engine.checkpoint import load_model
    ds = open_dataset(cfg.dataset.name, cfg.dataset.root, cfg.dataset.val_split)
    palette = class_colors(ds.class_names)
    runs = [k for k in ("baseline", "dance") if k in report["run_dirs"]]
    models = {k: load_model(report["run_dirs"][k][0]) for k in runs}
    idx = np.linspace(0, len(ds) - 1, n).round().astype(int)
    fig, axes = plt.subplots(n, 2 + len(runs), figsize=(3.2 * (2 + len(runs)), 1.9 * n))
    axes = np.atleast_2d(axes)
    seen: set[int] = set()
    for row, i in enumerate(idx):
        image, mask = ds.load(int(i))
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
        panels = [("image", image), ("ground truth", mask)]
        for k, m in models.items():
            with torch.no_grad():
                pred = m(x).argmax(1)[0].numpy().astype(np.uint8)
            pred[mask == IGNORE_INDEX] = IGNORE_INDEX
            panels.append((k, pred))
        for col, (title, im) in enumerate(panels):
            if col > 0:
                seen.update(int(c) for c in np.unique(im) if c < ds.num_classes)
                im = _colorize(im, palette)
            ax = axes[row, col]
            ax.imshow(im)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    handles = [Patch(color=palette[c] / 255, label=ds.class_names[c]) for c in sorted(seen)]
    handles.append(Patch(color="black", label="ignored"))
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(handles), 7), fontsize=7, frameon=False)
    return _save(fig, path)


def _colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Train ids as RGB in ``palette`` (C x 3); ignored and out-of-range pixels black."""
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    valid = labels < len(palette)
    out[valid] = palette[labels[valid]]
    return out


def make_plots(report: dict, cfg: RunConfig, out_dir: Path) -> list[str]:
    out_dir = Path(out_dir)
    made = []
    plan_run = _plan_run(report)
    if plan_run:
        plan_file = Path(report["run_dirs"][plan_run][0]) / "plan.json"
        plan_json = json.loads(plan_file.read_text())
        plan_json.setdefault("indicator", cfg.data_slimming.indicator)
        made.append(plot_complexity(plan_json, out_dir / "complexity_plan.png"))
        from dance.report.compare import run_config
        # the epochs that run's plan spans: stretched for dance, the recipe's for the controls
        epochs = stretched(run_config(cfg, plan_run, cfg.train.seed))[0].train.epochs
        made.append(plot_scales(plan_json, epochs, out_dir / "scale_distribution.png"))
    gated = next((k for k in ("dance", "network") if k in report["runs"]), None)
    if gated:
        made.append(plot_gates(report["runs"][gated], out_dir / "gates.png", gated))
    made.append(plot_cost_vs_miou(report, out_dir / "cost_vs_miou.png"))
    curve_run = next((k for k in ("dance", "data") if k in report["runs"]), None)
    from dance.data.complexity import IMAGE_INDICATORS
    if curve_run and plan_run and cfg.data_slimming.indicator in IMAGE_INDICATORS:
        from dance.data.datasets import open_dataset
        from dance.engine.checkpoint import load_model
        from dance.engine.evaluate import miou_flops_curve
        ds = open_dataset(cfg.dataset.name, cfg.dataset.root, cfg.dataset.val_split)
        scores = np.array([p["score"] for p in plan_json["per_image"]])
        model = load_model(report["run_dirs"][curve_run][0])
        curve = miou_flops_curve(model, ds, scores, device="cpu",
                                 indicator=cfg.data_slimming.indicator)
        report["runs"][curve_run]["miou_flops_curve"] = curve
        made.append(plot_miou_vs_flops(curve, out_dir / "miou_vs_flops.png", curve_run))
    if any(k in report["runs"] for k in ("dance", "network", "thin", "lowres")):
        made.append(plot_inference_pareto(report, out_dir / "inference_pareto.png"))
    if "baseline" in report["run_dirs"]:
        made.append(plot_predictions(report, cfg, out_dir / "predictions.png"))
    return made
