"""A training step (forward, cross-entropy, backward, AdamW) of each registered model in the
usual memory layout and in channels-last, side by side on this machine's CPU, printed as a
table of milliseconds and ratios; what `train.channels_last: always` would buy a CPU run of
that model (BENCHMARKS.md, "Channels-last on the CPU").

    python benchmarks/layout.py [--models a,b] [--sizes 64x128,128x256] [--batch 4]
        [--threads 1] [--steps 4] [--repeats 2]

Each cell is the best of ``--repeats`` timings of ``--steps`` steps after two untimed ones; the
two layouts alternate so a drift of the machine's speed reaches both.
"""
import argparse
import sys
import time


def step_ms(name: str, channels_last: bool, size: tuple[int, int], batch: int, steps: int,
            seed: int = 0) -> float:
    """Milliseconds per training step of a fresh model ``name`` (19 classes) at ``size``."""
    import torch
    import torch.nn.functional as F

    import dance
    torch.manual_seed(seed)
    model = dance.build_model(name, 19)
    x = torch.rand(batch, 3, *size)
    y = torch.randint(0, 19, (batch, *size))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps * 1e3


def main(argv: list[str]) -> int:
    import torch

    from dance.cli import _int_at_least, _size
    from dance.network.registry import list_models
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(list_models()))
    p.add_argument("--sizes", default="64x128,128x256")
    for flag, default in (("--batch", 4), ("--threads", 1), ("--steps", 4), ("--repeats", 2)):
        p.add_argument(flag, type=_int_at_least(1), default=default)
    args = p.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(list_models())}")
    try:
        sizes = [_size(s) for s in args.sizes.split(",")]
    except argparse.ArgumentTypeError as e:
        p.error(f"--sizes: {e}")
    if min(min(size) for size in sizes) < 32:
        p.error(f"--sizes {args.sizes}: each side must be at least 32")
    torch.set_num_threads(args.threads)
    head = " | ".join(f"{h}x{w}: usual ms, channels-last ms, ratio" for h, w in sizes)
    print(f"CPU, {args.threads} thread(s), batch {args.batch}, best of {args.repeats}x"
          f"{args.steps} steps\n\n| model | {head} |\n|---|{'---|' * len(sizes)}", flush=True)
    for name in models:
        cells = []
        for size in sizes:
            best = {False: float("inf"), True: float("inf")}
            for _ in range(args.repeats):
                for layout in best:
                    best[layout] = min(best[layout], step_ms(name, layout, size, args.batch,
                                                             args.steps))
            cells.append(f"{best[False]:.1f}, {best[True]:.1f}, {best[True] / best[False]:.3f}")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
