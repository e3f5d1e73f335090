"""The training loop (the method: docs/method.md; the run folder: docs/checkpoints.md).

One loop serves the plain run and DANCE: with both slimming parts disabled the data plan is the
plain run (every image, full scale, weight 1) and no slimmer exists. Data flows one way: dataset ->
scores -> plan -> sampler/loader -> this loop <- slimmer. The loop asks the plan what each epoch
looks like and the slimmer when to prune; neither reaches back in here.

Read ``train`` first: it is the method, top to bottom. ``train_one_epoch`` is one pass of steps.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dance.data.datasets import SegmentationDataset, open_dataset
from dance.data.decode_cache import DecodeCache
from dance.data.loader import PlannedDataset, collate_planned, raise_batch_errors
from dance.data.plan import (
    DataSlimmingPlan,
    Hardness,
    check_plan_budget,
    drops_instead,
    load_plan,
    plan,
    plan_for_policy,
)
from dance.data.sampler import BucketedBatchSampler
from dance.data.transforms import TrainTransform, scaled_crop
from dance.engine import checkpoint as ckpt
from dance.engine.config import (
    RunConfig,
    flat_data_budget,
    joint,
    load_config,
    plans_from_scores,
)
from dance.engine.cost import CostLedger, EnergyMeter, PhaseTimer
from dance.engine.evaluate import eval_fields
from dance.engine.loss import class_balanced_cross_entropy, weighted_cross_entropy
from dance.engine.run_folder import (
    FINGERPRINT_FILE,
    dataset_fingerprint,
    describe_diff,
    fingerprint_diff,
    locked,
    run_fingerprint,
)
from dance.engine.runtime import (
    Runtime,
    all_reduce_,
    autocast,
    broadcast_from_main,
    cpu_threads,
    setup_runtime,
    wrap_ddp,
)
from dance.engine.state import TrainState
from dance.errors import DanceError
from dance.faults import fault_point
from dance.fileio import atomic_write_json, jsonable
from dance.network.flops import count_gflops, meta_copy
from dance.network.gates import MultiScaleModule, branches
from dance.network.registry import build_model
from dance.network.slimming import NetworkSlimmer, OptimizerSnapshot, rebuild_optimizer
from dance.network.smallmaps import small_map_convs


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          score_cache: str | Path | None = None, force: bool = False) -> dict:
    """Train one run into ``out_dir``; returns (and writes) its metrics.json content.

    ``resume`` continues the run's checkpoint, provided it was started with the same
    fingerprint (config, dataset, version); ``force`` continues it even so, and says so in
    metrics.json. The folder is locked while this runs.
    """
    out_dir = Path(out_dir)
    rt = setup_runtime(cfg.train.device)
    with locked(out_dir) if rt.is_main else contextlib.nullcontext(), \
            cpu_threads(cfg.train.threads):
        if not resume:
            refuse_existing_run(out_dir)
        tc = cfg.train
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed)
        train_ds = open_dataset(cfg.dataset.name, cfg.dataset.root, cfg.dataset.train_split)
        val_ds = open_dataset(cfg.dataset.name, cfg.dataset.root, cfg.dataset.val_split)
        fingerprint = run_fingerprint(cfg.to_dict(), dataset_fingerprint(train_ds, val_ds))
        cfg, plain_epochs = stretched(cfg)
        model = build_model(cfg.model.name, train_ds.num_classes, cfg.model.pretrained_backbone,
                            **cfg.model.options)
        reference = meta_copy(model)  # before a resume replays any slimming
        plan0 = shared_data_plan(cfg, train_ds, out_dir, score_cache, progress, rt)
        long_run = in_long_run_regime(cfg, plan0)
        keep_state = keeps_optimizer_state(cfg, long_run)
        if rt.is_main and long_run:
            nb = cfg.network_slimming.network_budget if cfg.network_slimming.enabled else None
            text_log(out_dir, f"data plan at {plan0.budget:.3f} of the data cost (drop_above "
                              f"{cfg.data_slimming.drop_above:g}"
                              + ("" if nb is None else f", network budget {nb:g}")
                              + "): dropping the least complex "
                              "images' steps instead of downscaling"
                              + (", keeping the optimizer state through removals"
                                 if keep_state else ""))
        slimmer = make_slimmer(cfg, model)
        state = TrainState(plan=plan0, hardness=Hardness(len(train_ds)))
        saved = (resume_run(out_dir / "checkpoint", cfg, model, slimmer, state, rt, fingerprint,
                            force) if resume else None)
        if rt.is_main:
            atomic_write_json(out_dir / FINGERPRINT_FILE, fingerprint)
        run = start_run(cfg, rt, model, slimmer, train_ds, state, saved, out_dir, progress,
                        fingerprint, plain_epochs)
        run.reference = reference
        run.keep_optimizer_state = keep_state

        run.meter.start()
        t_start = time.perf_counter() - state.wall_seconds
        epoch = state.epoch
        while set_horizon(run, state, epoch):
            lr, mean_scale = train_one_epoch(run, state, epoch)
            epoch_loss = end_epoch_hardness(state.hardness, cfg, rt)
            filled = state.hardness.filled()
            if adapts(cfg) and filled is not None:  # re-plan from what is still hard
                state.plan = plan0.replan(filled, alpha=cfg.data_slimming.hardness_alpha)
            state.epoch, state.wall_seconds = epoch + 1, time.perf_counter() - t_start
            val = None
            if tc.eval_every and (epoch + 1) % tc.eval_every == 0 \
                    and epoch + 1 < run.horizon:
                with run.timer.phase("eval"):
                    val = evaluate_run(model, val_ds, cfg, rt, run.show)["miou"]
            record = {"epoch": epoch + 1, "step": state.global_step, "loss": epoch_loss,
                      "lr": lr, "mean_scale": mean_scale, "gates": gate_values(model),
                      "realised_cost": state.ledger.realised_cost, "horizon": run.horizon,
                      "val_miou": val}
            state.history.append(record)
            log_epoch(run, record)
            check_finite(run, epoch)  # every rank, before rank 0 replaces the last checkpoint
            if rt.is_main:
                with run.timer.phase("checkpoint"):
                    state.phases = run.timer.to_json()
                    # best/ before checkpoint/: a resume redoes an epoch whose checkpoint a kill
                    # cut short, and measures the same mIoU again
                    if val is not None and best_validation(state.history) is record:
                        save_best(run, record["epoch"], val)
                    save_run_checkpoint(run, state)
                # after the checkpoint, so an epoch a resume redoes is logged once
                text_log(out_dir, epoch_line(record, run.horizon))
            epoch += 1
        run.meter.stop()
        wall_seconds = time.perf_counter() - t_start

        with run.timer.phase("eval"):
            val_metrics = evaluate_run(model, val_ds, cfg, rt, run.show)
        final = {"epoch": state.epoch, "val_miou": val_metrics["miou"]}
        best = best_validation([*state.history, final]) if tc.eval_every else None
        if rt.is_main and best is final:
            save_best(run, state.epoch, final["val_miou"])
        metrics = final_metrics(run, state, plan0, val_metrics, wall_seconds, saved is not None)
        metrics["best"] = (None if best is None else
                           {"epoch": best["epoch"], "val_miou": best["val_miou"], "path": BEST})
        if rt.is_main:  # metrics.json last: it is what marks the run finished
            text_log(out_dir, finished_line(metrics))
            atomic_write_json(out_dir / "plan.json", plan0.to_json())
            fault_point("before-metrics")
            atomic_write_json(out_dir / "metrics.json", metrics)
        return metrics


def refuse_existing_run(out: Path) -> None:
    """A fresh run never overwrites another run's results or checkpoint."""
    if (out / "metrics.json").exists():
        raise DanceError(f"{out}: already holds a finished run (metrics.json); "
                         "choose another --out or pass --resume")
    if ckpt.find_checkpoint(out / "checkpoint") is not None:
        raise DanceError(f"{out}: holds a checkpoint of an unfinished run; "
                         "pass --resume to continue it or choose another --out")


@dataclass
class Run:
    """The pieces of one run the loop works with; ``optimizer`` and ``ddp_model`` are replaced
    when the slimmer removes branches."""

    cfg: RunConfig
    rt: Runtime
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ddp_model: nn.Module
    sampler: BucketedBatchSampler
    loader: DataLoader
    n_images: int
    ckpt_dir: Path
    slimmer: NetworkSlimmer | None = None
    probe: list = field(default_factory=list)
    show: bool = True
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    # "HxW" -> [steps, seconds] of forward+backward+optimizer at that input shape
    step_seconds: dict[str, list] = field(default_factory=dict)
    warmed: set = field(default_factory=set)  # (architecture, shape) already warmed up
    meter: EnergyMeter | None = None
    tb: _Tensorboard | None = None
    fingerprint: dict = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)  # train ids' names, into checkpoints
    horizon: float = 0.0  # epochs the run trains (`budget_horizon`)
    # the architecture the run started with, on the meta device: the data plan's cost is priced
    # on it, so network slimming's saving is not spent on more data (docs/method.md#cost-accounting)
    reference: nn.Module | None = None
    # removals carry the optimizer state (network_slimming.keep_optimizer_state, resolved)
    keep_optimizer_state: bool = False
    # the plain recipe's epochs the costs are priced against (train.epochs before `stretched`)
    plain_epochs: int = 1


def train_one_epoch(run: Run, state: TrainState, epoch: int) -> tuple[float, float]:
    """One pass over the epoch's planned batches; returns (last learning rate, mean scale)."""
    tc = run.cfg.train
    run.sampler.plan = state.plan
    run.sampler.set_epoch(epoch)
    policy = state.plan.epoch_policy(epoch, tc.epochs)
    weights = torch.as_tensor(policy.weight, dtype=torch.float32)
    mean_scale = policy.mean_scale
    horizon = run.horizon
    # priced as the plain run would: every image kept (the ledger's plain_scale adds the
    # epochs of the recipe that the run does not train)
    full_factor = run.sampler.full_factor(epoch)
    steps = len(run.sampler)
    run_steps = min(steps, round((horizon - epoch) * steps))  # a short run stops mid-epoch
    run.ddp_model.train()
    bar = tqdm(total=run_steps, desc=f"epoch {epoch + 1}/{math.ceil(horizon)}",
               disable=not run.show, leave=False, file=sys.stderr)
    it, lr = iter(run.loader), tc.lr
    log = _StepLog(run, epoch)
    for i in range(run_steps):
        with run.timer.phase("data"):
            batch = next(it)
        raise_batch_errors(batch)
        state.skipped.update(batch.get("skipped", []))
        lr = scheduled_lr(run.cfg, (epoch + i / steps) / horizon)
        if run.sampler.multigrid:  # the linear scaling rule: a batch k times larger, k times the lr
            lr *= batch["image"].shape[0] / tc.batch_size
        for g in run.optimizer.param_groups:
            g["lr"] = lr
        bar.update(1)
        if batch["image"].shape[0] == 0:  # every sample of the batch was skipped
            continue
        x_shape = tuple(batch["image"].shape)
        warm_up(run, [x_shape])
        t0 = time.perf_counter()
        loss, total, per_image = optimizer_step(run, batch, weights, mean_scale)
        per_shape = run.step_seconds.setdefault(f"{x_shape[2]}x{x_shape[3]}", [0, 0.0])
        per_shape[0] += 1
        per_shape[1] += time.perf_counter() - t0
        with run.timer.phase("accounting"):
            state.ledger.add_step(run.model, x_shape, tuple(tc.crop), full_factor, run.reference)
        state.global_step += 1
        fault_point("step")
        log.add(i, batch["index"], per_image, loss, total, lr, x_shape[3] / tc.crop[1])
        if len(log.steps) >= SYNC_EVERY:
            log.flush(state, bar)
        progress_now = (epoch + (i + 1) / steps) / horizon
        if run.slimmer is not None and run.slimmer.due(progress_now):
            log.flush(state, bar)
            with run.timer.phase("prune"):
                prune_now(run, state, progress_now)
            fault_point("pruned")
    log.flush(state, bar)
    bar.close()
    state.ledger.epochs_trained += run_steps / steps
    return lr, mean_scale


# Steps between reads of the loss on the host: a GPU is never made to wait for the host each
# step; a non-finite loss is caught at the next read (docs/method.md#cost-accounting).
SYNC_EVERY = 10


class _StepLog:
    """The losses of the last steps, kept on the device and read on the host together
    (`flush`): the hardness record, the progress bar, TensorBoard and the finite-loss check."""

    def __init__(self, run: Run, epoch: int):
        self.run, self.epoch = run, epoch
        self.steps: list[tuple] = []

    def add(self, step: int, index: torch.Tensor, per_image: torch.Tensor, loss: torch.Tensor,
            total: torch.Tensor, lr: float, scale: float) -> None:
        """One step: its number in the epoch, images, per-image and mean data loss, the loss
        it minimised (sparsity term included), learning rate and scale."""
        pair = torch.stack([loss.detach().float(), total.detach().float()])
        self.steps.append((step, index, per_image.detach(), pair, lr, scale))

    def flush(self, state: TrainState, bar) -> None:
        if not self.steps:
            return
        run, steps, self.steps = self.run, self.steps, []
        pairs = torch.stack([s[3] for s in steps]).cpu()  # one wait for the device
        losses, totals = pairs[:, 0], pairs[:, 1]
        per_image = torch.cat([s[2].double() for s in steps]).cpu().numpy()
        bad = (~torch.isfinite(totals)).nonzero()
        if len(bad):
            k = int(bad[0])
            raise DanceError(f"loss became {totals[k].item()} at epoch {self.epoch + 1} step "
                             f"{steps[k][0] + 1}; training stopped (lower train.lr?); "
                             f"{last_good(run.ckpt_dir)}")
        at, first = 0, state.global_step - len(steps) + 1
        for k, (_, index, _, _, lr, scale) in enumerate(steps):
            state.hardness.observe(index.numpy(), per_image[at:at + len(index)])
            at += len(index)
            if run.tb is not None:
                run.tb.scalars(first + k, **{"train/loss": float(losses[k]), "train/lr": lr,
                                             "train/scale": scale})
        _, _, _, _, lr, scale = steps[-1]
        bar.set_postfix(loss=f"{float(losses[-1]):.3f}", lr=f"{lr:.2e}", scale=f"{scale:.3f}")


def optimizer_step(run: Run, batch: dict, weights: torch.Tensor, mean_scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, weighted loss (+ the slimmer's sparsity term), backward, update; returns the
    data loss, the whole loss (sparsity term included) and the per-image losses, on the
    device."""
    rt, timer = run.rt, run.timer
    with timer.phase("forward"):
        x = batch["image"].to(rt.device, non_blocking=True)
        if channels_last(run.cfg, rt):
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["mask"].to(rt.device, non_blocking=True)
        with autocast(rt.device, run.cfg.train.amp), \
                small_map_convs(run.model, run.cfg.train.small_map_convs and rt.device.type == "cpu"):
            logits = run.ddp_model(x)
        loss, per_image = weighted_cross_entropy(logits.float(), y,
                                                 weights[batch["index"]].to(rt.device))
        total = loss
        if run.slimmer is not None:
            total = total + run.slimmer.sparsity_loss(run.model, mean_scale)
    with timer.phase("backward"):
        run.optimizer.zero_grad(set_to_none=True)
        total.backward()
    with timer.phase("optimizer"):
        run.optimizer.step()
    return loss, total, per_image


def channels_last(cfg: RunConfig, rt: Runtime) -> bool:
    """Whether the model and its inputs are in channels-last layout (``train.channels_last``:
    true on CUDA, ``always`` on every device)."""
    setting = cfg.train.channels_last
    return setting == "always" or (setting is True and rt.device.type == "cuda")


def to_layout(model: nn.Module, cfg: RunConfig, rt: Runtime) -> None:
    """The model's 4-d weights in channels-last layout where ``train.channels_last`` applies."""
    if channels_last(cfg, rt):
        model.to(memory_format=torch.channels_last)


def warm_up(run: Run, shapes: list[tuple[int, ...]]) -> None:
    """On CUDA (``train.warmup_shapes``), one forward and backward per input shape not yet seen
    on this architecture, before it is trained: cuDNN's algorithm search and the allocator's
    first requests land here, in the "warmup" phase, not in the steps of each new scale."""
    if not (run.cfg.train.warmup_shapes and run.rt.device.type == "cuda"):
        return
    arch = len(run.model.dance_arch.removed)
    todo = [s for s in shapes if (arch, s) not in run.warmed]
    if todo:
        with run.timer.phase("warmup"):
            warm_shapes(run.model, todo, run.rt.device, run.cfg.train.amp,
                        channels_last(run.cfg, run.rt))
        run.warmed.update((arch, s) for s in todo)


def warm_shapes(model: nn.Module, shapes: list[tuple[int, ...]], device: torch.device,
                amp: bool, channels_last: bool = False) -> None:
    """A forward and backward of ``model`` (not its DDP wrap: no collective, whatever the other
    ranks do) on zeros of each shape; weights, gradients and BatchNorm statistics are left as
    they were."""
    stats = {k: v.clone() for k, v in model.state_dict().items()
             if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}
    grads = {p: p.grad for p in model.parameters()}
    for p in grads:
        p.grad = None  # backward would add into a held gradient in place
    for shape in shapes:
        x = torch.zeros(shape, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = model(x)
        out.float().mean().backward()
    for p, g in grads.items():
        p.grad = g
    model.load_state_dict(stats, strict=False)


def in_long_run_regime(cfg: RunConfig, plan0: DataSlimmingPlan) -> bool:
    """Whether the run's data plan was made where it cuts little (``data_slimming.drop_above``):
    it then drops instead of downscaling, and ``keep_optimizer_state: auto`` keeps the state
    (docs/method.md#the-long-run-regime)."""
    ds = cfg.data_slimming
    return plans_from_scores(ds) and drops_instead(ds.drop_above, plan0.budget, ds.drop,
                                                   ds.downsample)


def keeps_optimizer_state(cfg: RunConfig, long_run: bool) -> bool:
    """``network_slimming.keep_optimizer_state`` resolved: ``auto`` keeps it in a long run."""
    setting = cfg.network_slimming.keep_optimizer_state
    return long_run if setting == "auto" else setting


def prune_now(run: Run, state: TrainState, progress: float) -> None:
    """A scheduled pruning point: remove branches and channels, then rebuild the optimizer and
    DDP wrap. Under DDP rank 0 decides and every other rank replays its removals, in order."""
    arch = run.model.dance_arch
    before = len(arch.removed)
    snapshot = OptimizerSnapshot(run.optimizer, run.model) if run.keep_optimizer_state else None
    payload = None
    if run.rt.is_main:
        loss_fn = _PROBE_LOSSES[run.cfg.network_slimming.probe_loss]
        event = run.slimmer.prune(run.model, run.probe, loss_fn, progress)
        payload = {"event": event.to_json(), "ops": jsonable(arch.removed[before:])}
    payload = broadcast_from_main(payload, run.rt)
    if not run.rt.is_main:
        event = run.slimmer.follow(run.model, payload["event"], payload["ops"], progress)
    to_layout(run.model, run.cfg, run.rt)  # layers sliced by the removal
    if snapshot is not None:
        snapshot.carry(run.model)
    run.optimizer = rebuild_optimizer(run.optimizer, run.model)
    run.ddp_model = wrap_ddp(run.model, run.rt)
    state.prune_events.append(event.to_json())
    if run.show and (event.removed or event.channels):
        tqdm.write(f"[prune @ {progress:.0%}] {event.message}", file=sys.stderr)


def _probe_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return weighted_cross_entropy(logits.float(), masks)[0]


def _balanced_probe_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return class_balanced_cross_entropy(logits.float(), masks)


# network_slimming.probe_loss -> the loss branch and channel importance are measured on
_PROBE_LOSSES = {"pixel": _probe_loss, "class_balanced": _balanced_probe_loss}


def end_epoch_hardness(hardness: Hardness, cfg: RunConfig, rt: Runtime) -> float | None:
    """Sum the epoch's per-image losses over ranks and fold them into the hardness EMA."""
    if rt.distributed:
        sums = torch.from_numpy(np.stack([hardness.loss_sum, hardness.loss_count])).to(rt.device)
        sums = all_reduce_(sums, rt).cpu().numpy()
        hardness.loss_sum[:], hardness.loss_count[:] = sums[0], sums[1]
    return hardness.end_epoch(cfg.data_slimming.hardness_momentum)


def adapts(cfg: RunConfig) -> bool:
    """Whether this run re-plans each epoch from per-image hardness."""
    ds = cfg.data_slimming
    return ds.enabled and ds.adaptive and ds.policy == "dance"


def data_budget(cfg: RunConfig, draft: DataSlimmingPlan | None = None) -> float:
    """The budget the data plan is made at: ``data_slimming.budget``, or with a joint budget,
    the budget ``B`` at which the run's expected cost, each epoch's data cost times the
    network's expected FLOPs fraction in that epoch, equals ``data_slimming.budget`` (capped
    at 1): the data spends what the slimmer saves (docs/method.md#joint-budget). ``draft`` (a
    plan of the run's policy) gives the epochs' costs at ``B``; without it they are flat
    (``B / f``, ``f`` the network's mean fraction). A progressive ramp spends most in the
    late epochs, when the network is slimmest, so it is planned above ``B / f``."""
    budget = cfg.data_slimming.budget
    if not joint(cfg):
        return budget
    ns, epochs = cfg.network_slimming, cfg.train.epochs
    points = ns.points(epochs)
    if draft is None or draft.schedule == "static":
        return flat_data_budget(cfg, ns.network_budget)
    fraction = np.array([NetworkSlimmer.expected_fraction(points, ns.network_budget,
                                                          e / epochs, (e + 1) / epochs)
                         for e in range(epochs)])

    def cost(b: float) -> float:
        return float(np.mean(draft.epoch_costs(epochs, b) * fraction))

    if cost(1.0) <= budget:
        return 1.0
    lo, hi = budget, 1.0  # cost rises with b (every epoch's scale does); cost(budget) <= budget
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cost(mid) < budget else (lo, mid)
    return lo


def build_data_plan(cfg: RunConfig, train_ds: SegmentationDataset, score_cache: Path | None,
                    progress: bool) -> DataSlimmingPlan:
    """The data side's decision for this run (docs/method.md#data-policy, #run-kinds)."""
    ids = [s.id for s in train_ds.samples]
    ds = cfg.data_slimming
    if not ds.enabled:
        return plan(np.zeros(len(ids)), 1.0, ids)
    if ds.plan is not None and ds.policy in ("dance", "shuffled"):
        p = load_plan(ds.plan, ids)
        check_plan_budget(ds.plan, p, data_budget(cfg, p))
        return p.shuffled(cfg.train.seed) if ds.policy == "shuffled" else p
    scores = None
    if ds.policy in ("dance", "shuffled"):
        from dance.data.scoring import score_dataset
        rows = score_dataset(train_ds, (ds.indicator,), cache_path=score_cache, progress=progress)
        scores = np.array([r.score for r in rows], dtype=np.float64)
    draft = plan_for_policy(ds, ds.budget, ids, scores, cfg.train.seed)
    budget = data_budget(cfg, draft)
    return draft if budget == ds.budget else plan_for_policy(ds, budget, ids, scores,
                                                             cfg.train.seed)


def shared_data_plan(cfg: RunConfig, train_ds: SegmentationDataset, out_dir: Path,
                     score_cache: str | Path | None, progress: bool, rt: Runtime
                     ) -> DataSlimmingPlan:
    """Rank 0 scores and plans once; every other rank gets the same plan."""
    cache = Path(score_cache) if score_cache else out_dir / "scores.cache.json"
    data_plan = build_data_plan(cfg, train_ds, cache, progress and rt.is_main) if rt.is_main \
        else None
    if rt.distributed:
        data_plan = DataSlimmingPlan.from_json(
            broadcast_from_main(data_plan.to_json() if rt.is_main else None, rt))
    return data_plan


def make_slimmer(cfg: RunConfig, model: nn.Module) -> NetworkSlimmer | None:
    ns = cfg.network_slimming
    if not ns.enabled:
        return None
    h, w = cfg.train.crop
    return NetworkSlimmer(model, lam=ns.lambda_, prune_at=ns.points(cfg.train.epochs),
                          gate_threshold=ns.gate_threshold, network_budget=ns.network_budget,
                          importance=ns.importance, input_shape=(1, 3, h, w),
                          loss_tolerance=ns.loss_tolerance,
                          max_removals_per_point=ns.max_removals_per_point,
                          channels=ns.channels and ns.network_budget is not None,
                          channel_lambda=ns.channel_lambda,
                          channel_importance=ns.channel_importance,
                          memory_weight=ns.memory_weight,
                          sparsity_after_last_point=ns.sparsity_after_last_point,
                          max_channel_cut=ns.max_channel_cut, revive_dead=ns.revive_dead)


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    # No weight decay on gates: the sparsity term is their only regulariser.
    gates = [p for n, p in model.named_parameters() if ".gates." in f".{n}"]
    gate_ids = {id(p) for p in gates}
    rest = [p for p in model.named_parameters() if id(p[1]) not in gate_ids]
    groups = [{"params": [p for _, p in rest], "weight_decay": cfg.train.weight_decay}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0})
    if cfg.train.optimizer == "adamw":
        return fused_adamw(groups, lr=cfg.train.lr)
    # not fused: torch's fused SGD cannot step parameters with a momentum buffer beside new ones
    # without (a channel-sliced layer after a pruning point)
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)


def fused_adamw(groups: list[dict], **kwargs) -> torch.optim.Optimizer:
    """AdamW with its fused kernel (one kernel for all parameters: 10.6 -> 2.7 ms per step of
    the demo's model on one CPU thread, BENCHMARKS.md) where this torch has it for the device
    (CUDA; the CPU in recent torch), the per-parameter loop elsewhere."""
    device = next((p.device for g in groups for p in g["params"]), None)
    if device is not None and _fused_adamw_steps(device):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # parameters the kernel does not take
            pass
    return torch.optim.AdamW(groups, **kwargs)


_FUSED_ADAMW: dict[str, bool] = {}


def _fused_adamw_steps(device: torch.device) -> bool:
    """Whether a fused AdamW steps on ``device``'s type: some torch versions (2.3 on the CPU)
    accept ``fused=True`` and fail only at the first step. Tried once per device type on one
    scratch parameter."""
    if device.type not in _FUSED_ADAMW:
        p = nn.Parameter(torch.zeros(1, device=device))
        try:
            opt = torch.optim.AdamW([p], fused=True)
            p.grad = torch.ones_like(p)
            opt.step()
            _FUSED_ADAMW[device.type] = True
        except (RuntimeError, TypeError, ValueError):  # NotImplementedError among the first
            _FUSED_ADAMW[device.type] = False
    return _FUSED_ADAMW[device.type]


def finished_line(metrics: dict) -> str:
    """train.log's last line: mIoU, the training FLOPs over the plain run's (``total_cost``:
    a slimmed network's cheaper steps counted) and, where network slimming makes it differ,
    the data plan's cost priced on the original network (``realised_cost``), and seconds."""
    total, plan = metrics["total_cost"], metrics["realised_cost"]
    data = f" (data plan {plan:.3f} on the original network)" if abs(plan - total) > 5e-4 else ""
    return (f"finished: mIoU {metrics['miou']:.2f}, training FLOPs {total:.3f} of the plain "
            f"run's{data}, {metrics['train_seconds']:.1f} s")


def stretched_epochs(epochs: int, stretch: float) -> int:
    """The epochs of a run of ``epochs`` stretched by ``stretch`` (`stretched`)."""
    return max(epochs, round(epochs * stretch))


def stretched(cfg: RunConfig) -> tuple[RunConfig, int]:
    """The config a run trains by, and the plain recipe's epochs its costs are priced against.

    With ``data_slimming.stretch`` above 1 (and a data plan), the run trains
    ``round(stretch x train.epochs)`` epochs at a budget scaled down by as much, so its training
    FLOPs are still ``budget`` x those of the plain run of ``train.epochs``: every epoch-based
    part of the run (the plan's schedule, the learning rate, the pruning points) follows the
    longer run (docs/method.md#stretch). Otherwise ``cfg`` itself."""
    ds, epochs = cfg.data_slimming, cfg.train.epochs
    if not ds.enabled or ds.stretch == 1.0:
        return cfg, epochs
    out = cfg.model_copy(deep=True)
    longer = stretched_epochs(epochs, ds.stretch)
    out.train.epochs = longer
    out.data_slimming.budget = ds.budget * epochs / longer
    out.data_slimming.stretch = 1.0
    return out, epochs


def horizon_epochs(cfg: RunConfig) -> float:
    """How many epochs the recipe asks for: all of them, or a fraction (``short`` runs, whose
    learning-rate schedule spans the shorter run: docs/method.md#run-kinds)."""
    return cfg.train.epochs * cfg.train.steps_fraction


def budget_horizon(cfg: RunConfig, sampler: BucketedBatchSampler, n_images: int,
                   step_cost=None, from_epoch: int = 0, spent: float = 0.0,
                   full_cost: float | None = None, epoch_factor=None) -> float:
    """How many epochs (fractional) the run trains, its learning-rate schedule spanning them.

    A slimmed data plan predicts its cost from scales alone; the batches really trained cost
    a little more or less: crops are rounded to multiples of 8 pixels, strided layers round
    small inputs up, and a scale bucket too small for a batch is padded. With
    ``data_slimming.trim_to_budget``, the batches that ``sampler`` gives from ``from_epoch`` on
    (all ranks' together) are laid out step by step (it is deterministic) after ``spent`` (what
    was trained before, in images at the full crop), and the run stops at the step where the total reaches
    the budget times the plain run's, so every run of a compare spends the same compute
    (docs/method.md#cost-accounting). ``step_cost(hw)`` is the cost of one image at crop ``hw``
    (the model's training FLOPs; input pixels when None), ``full_cost`` that of an image at
    the full crop (default ``step_cost(crop)``); ``epoch_factor(epoch)``, when given, scales the
    steps of each epoch to come (a joint budget: how much slimmer the network is expected to be
    then, `network_outlook`). The recipe's length is the limit."""
    base = horizon_epochs(cfg)
    ds, tc = cfg.data_slimming, cfg.train
    if not (ds.enabled and ds.trim_to_budget):
        return base
    crop = tuple(tc.crop)
    step_cost = step_cost or (lambda hw: float(hw[0] * hw[1]))
    full = step_cost(crop) if full_cost is None else full_cost
    allowed = ds.budget * base * n_images
    units: dict[float, float] = {}
    for epoch in range(from_epoch, math.ceil(base - 1e-9)):
        batches = sampler.epoch_batches(epoch)
        factor = 1.0 if epoch_factor is None else epoch_factor(epoch)
        for i, batch in enumerate(batches):
            scale = batch[0][1]
            if scale not in units:
                units[scale] = step_cost(scaled_crop(crop, scale)) / full
            step = units[scale] * len(batch) * factor
            spent += step
            if spent > allowed * (1 + 1e-9):  # stop before or after this step, whichever is nearer
                over, under = spent - allowed, allowed - (spent - step)
                return min(base, epoch + (i + (over < under)) / len(batches))
    return base


def network_outlook(cfg: RunConfig, slimmer: NetworkSlimmer):
    """For the trim of a joint budget: ``epoch -> factor``, how much cheaper than now the model
    is expected to be in that epoch of the recipe: the network's expected FLOPs fraction there
    (``NetworkSlimmer.expected_fraction``, the pruning points at their share of the recipe's
    epochs) over the target of the last point done (at most 1; 1 once every point is done). So
    the horizon does not shrink for steps the pruning points will make cheaper, and the
    learning-rate schedule and the points keep their places in the run."""
    ns, epochs = cfg.network_slimming, cfg.train.epochs
    reached = slimmer.target_fraction(max(slimmer.done)) if slimmer.done else 1.0
    points = ns.points(epochs)

    def factor(epoch: int) -> float:
        ahead = NetworkSlimmer.expected_fraction(points, ns.network_budget,
                                                 min(epoch, epochs - 1) / epochs,
                                                 min(epoch + 1, epochs) / epochs)
        return min(1.0, ahead / reached)
    return factor


def set_horizon(run: Run, state: TrainState, epoch: int) -> bool:
    """Before each epoch: the run's horizon from what it has spent and the current plan
    (`budget_horizon`; a re-plan moves it a little), and whether ``epoch`` is still to train."""
    together = joint(run.cfg)
    spent = state.ledger.actual_units if together else state.ledger.train_units
    if run.rt.distributed:
        spent = float(all_reduce_(torch.tensor([spent], dtype=torch.float64).to(run.rt.device),
                                  run.rt).item())
    reference = run.reference if run.reference is not None else run.model
    # the data plan's cost is priced on the original architecture; a joint budget prices the
    # steps to come on the model as it is now, against the original's full-crop step
    model = run.model if together else reference
    run.sampler.plan = state.plan  # the plan the coming epochs train from
    run.horizon = budget_horizon(run.cfg, run.sampler, run.n_images,
                                 lambda hw: count_gflops(model, (1, 3, *hw), backward=True),
                                 from_epoch=epoch, spent=spent,
                                 full_cost=count_gflops(reference, (1, 3, *run.cfg.train.crop),
                                                        backward=True),
                                 epoch_factor=(network_outlook(run.cfg, run.slimmer)
                                               if together else None))
    return epoch < math.ceil(run.horizon - 1e-9)


def scheduled_lr(cfg: RunConfig, progress: float) -> float:
    """The learning rate at ``progress`` (0..1) of the run: a linear warm-up over
    ``warmup_fraction``, then poly, cosine or linear decay to zero at the end."""
    tc = cfg.train
    if progress < tc.warmup_fraction:
        return tc.lr * (progress + 1e-3) / tc.warmup_fraction
    t = min(1.0, (progress - tc.warmup_fraction) / (1.0 - tc.warmup_fraction))
    if tc.lr_schedule == "cosine":
        return tc.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if tc.lr_schedule == "linear":
        return tc.lr * (1.0 - t)
    return tc.lr * (1.0 - t) ** tc.poly_power


def resume_run(ckpt_dir: Path, cfg: RunConfig, model: nn.Module, slimmer: NetworkSlimmer | None,
               state: TrainState, rt: Runtime, fingerprint: dict, force: bool
               ) -> tuple[dict, dict] | None:
    """Restore weights, architecture, slimmer, RNG and ``state`` from the run's checkpoint;
    returns ``(tensors, saved state.json)`` for the optimizer, or None when there is none."""
    if rt.is_main:
        ckpt.finish_swap(ckpt_dir)  # a kill during the last save may have left it half done
    broadcast_from_main(None, rt)  # the other ranks read only after that
    if ckpt.find_checkpoint(ckpt_dir) is None:
        if rt.is_main:
            print(f"dance train: no checkpoint in {ckpt_dir}, starting from scratch",
                  file=sys.stderr)
        return None
    tensors, saved, folder = ckpt.read_checkpoint(ckpt_dir)
    source = folder / ckpt.STATE_FILE
    arch = saved["arch"]
    if arch["name"] != cfg.model.name:
        raise DanceError(f"{folder}: checkpoint is of model {arch['name']!r}, "
                         f"the config asks for {cfg.model.name!r}")
    differs = fingerprint_diff(saved.get("fingerprint"), fingerprint)
    if differs and not force:
        raise DanceError(f"{folder}: the run was started with a different "
                         f"{describe_diff(differs)}; pass --force to continue it anyway, or "
                         "choose another --out")
    try:
        if arch.get("removed"):
            from dance.network.channels import replay
            replay(model, arch["removed"])
        ckpt.load_weights(model, tensors, folder / ckpt.MODEL_FILE)
        restored = TrainState.from_json(saved["train_state"], str(source))
        restored.forced_resume = restored.forced_resume or bool(differs)
        if slimmer is not None and saved.get("slimmer"):
            slimmer.load_state_dict(saved["slimmer"])
    except DanceError as e:
        text = str(e)
        raise DanceError(text if text.startswith(str(folder)) else f"{source}: {text}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        # checksummed, so this is a state written by another version of dance, not damage
        raise DanceError(f"{source}: checkpoint state does not fit this version of dance "
                         f"({type(e).__name__}: {str(e)[:100]})") from None
    state.__dict__.update(restored.__dict__)
    ckpt.restore_rng(tensors)
    return tensors, saved


def start_run(cfg: RunConfig, rt: Runtime, model: nn.Module, slimmer: NetworkSlimmer | None,
              train_ds: SegmentationDataset, state: TrainState, saved: tuple | None,
              out_dir: Path, progress: bool, fingerprint: dict, plain_epochs: int) -> Run:
    """Model on its device, optimizer (restored on resume), loader over the plan, probe batches."""
    tc = cfg.train
    model.to(rt.device)
    to_layout(model, cfg, rt)
    optimizer = make_optimizer(model, cfg)
    if saved is not None:
        tensors, saved_state = saved
        try:
            ckpt.load_optimizer_state(optimizer, model, tensors, saved_state["optimizer"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise DanceError(f"{out_dir / 'checkpoint'}: its optimizer state does not fit the "
                             f"{tc.optimizer} optimizer of this run ({type(e).__name__}: "
                             f"{str(e)[:100]})") from None
    transform = TrainTransform(tuple(tc.crop), tuple(tc.scale_range),
                               jitter_follows_scale=tc.jitter_follows_scale)
    cache = DecodeCache(tc.decode_cache, tc.decode_cache_gb) if tc.decode_cache else None
    data = PlannedDataset(train_ds, transform, seed=tc.seed, on_bad_sample=tc.on_bad_sample,
                          reduced_decode=tc.reduced_decode, decode_cache=cache)
    sampler = BucketedBatchSampler(state.plan, tc.batch_size,
                                   tc.epochs, seed=tc.seed, rank=rt.rank,
                                   world_size=rt.world_size,
                                   multigrid=cfg.data_slimming.enabled and cfg.data_slimming.multigrid)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=tc.workers,
                        collate_fn=collate_planned, pin_memory=rt.device.type == "cuda",
                        # the batch sampler runs in this process, so workers can live across
                        # epochs (and re-plans): no worker start-up cost each epoch
                        persistent_workers=tc.workers > 0)
    ns = cfg.network_slimming
    probe = (probe_batches(data, ns.probe_batches * tc.batch_size, tc.batch_size, tc.seed)
             if slimmer is not None else [])
    return Run(cfg=cfg, rt=rt, model=model, optimizer=optimizer, ddp_model=wrap_ddp(model, rt),
               sampler=sampler, loader=loader, n_images=len(train_ds),
               ckpt_dir=out_dir / "checkpoint", slimmer=slimmer, probe=probe,
               show=progress and rt.is_main, meter=EnergyMeter(rt.device),
               timer=PhaseTimer(rt.device if tc.profile else None),
               tb=_Tensorboard(out_dir / "tensorboard") if rt.is_main else None,
               fingerprint=fingerprint, class_names=list(train_ds.class_names),
               plain_epochs=plain_epochs)


def probe_batches(data: PlannedDataset, n_images: int, batch_size: int, seed: int):
    """Held-out training batches at full scale for measuring branch importance."""
    g = np.random.default_rng(seed + 7919)
    idx = g.choice(len(data.dataset), size=min(n_images, len(data.dataset)), replace=False)
    items = [data[(int(i), 1.0, -1)] for i in idx]
    items = [it for it in items if it is not None]
    batches = []
    for k in range(0, len(items), batch_size):
        b = collate_planned(items[k:k + batch_size])
        batches.append((b["image"], b["mask"]))
    return batches


def gate_values(model: nn.Module) -> dict[str, float]:
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, MultiScaleModule):
            for name in m.branch_names():
                out[f"{path}.{name}" if path else name] = float(m.gate(name).detach())
    return out


LOG_FILE = "train.log"


def epoch_line(record: dict, horizon: float) -> str:
    """One ``train.log`` line per finished epoch: what the progress bar showed, kept."""
    loss = "n/a" if record["loss"] is None else f"{record['loss']:.4f}"
    line = (f"epoch {record['epoch']}/{horizon:g}  step {record['step']}  "
            f"loss {loss}  lr {record['lr']:.3g}  "
            f"scale {record['mean_scale']:.3f}  realised cost {record['realised_cost']:.3f}")
    if record["val_miou"] is not None:
        line += f"  val mIoU {record['val_miou']:.2f}"
    return line


def text_log(out_dir: Path, line: str) -> None:
    """Append a time-stamped line to the run's ``train.log`` (plain text, no progress-bar
    carriage returns, so it reads the same in a terminal, a file or a CI log)."""
    with open(out_dir / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")


def log_epoch(run: Run, record: dict) -> None:
    if run.tb is None:
        return
    run.tb.scalars(record["epoch"], **{
        "epoch/realised_cost": record["realised_cost"],
        **({"epoch/loss": record["loss"]} if record["loss"] else {}),
        **({"val/miou": record["val_miou"]} if record["val_miou"] is not None else {}),
        **{f"gates/{k}": v for k, v in record["gates"].items()}})


def check_finite(run: Run, epoch: int) -> None:
    """Stop (every rank alike) when a weight, buffer or optimizer tensor is NaN or inf, so a
    broken model never replaces the last good checkpoint."""
    tensors = [(n, t) for n, t in run.model.state_dict().items() if t.is_floating_point()]
    tensors += [(f"optimizer state of {n}", t) for p, st in run.optimizer.state.items()
                for n, t in st.items() if torch.is_tensor(t) and t.is_floating_point()]
    bad = next((n for n, t in tensors if not torch.isfinite(t).all()), None)
    flag = all_reduce_(torch.tensor([0.0 if bad is None else 1.0], device=run.rt.device), run.rt)
    if flag.item() > 0:
        raise DanceError(f"weights became non-finite ({bad or 'on another rank'}) in epoch "
                         f"{epoch + 1}; training stopped (lower train.lr?); "
                         f"{last_good(run.ckpt_dir)}")


def last_good(ckpt_dir: Path) -> str:
    """What a stopped run leaves to resume from, said honestly."""
    try:
        saved, folder = ckpt.read_state(ckpt_dir)
        epoch = saved["train_state"]["epoch"]
    except (DanceError, KeyError, TypeError):
        return "no checkpoint was written yet"
    return f"the last good checkpoint ({folder}, after epoch {epoch}) is intact"


def _model_state(run: Run) -> dict:
    """What every checkpoint of a run says about its model: enough to evaluate, predict and
    export it (the architecture is added by ``save_checkpoint``)."""
    return {"config": run.cfg.to_dict(), "fingerprint": run.fingerprint,
            "classes": run.class_names}


def save_run_checkpoint(run: Run, state: TrainState) -> None:
    ckpt.save_checkpoint(run.ckpt_dir, run.model, {
        **_model_state(run), "train_state": state.to_json(),
        "slimmer": run.slimmer.state_dict() if run.slimmer is not None else None,
    }, run.optimizer)


BEST = "best"  # the run folder's checkpoint of the best validated model


def best_validation(history: list[dict]) -> dict | None:
    """The record with the highest ``val_miou`` (ties go to the later, more slimmed model), or
    None when nothing was validated."""
    best = None
    for r in history:
        if r.get("val_miou") is not None and (best is None or r["val_miou"] >= best["val_miou"]):
            best = r
    return best


def save_best(run: Run, epoch: int, miou: float) -> None:
    """``best/``: the model with the highest validation mIoU so far, a checkpoint folder like
    ``checkpoint/`` (no optimizer state), with ``best`` (epoch, mIoU) in its state.json."""
    ckpt.save_checkpoint(run.ckpt_dir.parent / BEST, run.model, {
        **_model_state(run), "best": {"epoch": epoch, "val_miou": miou}})


def joint_budget_note(total_cost: float, budget: float, plan_budget: float) -> str | None:
    """A warning when a run's training FLOPs miss its joint budget by more than 3%, with the
    cause: a data plan made at its whole cost (1) cannot spend what a network slimmed further
    than the data can absorb saves; otherwise the network landed off its expected mean FLOPs
    fraction."""
    off = total_cost / budget - 1
    if abs(off) <= 0.03:
        return None
    if off < 0 and plan_budget >= 1.0:
        why = ("the data plan is whole, so the data cannot spend all the slimmer network "
               "saves")
    else:
        why = f"the network landed {'below' if off < 0 else 'above'} its expected mean FLOPs fraction"
    return (f"training FLOPs {total_cost:.3f} of the plain run are {off:+.1%} off the joint "
            f"budget {budget:.3f} ({why})")


def final_metrics(run: Run, state: TrainState, plan0: DataSlimmingPlan, val_metrics: dict,
                  wall_seconds: float, resumed: bool) -> dict:
    """metrics.json: validation, cost summed over ranks, energy, and what the run did."""
    rt, model, ledger = run.rt, run.model, state.ledger
    summed = ("train_gflops", "plan_gflops", "full_gflops", "images_seen", "train_mpixels",
              "full_mpixels", "train_units")
    totals = torch.tensor([getattr(ledger, k) for k in summed], dtype=torch.float64)
    if rt.distributed:
        totals = all_reduce_(totals.to(rt.device), rt).cpu()
    # every rank's steps: the cost, its note and the pixel ratio all come from the same sums
    # priced against the plain run of the whole recipe, however many epochs this one trained
    total = CostLedger(**dict(zip(summed, (float(v) for v in totals))),
                       plain_scale=run.plain_epochs / max(ledger.epochs_trained, 1e-12))
    train_gflops, images_seen = total.train_gflops, total.images_seen
    if run.tb is not None:
        run.tb.scalars(run.cfg.train.epochs, **{"val/miou": val_metrics["miou"]})
        run.tb.close()
    if run.meter.kind == "estimated":
        run.meter.add_estimate(train_gflops)
    train_seconds = wall_seconds - ledger.accounting_seconds
    h, w = run.cfg.train.crop
    # the plan's and the budget's costs per epoch of this run, over the plain recipe's epochs
    longer = run.cfg.train.epochs / run.plain_epochs
    planned = plan0.predicted_cost * run.cfg.train.steps_fraction * longer
    if joint(run.cfg):  # the budget bounds the whole run: check that, not the data side alone
        cost_note = joint_budget_note(total.total_cost, run.cfg.data_slimming.budget * longer,
                                      plan0.budget)
    else:
        cost_note = total.off_plan(planned)
    if cost_note and run.rt.is_main:
        print(f"dance train: warning: {cost_note}", file=sys.stderr)
    return {
        **val_metrics,
        "train_gflops_total": train_gflops,
        "train_seconds": train_seconds,
        "images_per_second": images_seen / max(train_seconds, 1e-9),
        "accounting_seconds": ledger.accounting_seconds,
        "wall_seconds": wall_seconds,
        "energy_joules": run.meter.joules,
        "energy_kind": run.meter.kind,
        "planned_cost": planned,
        "trained_epochs": ledger.epochs_trained,
        "realised_cost": total.realised_cost,
        "realised_pixel_cost": total.realised_pixel_cost,
        "total_cost": total.total_cost,
        "cost_note": cost_note,
        "removed_branches": model.dance_arch.removed_branches,
        "removed_channels": sum(len(r["channels"]) for r in model.dance_arch.removed
                                if isinstance(r, dict)),
        "skipped_samples": len(state.skipped),
        "skipped_files": sorted(state.skipped),
        "model": run.cfg.model.name,
        "device": str(rt.device),
        "world_size": rt.world_size,
        "phase_seconds": run.timer.to_json(),
        "step_seconds_by_shape": {k: {"steps": n, "seconds": t, "ms_per_step": 1e3 * t / n}
                                  for k, (n, t) in sorted(run.step_seconds.items())},
        "resumed": resumed,
        "forced_resume": state.forced_resume,
        "fingerprint": run.fingerprint,
        "branches": [{"name": b.name, "gate": b.gate, "gflops_share": b.gflops_share}
                     for b in branches(model, (1, 3, h, w))],
        "prune_events": state.prune_events,
        "history": state.history,
        "plan_summary": {k: v for k, v in plan0.to_json().items() if k != "per_image"},
    }


def evaluate_run(model: nn.Module, val_ds: SegmentationDataset, cfg: RunConfig, rt: Runtime,
                 show: bool) -> dict:
    """Validation mIoU and inference cost of the model as it stands (the slimmed one)."""
    tc = cfg.train
    model.eval()
    fields, _ = eval_fields(model, val_ds, device=rt.device, mode=tc.eval_mode,
                            crop=tuple(tc.eval_crop or tc.crop),
                            amp=tc.amp and rt.device.type == "cuda", progress=show,
                            rank=rt.rank, world_size=rt.world_size)
    model.train()
    return fields


class _Tensorboard:
    """TensorBoard scalars, written by rank 0 only."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.w = SummaryWriter(str(folder))

    def scalars(self, step: int, **values: float) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def close(self) -> None:
        self.w.close()


def cli_train(args) -> int:
    overrides = list(args.overrides)
    if args.on_bad_sample:
        overrides.append(f"train.on_bad_sample={args.on_bad_sample}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if args.force and not args.resume:
        raise DanceError("--force only applies to --resume")
    metrics = train(cfg, out, resume=args.resume, progress=not args.quiet, force=args.force)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"mIoU {metrics['miou']:.2f}  train {metrics['train_gflops_total']:.1f} GFLOPs "
              f"(realised cost {metrics['realised_cost']:.3f} of plain, planned "
              f"{metrics['planned_cost']:.3f})  {metrics['train_seconds']:.1f} s  "
              f"removed {metrics['removed_branches'] or 'none'}"
              + (f" and {metrics['removed_channels']} channels" if metrics["removed_channels"]
                 else "") + f"  -> {out / 'metrics.json'}")
    return 0
