"""A training step (forward, cross-entropy, backward, AdamW) of each registered model as usual
and with one CPU option, side by side on this machine's CPU, printed as a table of
milliseconds and ratios: what `train.channels_last: always` (``--against channels-last``, the
default) or `train.small_map_convs` (``--against small-maps``) buys a CPU run of that model
(BENCHMARKS.md, "Channels-last on the CPU" and the seventeenth round).

    python benchmarks/layout.py [--models a,b] [--sizes 64x128,128x256] [--batch 4]
        [--threads 1] [--steps 4] [--repeats 2] [--against channels-last|small-maps]

Each cell is the best of ``--repeats`` timings of ``--steps`` steps after two untimed ones; the
two ways alternate so a drift of the machine's speed reaches both.
"""
import argparse
import sys
import time

AGAINST = ("channels-last", "small-maps")


def step_ms(name: str, way: str | None, size: tuple[int, int], batch: int, steps: int,
            seed: int = 0) -> float:
    """Milliseconds per training step of a fresh model ``name`` (19 classes) at ``size``, as
    usual (``way`` None) or one of ``AGAINST``."""
    import torch
    import torch.nn.functional as F

    import dance
    from dance.network.smallmaps import small_map_convs
    torch.manual_seed(seed)
    model = dance.build_model(name, 19)
    x = torch.rand(batch, 3, *size)
    y = torch.randint(0, 19, (batch, *size))
    if way == "channels-last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        with small_map_convs(model, way == "small-maps"):
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
    p.add_argument("--against", choices=AGAINST, default="channels-last")
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
    head = " | ".join(f"{h}x{w}: usual ms, {args.against} ms, ratio" for h, w in sizes)
    print(f"CPU, {args.threads} thread(s), batch {args.batch}, best of {args.repeats}x"
          f"{args.steps} steps\n\n| model | {head} |\n|---|{'---|' * len(sizes)}", flush=True)
    for name in models:
        cells = []
        for size in sizes:
            best = {None: float("inf"), args.against: float("inf")}
            for _ in range(args.repeats):
                for way in best:
                    best[way] = min(best[way], step_ms(name, way, size, args.batch, args.steps))
            usual, other = best[None], best[args.against]
            cells.append(f"{usual:.1f}, {other:.1f}, {other / usual:.3f}")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
