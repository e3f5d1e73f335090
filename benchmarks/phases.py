"""Where the time of each run kind goes: the demo recipe's plain, uniform and DANCE runs trained
one after the other on one CPU thread, printed as seconds by phase (metrics.json's
``phase_seconds``), step time by input shape, and wall time and training FLOPs over the plain
run's (BENCHMARKS.md, "Seconds, not only FLOPs").

    python benchmarks/phases.py --data dance-demo/synthstreets [--runs baseline,uniform,dance]
        [--out phases] [key=value ...]

The runs go one at a time so none slows another; a machine whose speed drifts between runs
moves the ratios (run it twice).
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

PHASES = ("data", "forward", "backward", "optimizer", "accounting", "prune", "warmup",
          "checkpoint", "eval")


def main(argv: list[str]) -> int:
    from dance.engine.config import load_config
    from dance.engine.train import train
    from dance.report.compare import run_config
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs"
                                          / "demo.yaml"))
    p.add_argument("--data", required=True, help="the dataset root the config trains on")
    p.add_argument("--runs", default="baseline,uniform,dance")
    p.add_argument("--out", default="phases")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [f"dataset.root={args.data}", "train.threads=1",
                                    *args.overrides])
    rows = {}
    for kind in args.runs.split(","):
        out = Path(args.out) / kind
        shutil.rmtree(out, ignore_errors=True)
        rows[kind] = train(run_config(cfg, kind, cfg.train.seed), out, progress=False)
    base = rows.get("baseline") or next(iter(rows.values()))
    print("| run | wall s | " + " | ".join(PHASES) + " | wall / plain | train FLOPs / plain |")
    print("|---|---|" + "---|" * len(PHASES) + "---|---|")
    for kind, m in rows.items():
        ph = m["phase_seconds"]
        print(f"| {kind} | {m['wall_seconds']:.1f} | "
              + " | ".join(f"{ph[k]:.1f}" if k in ph else "" for k in PHASES)
              + f" | {m['wall_seconds'] / base['wall_seconds']:.3f} | {m['total_cost']:.3f} |")
    print()
    for kind, m in rows.items():
        steps = ", ".join(f"{k}: {v['ms_per_step']:.1f} ms ({v['steps']})"
                          for k, v in m["step_seconds_by_shape"].items())
        print(f"{kind}: {steps}")
    Path(args.out, "phases.json").write_text(json.dumps(
        {k: {f: m[f] for f in ("wall_seconds", "total_cost", "phase_seconds",
                               "step_seconds_by_shape", "miou")} for k, m in rows.items()},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
