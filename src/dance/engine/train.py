"""The training loop (SPEC §1.2, §1.3, §2, §4 metrics.json, §5).

One loop serves the plain run and DANCE: with both slimming parts disabled the data plan is the
plain run (every image, full scale, weight 1) and no slimmer exists. Data flows one way: dataset ->
scores -> plan -> sampler/loader -> this loop <- slimmer. The loop asks the plan what each epoch
looks like and the slimmer when to prune; neither reaches back in here.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dance.data.datasets import SegmentationDataset, open_dataset
from dance.data.loader import PlannedDataset, collate_planned
from dance.data.plan import DataSlimmingPlan, plan, progressive_plan, uniform_plan
from dance.data.sampler import BucketedBatchSampler
from dance.data.transforms import TrainTransform
from dance.engine import checkpoint as ckpt
from dance.engine.config import RunConfig, load_config
from dance.engine.cost import EnergyMeter, PhaseTimer
from dance.engine.evaluate import eval_fields
from dance.engine.loss import weighted_cross_entropy
from dance.errors import DanceError
from dance.fileio import atomic_write_json
from dance.network.flops import count_gflops
from dance.network.gates import branches
from dance.network.registry import build_model
from dance.network.slimming import NetworkSlimmer, rebuild_optimizer


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DanceError(f"train.device={name} but CUDA is not available on this machine")
    return torch.device(name)


def setup_runtime(device_name: str) -> Runtime:
    """Single process, or one process of a ``torchrun`` job (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(pick_device(device_name))
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world, local)


def _all_reduce_(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def build_data_plan(cfg: RunConfig, train_ds: SegmentationDataset, score_cache: Path | None,
                    progress: bool) -> DataSlimmingPlan:
    """The data side's decision for this run (SPEC §1.2, §4 compare run kinds)."""
    ids = [s.id for s in train_ds.samples]
    ds = cfg.data_slimming
    if not ds.enabled:
        return plan(np.zeros(len(ids)), 1.0, ids)
    if ds.policy == "uniform":
        return uniform_plan(ids, ds.budget)
    if ds.policy == "progressive":
        return progressive_plan(ids, ds.budget)
    from dance.data.scoring import score_dataset
    rows = score_dataset(train_ds, (ds.indicator,), cache_path=score_cache, progress=progress)
    scores = np.array([r.score for r in rows], dtype=np.float64)
    p = plan(scores, ds.budget, ids, schedule=ds.schedule, drop=ds.drop,
             downsample=ds.downsample, weighting=ds.weighting, keep_floor=ds.keep_floor)
    if ds.policy == "shuffled":
        p = p.shuffled(cfg.train.seed)
    return p


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    # No weight decay on gates: the sparsity term is their only regulariser (SPEC §1.3).
    gates = [p for n, p in model.named_parameters() if ".gates." in f".{n}"]
    gate_ids = {id(p) for p in gates}
    rest = [p for p in model.named_parameters() if id(p[1]) not in gate_ids]
    groups = [{"params": [p for _, p in rest], "weight_decay": cfg.train.weight_decay}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)


def _poly_lr(cfg: RunConfig, progress: float) -> float:
    return cfg.train.lr * max(0.0, 1.0 - progress) ** cfg.train.poly_power


def _probe_batches(data: PlannedDataset, n_images: int, batch_size: int, seed: int):
    """Held-out training batches at full scale for measuring branch importance (SPEC §1.3)."""
    g = np.random.default_rng(seed + 7919)
    idx = g.choice(len(data.dataset), size=min(n_images, len(data.dataset)), replace=False)
    items = [data[(int(i), 1.0, -1)] for i in idx]
    items = [it for it in items if it is not None]
    batches = []
    for k in range(0, len(items), batch_size):
        b = collate_planned(items[k:k + batch_size])
        batches.append((b["image"], b["mask"]))
    return batches


def _gate_values(model: nn.Module) -> dict[str, float]:
    from dance.network.gates import MultiScaleModule
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, MultiScaleModule):
            for name in m.branch_names():
                out[f"{path}.{name}" if path else name] = float(m.gate(name).detach())
    return out


def _wrap(model: nn.Module, rt: Runtime) -> nn.Module:
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


class _Tensorboard:
    """TensorBoard scalars, written by rank 0 only (the other ranks pass no folder)."""

    def __init__(self, folder: Path | None):
        self.w = None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.w = SummaryWriter(str(folder))

    def scalars(self, step: int, **values: float) -> None:
        if self.w is not None:
            for k, v in values.items():
                self.w.add_scalar(k, v, step)

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          score_cache: str | Path | None = None) -> dict:
    """Train one run into ``out_dir``; returns (and writes) its metrics.json content."""
    out_dir = Path(out_dir)
    rt = setup_runtime(cfg.train.device)
    tc = cfg.train
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    show = progress and rt.is_main
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoint"

    train_ds = open_dataset(cfg.dataset.name, cfg.dataset.root, cfg.dataset.train_split)
    val_ds = open_dataset(cfg.dataset.name, cfg.dataset.root, cfg.dataset.val_split)
    model = build_model(cfg.model.name, train_ds.num_classes, cfg.model.pretrained_backbone,
                        **cfg.model.options)
    arch_name = cfg.model.name
    cache = Path(score_cache) if score_cache else out_dir / "scores.cache.json"
    if rt.is_main:
        data_plan = build_data_plan(cfg, train_ds, cache, show)
    if rt.distributed:  # rank 0 scores once; the others get the same plan
        import torch.distributed as dist
        box = [data_plan.to_json() if rt.is_main else None]
        dist.broadcast_object_list(box, src=0)
        data_plan = DataSlimmingPlan.from_json(box[0])
    plan0 = data_plan
    ns = cfg.network_slimming
    h, w = tc.crop
    slimmer = (NetworkSlimmer(model, lam=ns.lambda_, prune_at=ns.prune_at,
                              gate_threshold=ns.gate_threshold, network_budget=ns.network_budget,
                              importance=ns.importance, input_shape=(1, 3, h, w),
                              loss_tolerance=ns.loss_tolerance,
                              max_removals_per_point=ns.max_removals_per_point)
               if ns.enabled else None)

    n_images = len(train_ds)
    state = {"epoch": 0, "global_step": 0, "train_gflops": 0.0, "full_gflops": 0.0,
             "wall_seconds": 0.0, "accounting_seconds": 0.0, "images_seen": 0,
             "hardness": [float("nan")] * n_images, "skipped": [], "history": [],
             "prune_events": [], "plan": data_plan.to_json(), "phases": {}}
    resumed = False
    if resume and (ckpt_dir.exists() or ckpt_dir.with_name("checkpoint.old").exists()):
        tensors, saved, folder = ckpt.read_checkpoint(ckpt_dir)
        if saved["arch"]["name"] != arch_name:
            raise DanceError(f"{folder}: checkpoint is of model {saved['arch']['name']!r}, "
                             f"the config asks for {arch_name!r}")
        if saved["arch"].get("removed"):
            from dance.network.gates import remove_branches
            remove_branches(model, saved["arch"]["removed"])
        ckpt.load_weights(model, tensors, folder / ckpt.MODEL_FILE)
        state.update(saved["train_state"])
        data_plan = DataSlimmingPlan.from_json(state["plan"])
        if slimmer is not None and saved.get("slimmer"):
            slimmer.load_state_dict(saved["slimmer"])
        torch.set_rng_state(tensors["rng/torch"])
        resumed = True
    elif resume and rt.is_main:
        print(f"dance train: no checkpoint in {ckpt_dir}, starting from scratch", file=sys.stderr)

    model.to(rt.device)
    optimizer = make_optimizer(model, cfg)
    if resumed:
        ckpt.load_optimizer_state(optimizer, model, tensors, saved["optimizer"])
    ddp_model = _wrap(model, rt)

    data = PlannedDataset(train_ds, TrainTransform(tuple(tc.crop), tuple(tc.scale_range)),
                          seed=tc.seed, on_bad_sample=tc.on_bad_sample)
    sampler = BucketedBatchSampler(data_plan, tc.batch_size, tc.epochs, seed=tc.seed,
                                   rank=rt.rank, world_size=rt.world_size)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=tc.workers,
                        collate_fn=collate_planned, pin_memory=rt.device.type == "cuda",
                        # the batch sampler runs in this process, so workers can live across
                        # epochs (and re-plans): no worker start-up cost each epoch
                        persistent_workers=tc.workers > 0)
    probe = (_probe_batches(data, ns.probe_batches * tc.batch_size, tc.batch_size, tc.seed)
             if slimmer is not None else [])
    use_amp = tc.amp and rt.device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
    tb = _Tensorboard(out_dir / "tensorboard" if rt.is_main else None)
    timer = PhaseTimer()
    meter = EnergyMeter(rt.device)
    hardness = np.array(state["hardness"], dtype=np.float64)
    skipped = set(state["skipped"])
    ds_cfg = cfg.data_slimming

    def loss_fn(logits, masks):
        return weighted_cross_entropy(logits.float(), masks)[0]

    meter.start()
    t_start = time.perf_counter() - state["wall_seconds"]
    for epoch in range(state["epoch"], tc.epochs):
        sampler.plan = data_plan
        sampler.set_epoch(epoch)
        policy = data_plan.epoch_policy(epoch, tc.epochs)
        weights = torch.as_tensor(policy.weight, dtype=torch.float32)
        kept = policy.keep_prob > 0
        mean_scale = float((policy.scale * policy.keep_prob).sum() / policy.keep_prob.sum()) \
            if kept.any() else 1.0
        mean_scale = round(mean_scale * 8) / 8  # on the scale grid: FLOPs shares stay cached
        epoch_batches = sampler.epoch_batches(epoch)
        images_this_epoch = sum(len(b) for b in epoch_batches)
        full_factor = n_images / max(images_this_epoch, 1)  # "every image kept" (SPEC §4)
        steps = len(sampler)
        loss_sum = torch.zeros(n_images, dtype=torch.float64)
        loss_cnt = torch.zeros(n_images, dtype=torch.float64)
        ddp_model.train()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not show,
                   leave=False, file=sys.stderr)
        it = iter(loader)
        for i in range(steps):
            with timer.phase("data"):
                batch = next(it)
            skipped.update(batch.get("skipped", []))
            progress_now = (epoch + (i + 1) / steps) / tc.epochs
            lr = _poly_lr(cfg, (epoch + i / steps) / tc.epochs)
            for g in optimizer.param_groups:
                g["lr"] = lr
            if batch["image"].shape[0] == 0:  # every sample of the batch was skipped
                bar.update(1)
                continue
            with timer.phase("step"):
                x = batch["image"].to(rt.device, non_blocking=True)
                y = batch["mask"].to(rt.device, non_blocking=True)
                idx = torch.as_tensor(batch["index"])
                with autocast():
                    logits = ddp_model(x)
                loss, per_image = weighted_cross_entropy(logits.float(), y,
                                                         weights[idx].to(rt.device))
                total = loss
                if slimmer is not None:
                    total = total + slimmer.sparsity_loss(model, mean_scale)
                if not torch.isfinite(total):
                    raise DanceError(
                        f"loss became {total.item()} at epoch {epoch + 1} step {i + 1}; training "
                        f"stopped (lower train.lr?); the last good checkpoint in {ckpt_dir} is intact")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
            # cost accounting (SPEC §2) is measurement, not training: its time (a FLOPs count per
            # new architecture and shape) is kept out of train_seconds and reported apart
            t_acc = time.perf_counter()
            n, _, bh, bw = x.shape
            state["train_gflops"] += count_gflops(model, (1, 3, bh, bw), backward=True) * n
            state["full_gflops"] += (count_gflops(model, (1, 3, h, w), backward=True) * n
                                     * full_factor)
            state["accounting_seconds"] += time.perf_counter() - t_acc
            state["images_seen"] += n
            state["global_step"] += 1
            loss_sum.index_add_(0, idx, per_image.double().cpu())
            loss_cnt.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", scale=f"{bw / w:.3f}")
            bar.update(1)
            if rt.is_main:
                tb.scalars(state["global_step"], **{"train/loss": loss_value, "train/lr": lr,
                                                    "train/scale": bw / w})
            if slimmer is not None and slimmer.due(progress_now):
                with timer.phase("prune"):
                    event = slimmer.prune(model, probe, loss_fn, progress_now)
                    if rt.distributed:  # every rank must remove the same branches
                        import torch.distributed as dist
                        box = [event.to_json()]
                        dist.broadcast_object_list(box, src=0)
                        if sorted(box[0]["removed"]) != sorted(event.removed):
                            raise RuntimeError("ranks disagreed on the branches to remove")
                    optimizer = rebuild_optimizer(optimizer, model)
                    ddp_model = _wrap(model, rt)
                state["prune_events"].append(event.to_json())
                if show and event.removed:
                    tqdm.write(f"[prune @ {progress_now:.0%}] {event.message}", file=sys.stderr)
        bar.close()

        # epoch end: hardness EMA (SPEC §1.2 adaptive), re-plan, log, checkpoint
        _all_reduce_(loss_sum, rt)
        _all_reduce_(loss_cnt, rt)
        seen = (loss_cnt > 0).numpy()
        mean_loss = (loss_sum / loss_cnt.clamp(min=1)).numpy()
        m = ds_cfg.hardness_momentum
        fresh = seen & np.isnan(hardness)
        hardness[fresh] = mean_loss[fresh]
        upd = seen & ~fresh
        hardness[upd] = m * hardness[upd] + (1 - m) * mean_loss[upd]
        if (ds_cfg.enabled and ds_cfg.adaptive and ds_cfg.policy == "dance"
                and np.isfinite(hardness).any()):
            filled = np.where(np.isfinite(hardness), hardness, np.nanmedian(hardness))
            data_plan = plan0.replan(filled, alpha=ds_cfg.hardness_alpha)
        state["epoch"] = epoch + 1
        state["wall_seconds"] = time.perf_counter() - t_start
        state["hardness"] = [float(v) for v in hardness]
        state["skipped"] = sorted(skipped)
        state["plan"] = data_plan.to_json()
        gates = _gate_values(model)
        val = None
        if tc.eval_every and (epoch + 1) % tc.eval_every == 0 and epoch + 1 < tc.epochs:
            with timer.phase("eval"):
                val = _evaluate(model, val_ds, cfg, rt, show)["miou"]
        record = {"epoch": epoch + 1, "step": state["global_step"],
                  "loss": float(np.nanmean(np.where(seen, mean_loss, np.nan))) if seen.any()
                  else None,
                  "lr": lr, "mean_scale": mean_scale, "gates": gates,
                  "realised_cost": state["train_gflops"] / max(state["full_gflops"], 1e-12),
                  "val_miou": val}
        state["history"].append(record)
        if rt.is_main:
            tb.scalars(epoch + 1, **{"epoch/realised_cost": record["realised_cost"],
                                     **({"epoch/loss": record["loss"]} if record["loss"] else {}),
                                     **({"val/miou": val} if val is not None else {}),
                                     **{f"gates/{k}": v for k, v in gates.items()}})
            with timer.phase("checkpoint"):
                state["phases"] = timer.to_json()
                ckpt.save_checkpoint(ckpt_dir, model, {
                    "config": cfg.to_dict(), "train_state": state,
                    "slimmer": slimmer.state_dict() if slimmer is not None else None,
                }, optimizer)
    meter.stop()
    wall_seconds = time.perf_counter() - t_start
    train_seconds = wall_seconds - state["accounting_seconds"]

    totals = torch.tensor([state["train_gflops"], state["full_gflops"], state["images_seen"]],
                          dtype=torch.float64)
    _all_reduce_(totals, rt)
    train_gflops, full_gflops, images_seen = (float(v) for v in totals)
    with timer.phase("eval"):
        val_metrics = _evaluate(model, val_ds, cfg, rt, show)
    tb.scalars(tc.epochs, **{"val/miou": val_metrics["miou"]})
    tb.close()
    if meter.kind == "estimated":
        meter.add_estimate(train_gflops)
    metrics = {
        **val_metrics,
        "train_gflops_total": train_gflops,
        "train_seconds": train_seconds,
        "images_per_second": images_seen / max(train_seconds, 1e-9),
        "accounting_seconds": state["accounting_seconds"],
        "wall_seconds": wall_seconds,
        "energy_joules": meter.joules,
        "energy_kind": meter.kind,
        "planned_cost": plan0.predicted_cost,
        "realised_cost": train_gflops / max(full_gflops, 1e-12),
        "removed_branches": list(model.dance_arch["removed"]),
        "skipped_samples": len(skipped),
        "skipped_files": sorted(skipped),
        "model": arch_name,
        "device": str(rt.device),
        "world_size": rt.world_size,
        "phase_seconds": timer.to_json(),
        "resumed": resumed,
        "branches": [{"name": b.name, "gate": b.gate, "gflops_share": b.gflops_share}
                     for b in branches(model, (1, 3, h, w))],
        "prune_events": state["prune_events"],
        "history": state["history"],
        "plan_summary": {k: v for k, v in plan0.to_json().items() if k != "per_image"},
    }
    if rt.is_main:
        atomic_write_json(out_dir / "metrics.json", metrics)
        atomic_write_json(out_dir / "plan.json", plan0.to_json())
    return metrics


def _evaluate(model: nn.Module, val_ds: SegmentationDataset, cfg: RunConfig, rt: Runtime,
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


def cli_train(args) -> int:
    overrides = list(args.overrides)
    if args.on_bad_sample:
        overrides.append(f"train.on_bad_sample={args.on_bad_sample}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if (out / "metrics.json").exists() and not args.resume:
        raise DanceError(f"{out}: already holds a finished run (metrics.json); "
                         "choose another --out or pass --resume")
    if (out / "checkpoint").exists() and not args.resume:
        raise DanceError(f"{out}: holds a checkpoint of an unfinished run; "
                         "pass --resume to continue it or choose another --out")
    metrics = train(cfg, out, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"mIoU {metrics['miou']:.2f}  train {metrics['train_gflops_total']:.1f} GFLOPs "
              f"(realised cost {metrics['realised_cost']:.3f} of plain, planned "
              f"{metrics['planned_cost']:.3f})  {metrics['train_seconds']:.1f} s  "
              f"removed {metrics['removed_branches'] or 'none'}  -> {out / 'metrics.json'}")
    return 0

