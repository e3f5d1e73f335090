"""`dance compare`: DANCE side by side with what users would otherwise pick
(docs/method.md#run-kinds).

Every run shares the config's data, model, epochs and seed; only the data plan, the length of
the schedule and the network slimming differ:

| run         | data plan                                         | network slimming |
|-------------|---------------------------------------------------|------------------|
| baseline    | plain (every image, full scale)                   | off              |
| short       | plain, for budget x the baseline's steps; its LR  | off              |
|             | schedule spans the shorter run                    |                  |
| uniform     | every image at sqrt(budget)                       | off              |
| progressive | one scale per epoch, growing, equal total FLOPs   | off              |
| shuffled    | DANCE's plan permuted across images (no guidance) | off              |
| data        | DANCE's plan                                      | off              |
| network     | plain                                             | on               |
| dance       | DANCE's plan                                      | on               |
| thin        | plain, the head's channels scaled so the model's  | off              |
|             | inference FLOPs are network_budget x the plain's  |                  |

With a ``network_budget`` the report adds ``lowres``: each baseline model evaluated at the input
resolution whose inference FLOPs match DANCE's deployed model (no training of its own).
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dance.engine.config import RunConfig, load_config
from dance.engine.run_folder import (
    dataset_fingerprint,
    describe_diff,
    fingerprint_diff,
    locked,
    run_fingerprint,
)
from dance.errors import DanceError
from dance.fileio import atomic_write_json, atomic_write_text, jsonable

RUN_KINDS = ("baseline", "short", "uniform", "progressive", "shuffled", "data", "network", "dance",
             "thin")
# the alternatives for a smaller deployed model, compared at matched inference FLOPs
INFERENCE_ALTERNATIVES = ("thin", "lowres")
RATIO_FIELDS = {"train_gflops": "train_gflops_total", "infer_gflops": "gflops",
                "train_seconds": "train_seconds", "energy_joules": "energy_joules"}
SUMMARY_FIELDS = ("miou", "pixel_acc", "train_gflops_total", "train_seconds", "energy_joules",
                  "gflops", "params", "latency_ms", "peak_memory_mb", "planned_cost",
                  "realised_cost", "images_per_second")


def run_config(base: RunConfig, kind: str, seed: int, thin: dict | None = None) -> RunConfig:
    """The config of one compared run; ``thin`` is the thin run's model options
    (``thin_model``)."""
    if kind not in RUN_KINDS:
        raise DanceError(f"unknown run kind {kind!r}; choose from {', '.join(RUN_KINDS)}")
    cfg = base.model_copy(deep=True)
    if kind == "thin":
        if thin is None:
            raise ValueError("the thin run needs its model options (thin_model)")
        cfg.model.options = dict(thin)
    cfg.train.seed = seed
    data_on = kind in ("uniform", "progressive", "shuffled", "data", "dance")
    cfg.data_slimming.enabled = data_on
    if data_on:
        cfg.data_slimming.policy = kind if kind in ("uniform", "progressive", "shuffled") \
            else "dance"
    cfg.network_slimming.enabled = kind in ("network", "dance")
    if kind != "dance":  # the controls train the recipe's epochs: stretched, they measured
        cfg.data_slimming.stretch = 1.0  # worse (docs/method.md#stretch)
    if kind == "short":  # training for fewer steps: the first thing a user would try
        cfg.train.steps_fraction = cfg.data_slimming.budget
    return cfg


def thin_model(cfg: RunConfig) -> dict:
    """The thin run's model options: the head's channels scaled so the model's inference FLOPs
    at the training crop are ``network_budget`` x the plain model's."""
    from dance.data.datasets import open_dataset
    from dance.network.registry import thin_options
    budget = cfg.network_slimming.network_budget
    if budget is None:
        raise DanceError("the thin run matches network_slimming.network_budget, which is not set "
                         "(e.g. network_slimming.network_budget=0.5)")
    ds = open_dataset(cfg.dataset.name, cfg.dataset.root, cfg.dataset.train_split)
    return thin_options(cfg.model.name, ds.num_classes, cfg.model.options, budget,
                        (1, 3, *cfg.train.crop))


def lowres_runs(cfg: RunConfig, baseline_dirs: list[str], fraction: float) -> list[dict]:
    """Each baseline model evaluated at the input scale whose inference FLOPs are ``fraction``
    of its full-resolution ones: the metrics of a plain model deployed at a lower resolution."""
    from dance.data.datasets import open_dataset
    from dance.data.io import image_size
    from dance.engine.checkpoint import load_model
    from dance.engine.evaluate import FixedScale, evaluate, measure_inference
    from dance.network.flops import closest_argument, count_gflops
    ds = open_dataset(cfg.dataset.name, cfg.dataset.root, cfg.dataset.val_split)
    h, w = image_size(ds.samples[0].image)
    out = []
    for folder in baseline_dirs:
        model = load_model(folder)
        full = count_gflops(model, (1, 3, h, w))

        def size(s: float) -> tuple[int, int]:
            return max(1, round(h * s)), max(1, round(w * s))
        scale = closest_argument(lambda s, m=model: count_gflops(m, (1, 3, *size(s))),
                                 fraction * full, 0.05, 1.0)
        res = evaluate(model, ds, resolution=FixedScale(scale), progress=False)
        inf = measure_inference(model, size(scale))
        m = json.loads((Path(folder) / "metrics.json").read_text())
        m.update(miou=res["miou"], per_class_iou=res["per_class_iou"], pixel_acc=res["pixel_acc"],
                 gflops=res["mean_gflops"], latency_ms=inf["latency_ms"],
                 peak_memory_mb=inf["peak_memory_mb"], input_scale=scale,
                 input_size=list(size(scale)), prune_events=[], history=[])
        out.append(m)
    return out


def parse_runs(text: str) -> list[str]:
    runs = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUN_KINDS]
    if bad or not runs:
        raise DanceError(f"--runs: unknown run kind(s) {bad or text!r}; "
                         f"choose from {','.join(RUN_KINDS)}")
    if "baseline" not in runs:
        runs.insert(0, "baseline")  # every ratio is relative to the plain run
    return list(dict.fromkeys(runs))


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if v is not None], dtype=np.float64)
    if len(arr) == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def aggregate(per_seed: dict[str, list[dict]]) -> dict:
    """Mean (and std over seeds) of every run's metrics; ratios to the baseline (docs/cli.md#report-json)."""
    runs = {}
    for kind, ms in per_seed.items():
        agg = dict(ms[0])  # non-numeric fields (per-class IoU, history...) of the first seed
        for f in SUMMARY_FIELDS:
            if f in ms[0]:
                mean, std = _mean_std([m.get(f) for m in ms])
                agg[f] = mean
                agg[f"{f}_std"] = std
        agg["seeds"] = len(ms)
        agg["per_seed_miou"] = [m["miou"] for m in ms]
        runs[kind] = agg
    base = runs["baseline"]
    ratios = {}
    for kind, r in runs.items():
        ratios[kind] = {name: (r[f] / base[f] if base.get(f) else float("nan"))
                        for name, f in RATIO_FIELDS.items()}
        ratios[kind]["miou_delta"] = r["miou"] - base["miou"]
        noise = max(r.get("miou_std", 0.0), base.get("miou_std", 0.0))
        ratios[kind]["within_noise"] = bool(r["seeds"] > 1 and kind != "baseline"
                                            and abs(ratios[kind]["miou_delta"]) < noise)
    return {"runs": runs, "ratios": ratios}


def compare(cfg: RunConfig, runs: list[str], out_dir: str | Path, seeds: int = 1,
            progress: bool = True, plots: bool = True, jobs: int = 1) -> dict:
    """Train every run kind with the same data, model, epochs and seeds; write the report.

    ``jobs`` runs train at a time, each in its own process (see ``train_all``).

    A finished run in ``out_dir`` is reused only when its fingerprint matches the run asked
    for; otherwise it is retrained (the old folder kept as ``<run>.previous``). What happened
    to each run is printed and recorded in report.json's ``run_status``.
    """
    out_dir = Path(out_dir)
    with locked(out_dir):
        score_cache = out_dir / "scores.cache.json"  # scored once, shared by every run
        data_fp = dataset_fingerprint_of(cfg)  # one pass over the files, for every run
        tasks = [(kind, cfg.train.seed + s) for s in range(seeds) for kind in runs]
        thin = thin_model(cfg) if "thin" in runs else None
        jobs_ = [RunJob(run_config(cfg, kind, seed, thin),
                        out_dir / "runs" / (kind if seeds == 1 else f"{kind}-seed{seed}"),
                        f"{kind} (seed {seed})") for kind, seed in tasks]
        results = train_all(jobs_, score_cache, data_fp, progress, jobs)
        per_seed: dict[str, list[dict]] = {k: [] for k in runs}
        run_dirs: dict[str, list[str]] = {k: [] for k in runs}
        status: dict[str, list[str]] = {k: [] for k in runs}
        for (kind, _), job, (m, what) in zip(tasks, jobs_, results):
            per_seed[kind].append(m)
            run_dirs[kind].append(str(job.folder))
            status[kind].append(what)
        slimmed = next((k for k in ("dance", "network") if k in per_seed), None)
        if cfg.network_slimming.network_budget is not None and slimmed:
            fraction = (np.mean([m["gflops"] for m in per_seed[slimmed]])
                        / np.mean([m["gflops"] for m in per_seed["baseline"]]))
            per_seed["lowres"] = lowres_runs(cfg, run_dirs["baseline"], float(fraction))
            run_dirs["lowres"], status["lowres"] = run_dirs["baseline"], ["evaluated"] * seeds
        report = aggregate(per_seed)
        report.update(config=cfg.to_dict(), seeds=seeds, run_dirs=run_dirs, run_status=status,
                      plots=[])
        if plots:
            from dance.report.plots import make_plots
            report["plots"] = make_plots(report, cfg, out_dir)
        atomic_write_text(out_dir / "report.md", render_markdown(report))
        atomic_write_json(out_dir / "report.json", jsonable(report))  # last: the report is done
    return report


@dataclass
class RunJob:
    cfg: RunConfig
    folder: Path
    label: str


def train_all(run_jobs: list[RunJob], score_cache: Path, data_fp: dict, progress: bool,
              jobs: int = 1) -> list[tuple[dict, str]]:
    """``reuse_or_train`` for every job, in order; ``jobs`` > 1 trains that many at a time.

    Parallel runs each get their own spawned process and an equal share of the usable cores as
    CPU threads (unless ``train.threads`` is set), and no progress bars. The complexity scores
    are computed once, here, before any run starts, so no two runs write the score cache.
    """
    if jobs < 1:
        raise DanceError(f"--jobs must be at least 1, got {jobs}")
    jobs = min(jobs, len(run_jobs))
    if jobs <= 1:
        return [reuse_or_train(j.cfg, j.folder, score_cache, progress, j.label, data_fp)
                for j in run_jobs]
    import multiprocessing

    from dance.parallel import process_pool, usable_cores
    _score_once([j.cfg for j in run_jobs], score_cache, progress)
    share = max(1, usable_cores() // jobs)
    for j in run_jobs:
        if j.cfg.train.threads is None:
            j.cfg.train.threads = share
    print(f"[compare] training {len(run_jobs)} runs, {jobs} at a time "
          f"({share} CPU thread(s) each)", file=sys.stderr)
    with process_pool(jobs, "training the runs",
                      mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {id(j): pool.submit(reuse_or_train, j.cfg, j.folder, score_cache, False,
                                      j.label, data_fp)
                   for j in sorted(run_jobs, key=_expected_cost, reverse=True)}  # longest first
        return [futures[id(j)].result() for j in run_jobs]


def _expected_cost(job: RunJob) -> float:
    """Roughly how long a run takes, relative to others of the same recipe: its epochs times
    the share of the data it trains, which for a joint budget is the data plan's (DANCE trains
    more pixels than ``budget`` on a network that slims: on a CPU, where a step's time falls
    far slower than its FLOPs, it is the slowest of the runs at the budget)."""
    from dance.engine.train import data_budget, stretched
    cfg = stretched(job.cfg)[0]
    t, ds = cfg.train, cfg.data_slimming
    return t.epochs * t.steps_fraction * (data_budget(cfg) if ds.enabled else 1.0)


def _score_once(cfgs: list[RunConfig], score_cache: Path, progress: bool) -> None:
    """Fill the score cache for every indicator a complexity-guided run will read."""
    from dance.data.datasets import open_dataset
    from dance.data.scoring import score_dataset
    guided = [c for c in cfgs if c.data_slimming.enabled
              and c.data_slimming.policy in ("dance", "shuffled")]
    for indicator in sorted({c.data_slimming.indicator for c in guided}):
        d = guided[0].dataset
        score_dataset(open_dataset(d.name, d.root, d.train_split), (indicator,),
                      cache_path=score_cache, progress=progress)


def reuse_or_train(cfg: RunConfig, folder: Path, score_cache: Path, progress: bool,
                   label: str, data_fp: dict) -> tuple[dict, str]:
    """A finished run with this fingerprint is reused; an unfinished one with it is resumed;
    one with another fingerprint is moved to ``<folder>.previous`` and trained anew."""
    from dance.engine.train import train
    recorded, finished = _recorded_fingerprint(folder)
    what = "trained"
    if recorded is not _NONE:
        differs = fingerprint_diff(recorded, run_fingerprint(cfg.to_dict(), data_fp))
        if not differs and not (finished or {}).get("forced_resume"):
            if finished is not None:
                print(f"[compare] {label}: reused {folder} (same fingerprint)", file=sys.stderr)
                return finished, "reused"
            what = "resumed"
        else:
            why = (f"fingerprint differs: {describe_diff(differs)}" if differs
                   else "it was resumed with --force")
            previous = _keep_previous(folder)
            print(f"[compare] {label}: {why}; retraining -> {folder} (the old run is kept "
                  f"in {previous})", file=sys.stderr)
            return train(cfg, folder, progress=progress, score_cache=score_cache), \
                f"retrained ({why})"
    doing = "resuming" if what == "resumed" else "training"  # ``what``: the status once done
    print(f"[compare] {label}: {doing} -> {folder}", file=sys.stderr)
    return train(cfg, folder, resume=what == "resumed", progress=progress,
                 score_cache=score_cache), what


def _keep_previous(folder: Path) -> Path:
    """Move a run that will be retrained to ``<folder>.previous`` (replacing an older one)."""
    previous = folder.with_name(folder.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    folder.rename(previous)
    return previous


_NONE = object()  # the folder holds no run at all


def _recorded_fingerprint(folder: Path) -> tuple[object, dict | None]:
    """(the fingerprint the run in ``folder`` was made with, its metrics if finished)."""
    from dance.engine import checkpoint as ckpt
    metrics_file = folder / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, {}  # unreadable: retrain it
        return metrics.get("fingerprint"), metrics
    try:
        saved, _ = ckpt.read_state(folder / "checkpoint")
    except DanceError:
        return _NONE, None
    return saved.get("fingerprint"), None


def dataset_fingerprint_of(cfg: RunConfig) -> dict:
    from dance.data.datasets import open_dataset
    d = cfg.dataset
    return dataset_fingerprint(open_dataset(d.name, d.root, d.train_split),
                               open_dataset(d.name, d.root, d.val_split))


def _pm(mean: float, std: float, seeds: int, fmt: str = "{:.2f}") -> str:
    s = fmt.format(mean)
    return s + (" ± " + fmt.format(std) if seeds > 1 else "")


def summary_table(report: dict) -> str:
    """The compact table `dance demo` prints and report.md opens with."""
    rows = ["| run | mIoU | Δ mIoU | train GFLOPs (×base) | wall time (×base) | "
            "infer GFLOPs (×base) | realised / planned cost | removed |",
            "|---|---|---|---|---|---|---|---|"]
    for kind, r in report["runs"].items():
        q = report["ratios"][kind]
        delta = f"{q['miou_delta']:+.2f}" + (" (within noise)" if q["within_noise"] else "")
        rows.append(
            f"| {kind} | {_pm(r['miou'], r.get('miou_std', 0), r['seeds'])} | {delta} | "
            f"{r['train_gflops_total']:.0f} ({q['train_gflops']:.2f}×) | "
            f"{r['train_seconds']:.0f} s ({q['train_seconds']:.2f}×) | "
            f"{r['gflops']:.2f} ({q['infer_gflops']:.2f}×) | "
            f"{r['realised_cost']:.3f} / {r['planned_cost']:.3f} | {_removed(r)} |")
    return "\n".join(rows)


def _removed(r: dict) -> str:
    text = ", ".join(r.get("removed_branches") or [])
    if r.get("removed_channels"):
        text += (" + " if text else "") + f"{r['removed_channels']:.0f} channels"
    if r.get("input_scale"):
        text = f"evaluated at input scale {r['input_scale']:.2f}"
    return text or "—"


def verdicts(report: dict) -> list[str]:
    """One line per alternative: did DANCE beat it beyond the spread over seeds?"""
    runs = report["runs"]
    if "dance" not in runs:
        return []
    d, ratios = runs["dance"], report["ratios"]
    lines = []
    for kind in (k for k in runs if k != "dance"):
        r = runs[kind]
        delta = d["miou"] - r["miou"]
        spread = max(d.get("miou_std", 0.0), r.get("miou_std", 0.0))
        if d["seeds"] < 2 or r["seeds"] < 2:
            verdict = "one seed, so no spread to judge by (seeds move short runs by 2-3 points)"
        elif abs(delta) <= spread:
            verdict = f"within the seed spread (±{spread:.2f})"
        else:
            verdict = f"{'beat' if delta > 0 else 'lost to'} it beyond the seed spread " \
                      f"(±{spread:.2f})"
        if kind in INFERENCE_ALTERNATIVES:
            cost = (f"{ratios['dance']['infer_gflops']:.2f}× vs {ratios[kind]['infer_gflops']:.2f}× "
                    "the plain model's inference FLOPs")
        else:
            cost = (f"{ratios['dance']['train_gflops']:.2f}× vs {ratios[kind]['train_gflops']:.2f}× "
                    "the plain run's training FLOPs")
        lines.append(f"DANCE vs {kind}: {delta:+.2f} mIoU at {cost}: {verdict}")
    return lines


def _stretch_note(cfg: dict) -> str:
    """`` (dance stretched to N epochs at the same FLOPs)`` where ``data_slimming.stretch``
    lengthens the dance run, else nothing."""
    stretch = cfg.get("data_slimming", {}).get("stretch", 1.0)
    if stretch == 1.0:
        return ""
    from dance.engine.train import stretched_epochs
    longer = stretched_epochs(cfg["train"]["epochs"], stretch)
    return (f" (dance stretched to {longer} epochs at the same "
            f"training FLOPs, data_slimming.stretch {stretch:g})")


def render_markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "# dance compare",
        "",
        f"Dataset `{cfg['dataset']['name']}` ({cfg['dataset']['root']}), model "
        f"`{cfg['model']['name']}`, {cfg['train']['epochs']} epochs{_stretch_note(cfg)}, crop "
        f"{cfg['train']['crop'][0]}×{cfg['train']['crop'][1]}, budget "
        f"{cfg['data_slimming']['budget']}, {report['seeds']} seed(s). mIoU on the "
        f"`{cfg['dataset']['val_split']}` split, in points. Ratios are over the baseline "
        "(plain run) measured in the same compare. Training GFLOPs are counted "
        "(torch.utils.flop_counter, forward+backward at each step's real shape); energy is "
        f"{_energy_kind(report)}.",
        "",
        summary_table(report),
        "",
        *[f"- {v}" for v in verdicts(report)],
        "",
    ]
    if report["seeds"] > 1:
        lines += ["A Δ mIoU smaller than the spread (std) across seeds is marked "
                  "\"within noise\".", ""]
    for name, r in report["runs"].items():
        ev = r.get("prune_events") or []
        if ev:
            lines += [f"## Branch importance at each pruning point ({name})", "",
                      "| progress | branch | gate | loss rise | GFLOPs saved | removed |",
                      "|---|---|---|---|---|---|"]
            for e in ev:
                for b, imp in e["importance"].items():
                    lines.append(
                        f"| {e['progress']:.0%} | {b} | {imp.get('gate', float('nan')):.3f} | "
                        f"{imp.get('loss_rise', float('nan')):+.4f} | "
                        f"{imp.get('gflops_saved', float('nan')):.3f} | "
                        f"{'yes' if b in e['removed'] else ''} |")
            lines.append("")
    for name, r in report["runs"].items():
        rows = [(e["progress"], c) for e in r.get("prune_events") or [] for c in e.get("channels", [])]
        if rows:
            lines += [f"## Channel groups removed at each pruning point ({name}, seed 0)", "",
                      "| progress | group (root layer) | width | channels removed | importance | "
                      "GFLOPs saved (est.) |", "|---|---|---|---|---|---|"]
            for progress, c in rows:
                lines.append(f"| {progress:.0%} | `{c['layer']}` | {c['width_before']} → "
                             f"{c['width_before'] - len(c['channels'])} | {len(c['channels'])} | "
                             f"{c['importance']:.3g} | {c['gflops_saved']:.4f} |")
            lines.append("")
    for p in report.get("plots", []):
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return "\n".join(lines) + "\n"


def _energy_kind(report: dict) -> str:
    kinds = {r.get("energy_kind") for r in report["runs"].values()}
    return " and ".join(sorted(k for k in kinds if k)) or "unknown"


def cli_compare(args) -> int:
    cfg = load_config(args.config, args.overrides)
    # by default every kind; thin matches a network budget, so only when there is one
    runs = parse_runs(args.runs) if args.runs else [
        k for k in RUN_KINDS if k != "thin" or cfg.network_slimming.network_budget is not None]
    if args.seeds < 1:
        raise DanceError(f"--seeds must be at least 1, got {args.seeds}")
    if args.jobs < 1:
        raise DanceError(f"--jobs must be at least 1, got {args.jobs}")
    out = Path(args.out) if args.out else Path("runs") / "compare"
    if args.saturation:
        result = saturation(cfg, out, seeds=args.seeds, progress=not args.quiet,
                            jobs=args.jobs)
        print(saturation_table(result))
        print(f"saturation: {out / 'saturation.json'}")
        return 0
    report = compare(cfg, runs, out, seeds=args.seeds, progress=not args.quiet, jobs=args.jobs)
    print(summary_table(report))
    print("\n".join(verdicts(report)))
    print(f"report: {out / 'report.md'}")
    return 0


SATURATION_FACTORS = (0.5, 1.0, 2.0)
CONVERGED_GAIN = 1.0  # mIoU points the 2x run may gain over the 1x run for "near converged"


def saturation(cfg: RunConfig, out_dir: str | Path, seeds: int = 1,
               progress: bool = True, jobs: int = 1) -> dict:
    """The plain recipe at 0.5x, 1x and 2x its epochs (same seeds): how far the 1x run is from
    converged. Cutting compute from a run that is still learning fast costs accuracy whatever
    the method, so a claim needs a recipe whose 2x run gains under ``CONVERGED_GAIN``."""
    out_dir = Path(out_dir)
    with locked(out_dir):
        data_fp = dataset_fingerprint_of(cfg)
        grid = [(max(1, round(cfg.train.epochs * f)), cfg.train.seed + s)
                for f in SATURATION_FACTORS for s in range(seeds)]
        run_jobs = []
        for epochs, seed in grid:
            run = run_config(cfg, "baseline", seed)
            run.train.epochs = epochs
            name = f"baseline-{epochs}ep" + (f"-seed{seed}" if seeds > 1 else "")
            run_jobs.append(RunJob(run, out_dir / "runs" / name,
                                   f"plain at {epochs} epochs (seed {seed})"))
        results = [m for m, _ in train_all(run_jobs, out_dir / "scores.cache.json", data_fp,
                                           progress, jobs)]
        rows = []
        for i, factor in enumerate(SATURATION_FACTORS):
            per_seed = results[i * seeds:(i + 1) * seeds]
            miou, std = _mean_std([m["miou"] for m in per_seed])
            seconds, _ = _mean_std([m["train_seconds"] for m in per_seed])
            rows.append({"factor": factor, "epochs": grid[i * seeds][0], "miou": miou,
                         "miou_std": std, "per_seed_miou": [m["miou"] for m in per_seed],
                         "train_seconds": seconds})
        gain = rows[2]["miou"] - rows[1]["miou"]
        result = {"config": cfg.to_dict(), "seeds": seeds, "rows": rows, "gain_2x": gain,
                  "converged": bool(gain < CONVERGED_GAIN)}
        atomic_write_json(out_dir / "saturation.json", jsonable(result))
    return result


def saturation_table(result: dict) -> str:
    rows = ["| epochs | × recipe | mIoU | train s |", "|---|---|---|---|"]
    for r in result["rows"]:
        rows.append(f"| {r['epochs']} | {r['factor']:g}× | "
                    f"{_pm(r['miou'], r['miou_std'], result['seeds'])} | {r['train_seconds']:.0f} |")
    verdict = ("near converged" if result["converged"] else "still learning: a cut in compute "
               "will cost accuracy whatever the method")
    return "\n".join(rows) + (f"\n\nTwice the epochs gains {result['gain_2x']:+.2f} mIoU: "
                              f"{verdict} (rule: under {CONVERGED_GAIN:g} mIoU).")
