"""`dance bench`: the speed and memory targets, measured side by side (`dance bench --help`).

One module per benchmark, each with a ``bench_*`` function that returns a JSON-able dict, a
``format_*`` function that prints it as a small markdown table headed by the machine it ran on,
and ``run``, the handler of its ``dance bench`` subcommand (the options live in `dance.cli`):

* `dance.bench.complexity`: `dance score` throughput next to decode-only of the same files, and
  how well each image-only indicator ranks the damage of downsampling;
* `dance.bench.models`: params, GFLOPs and latency of each model before and after removing its
  largest multi-scale branch;
* `dance.bench.train`: the plain run and DANCE trained with the same data, model, epochs and seed;
* `dance.bench.threads`: training images/s of the machine at each CPU thread count, and with one
  one-thread run per core side by side (what `dance compare --jobs` does);
* `dance.bench.pipeline`: decode + augment + collate throughput at every scale of the data plan
  next to full scale, and decode alone: whether the data pipeline eats the savings of
  downsampling (the image is decoded at full resolution whatever its scale).

Every ratio compares runs made in one process. Where a run is short (scoring, inference, a
loader epoch) the runs alternate over several rounds and the best round counts, so load from
other processes on a shared machine falls on both sides alike (`dance.bench.common`). The
scripts under ``benchmarks/`` call ``dance bench`` through `dance.cli.main`.
"""
