"""DANCE in a plain PyTorch training loop, on torchvision's dataset and model (docs/own_loop.md).

Nothing here is dance's trainer: the dataset is torchvision's Cityscapes reader with an
augmentation of our own, the model torchvision's LR-ASPP, the optimizer AdamW, the loop ours.
DANCE adds the data plan (which images at which scale, with which loss weight, each epoch), the
weighted loss, the network slimmer (branch gates and channel groups, pruned at scheduled points)
and the cost account.

    dance synth --out data/synth --train 200 --val 50 --size 256x512
    python examples/own_loop.py --data data/synth --epochs 24

Any folder in the Cityscapes layout works (leftImg8bit/ and gtFine/ under --data).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torchvision
from torchvision.transforms.v2 import functional as TF

import dance

# Cityscapes label ids -> train ids (19 classes, 255 ignored), from torchvision's class table
LUT = np.full(256, 255, dtype=np.uint8)
for c in torchvision.datasets.Cityscapes.classes:
    if 0 <= c.id < 256 and c.train_id not in (-1, 255):
        LUT[c.id] = c.train_id
NUM_CLASSES = 19
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class Pair:
    """(PIL image, PIL label ids) -> (uint8 3xHxW tensor, int64 HxW train ids); with ``crop``,
    a random crop of that size and a random horizontal flip (an augmentation of our own)."""

    def __init__(self, crop: tuple[int, int] | None = None):
        self.crop = crop

    def __call__(self, image, target):
        x = TF.pil_to_tensor(image)
        y = torch.from_numpy(LUT[np.asarray(target)].astype(np.int64))
        if self.crop is not None:
            h, w = self.crop
            top = int(torch.randint(0, x.shape[1] - h + 1, ()))
            left = int(torch.randint(0, x.shape[2] - w + 1, ()))
            x, y = x[:, top:top + h, left:left + w], y[top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                x, y = x.flip(-1), y.flip(-1)
        return x, y


def normalise(x: torch.Tensor) -> torch.Tensor:
    return TF.normalize(x, MEAN, STD)


def loss_fn(output: dict, target: torch.Tensor) -> torch.Tensor:
    """The probe loss the slimmer measures importance with: plain mean cross-entropy."""
    return dance.weighted_cross_entropy(output["out"], target)[0]


@torch.no_grad()
def miou(model, dataset) -> float:
    model.eval()
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for x, y in dataset:
        pred = model(normalise(x.float().div(255))[None])["out"].argmax(1)[0]
        valid = y != 255
        conf += torch.bincount(y[valid] * NUM_CLASSES + pred[valid],
                               minlength=NUM_CLASSES ** 2).view(NUM_CLASSES, NUM_CLASSES)
    model.train()
    inter = conf.diag().double()
    union = conf.sum(0) + conf.sum(1) - conf.diag()
    present = union > 0
    return float((inter[present] / union[present]).mean() * 100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a dataset root in the Cityscapes layout")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", default="256x256", help="training crop HxW")
    p.add_argument("--budget", type=float, default=0.5, help="training FLOPs, of the plain run's")
    p.add_argument("--network-budget", type=float, default=0.7,
                   help="deployed model's inference FLOPs, of the original's")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    crop = tuple(int(v) for v in args.crop.lower().split("x"))
    torch.manual_seed(args.seed)

    def cityscapes(split, transform):
        return torchvision.datasets.Cityscapes(args.data, split, target_type="semantic",
                                               transforms=transform)
    try:
        train, val = cityscapes("train", Pair(crop)), cityscapes("val", Pair())
    except (RuntimeError, ValueError) as e:  # torchvision's message for a missing layout
        print(f"own_loop.py: {args.data}: {e}", file=sys.stderr)
        return 1

    # data side: one complexity score per image (un-augmented), the plan, the planned batches
    scores = dance.score_images(cityscapes("train", Pair()))
    plan = dance.plan(scores, args.budget)
    loader = dance.PlannedLoader(train, plan, args.batch_size, args.epochs, seed=args.seed,
                                 adaptive=True, num_workers=args.workers)

    # network side: gates on LR-ASPP's two paths, channel groups everywhere else
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    model = dance.slimmable(model, NUM_CLASSES)
    shape = (1, 3, *crop)
    gflops0 = dance.count_gflops(model, shape)
    slimmer = dance.NetworkSlimmer(model, network_budget=args.network_budget, channels=True,
                                   input_shape=shape)
    gates = [p for p in model.parameters() if p.dim() == 0]  # no weight decay on the gates
    rest = [p for p in model.parameters() if p.dim() > 0]
    opt = torch.optim.AdamW([{"params": rest}, {"params": gates, "weight_decay": 0.0}],
                            lr=args.lr, weight_decay=1e-4)
    # held-out batches for the slimmer's importance measurements: a few validation images
    probe = [(normalise(torch.stack([val[i][0] for i in range(2)]).float().div(255)),
              torch.stack([val[i][1] for i in range(2)]))]

    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        steps = len(loader)
        for i, batch in enumerate(loader):
            progress = (epoch + i / steps) / args.epochs
            for g in opt.param_groups:  # cosine learning rate
                g["lr"] = args.lr * 0.5 * (1 + np.cos(np.pi * progress))
            out = model(normalise(batch["image"]))["out"]
            loss, per_image = dance.weighted_cross_entropy(out, batch["mask"], batch["weight"])
            (loss + slimmer.sparsity_loss(model, loader.mean_scale)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loader.charge(model, batch)
            loader.observe(batch, per_image)
            progress = (epoch + (i + 1) / steps) / args.epochs
            if slimmer.due(progress):
                event = slimmer.prune(model, probe, loss_fn, progress)
                dance.rebuild_optimizer(opt, model)
                print(f"  prune @ {progress:.0%}: {event.message}")
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, "
              f"scale {loader.mean_scale:.3f}, cost so far {loader.realised_cost:.3f}")
    seconds = time.perf_counter() - t0
    gflops = dance.count_gflops(model, shape)
    print(f"val mIoU {miou(model, val):.2f}; training FLOPs {loader.total_cost:.3f} of the plain "
          f"run's ({loader.realised_cost:.3f} from the data side); inference "
          f"{gflops:.3g} GFLOPs, {gflops / gflops0:.1%} of the original; {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
