"""Progressive network slimming during training (docs/method.md#network-slimming).

The trainer owns the loop and calls a ``NetworkSlimmer``:

* every step it adds ``slimmer.sparsity_loss(model, mean_scale)``: ``lam * sum_b c_b * |g_b|``,
  with ``c_b`` the branch's share of the model's FLOPs at the data policy's current mean scale
  (cost-aware sparsity; this is where the data side steers the network side);
* when ``slimmer.due(progress)`` it calls ``slimmer.prune(...)``, which measures every live
  branch's importance, removes branches structurally and returns a ``PruneEvent``, then
  ``rebuild_optimizer(optimizer, model)`` so training goes on over the slimmer model.

Why removal rests on a measured importance and not on the gates alone: a gate in front of a linear
projection is absorbed by the projection's weights, so L1 on the gates did not single out any
branch in the prototype (measured on the first prototype). The default ``importance="loss"`` measures
the rise of the loss on a few held-out training batches when a branch's gate is set to 0, which
the projection cannot compensate, per GFLOP the branch's removal saves.

The rule at each scheduled point, in this order (each module always keeps at least one branch,
and one that is not global if it has one: ``MultiScaleModule.may_slim_away``):

1. gate threshold: remove branches whose ``|g_b|`` is below ``gate_threshold`` times the
   largest ``|g|`` of their module;
2. negligible loss (``importance="loss"`` only): remove, lowest loss rise per GFLOP first,
   branches whose removal keeps the probe loss within ``loss_tolerance`` (default 1%) of the loss
   before this point's removals, at most ``max_removals_per_point`` (default 1) per module per
   point, so slimming is progressive and training recovers between removals (early in training
   every branch looks negligible). The check is cumulative -- each candidate is measured with the
   earlier ones already switched off -- so two branches that stand in for each other are not both
   removed;
3. network budget: while the model's inference FLOPs exceed this point's share of
   ``network_budget`` (a fraction of the ORIGINAL model's FLOPs), remove the branch with the
   lowest importance per GFLOP, re-measured after each removal.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dance.engine.runtime import unwrap_model
from dance.errors import DanceError
from dance.network import channels as ch
from dance.network.flops import architecture_signature, count_gflops, meta_copy
from dance.network.gates import NO_BRANCHES, branches, multiscale_modules, remove_branches

IMPORTANCE_KINDS = ("loss", "gate")
CHANNEL_IMPORTANCE_KINDS = ("taylor", "taylor_batches", "bn_scale")
# Below this many GFLOPs a branch counts as free; keeps importance-per-GFLOP finite (and JSON-able).
_MIN_GFLOPS = 1e-9
# A revived channel's BatchNorm scale, as a share of its layer's live channels' mean |gamma|
_REVIVE_SCALE = 0.1
# A budget removal may land this far below its target (a fraction of it): one 8-channel chunk of
# a wide, high-resolution layer can be 5% of a small model, so the last picks skip such chunks
# for smaller ones rather than overshoot (the budget promises +-5%)
_OVERSHOOT = 0.02

ProbeBatches = Sequence[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PruneEvent:
    """What one pruning point did.

    ``importance`` maps every branch live at this point (``"module_path.branch"``) to
    ``gate``, ``rel_gate`` (``|g|`` over the module's largest ``|g|``), ``loss_rise`` (probe loss
    with the gate at 0 minus the probe loss, ``None`` when not measured), ``rel_loss_rise``,
    ``gflops_saved`` (inference GFLOPs its removal saves at the slimmer's input shape), ``score``
    (importance per GFLOP: ``loss_rise`` or ``rel_gate`` over ``gflops_saved``) and
    ``removed_by`` (``None``, ``"gate_threshold"``, ``"negligible_loss"`` or ``"budget"``).

    ``channels`` lists every channel removal, in order: ``layer`` (the group's root convolution),
    ``channels`` (indices at the time), ``width_before``, ``importance`` (the removed channels'
    summed importance), ``gflops_saved`` (estimated, at the slimmer's input shape) and ``score``
    (importance per GFLOP). ``widths`` maps every removable group's root layer to its width after
    this point. ``revived``: how many dead channels the last point gave their scale back
    (``revive_dead``).
    """

    progress: float
    importance: dict[str, dict]
    removed: list[str]
    gflops_before: float
    gflops_after: float
    message: str
    probe_loss: float | None = None
    target_gflops: float | None = None
    channels: list[dict] = field(default_factory=list)
    widths: dict[str, int] = field(default_factory=dict)
    revived: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def _live_branches(model: nn.Module) -> tuple:
    """The architecture state as far as slimming changes it: which branches are still there
    (cheaper per step than the FLOPs counter's full signature)."""
    return tuple((path, tuple(m.branch_names())) for path, m in multiscale_modules(model))


def _scaled_shape(input_shape: Sequence[int], mean_scale: float) -> tuple[int, ...]:
    n, c, h, w = input_shape
    return (n, c, max(1, round(h * mean_scale)), max(1, round(w * mean_scale)))


class _Probe:
    """Mean loss over the probe batches with chosen gates switched off (eval mode, no grad)."""

    def __init__(self, model: nn.Module, batches: ProbeBatches, loss_fn: LossFn):
        self.model, self.loss_fn = model, loss_fn
        device = next(model.parameters()).device
        self.batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                        for x, y in batches]

    def gate(self, name: str) -> nn.Parameter:
        path, _, branch = name.rpartition(".")
        return self.model.get_submodule(path).gates[branch]

    @torch.no_grad()
    def loss(self, off: Iterable[str] = ()) -> float:
        gates = [self.gate(n) for n in off]
        saved = [g.detach().clone() for g in gates]
        try:
            for g in gates:
                g.zero_()
            total = sum(float(self.loss_fn(self.model(x), y)) for x, y in self.batches)
        finally:
            for g, v in zip(gates, saved):
                g.copy_(v)
        return total / len(self.batches)


class NetworkSlimmer:
    """Cost-aware gate sparsity and scheduled structural branch removal (docs/method.md#network-slimming).

    ``model`` is the model as training starts: its inference GFLOPs at ``input_shape`` are the
    reference ``network_budget`` is a fraction of (restored by ``load_state_dict`` on resume).
    ``loss_tolerance`` is the relative probe-loss rise counted as negligible (default 1%).
    """

    def __init__(self, model: nn.Module, lam: float = 1e-4,
                 prune_at: Sequence[float] = (0.3, 0.5, 0.7), gate_threshold: float = 0.1,
                 network_budget: float | None = None, importance: str = "loss",
                 input_shape: Sequence[int] = (1, 3, 512, 1024), loss_tolerance: float = 0.01,
                 max_removals_per_point: int = 1, channels: bool = False,
                 channel_lambda: float = 1e-4, channel_importance: str = "taylor",
                 memory_weight: float = 0.0, sparsity_after_last_point: bool = False,
                 max_channel_cut: float = 1.0, revive_dead: bool = False):
        if not lam >= 0:
            raise DanceError(f"network_slimming.lambda must be >= 0, got {lam!r}")
        prune_at = sorted({float(p) for p in prune_at})
        if any(not 0 < p <= 1 for p in prune_at):
            raise DanceError(f"network_slimming.prune_at must be fractions of training in (0, 1], "
                             f"got {prune_at}")
        if not 0 <= gate_threshold < 1:
            raise DanceError(f"gate_threshold must be in [0, 1), got {gate_threshold!r}")
        if network_budget is not None and not 0 < network_budget <= 1:
            raise DanceError(f"network_slimming.network_budget must be in (0, 1] (a fraction of "
                             f"the original model's inference FLOPs), got {network_budget!r}")
        if importance not in IMPORTANCE_KINDS:
            raise DanceError(f"importance must be one of {', '.join(IMPORTANCE_KINDS)}, "
                             f"got {importance!r}")
        if len(input_shape) != 4:
            raise DanceError(f"input_shape must be (N, C, H, W), got {tuple(input_shape)}")
        if not loss_tolerance >= 0:
            raise DanceError(f"loss_tolerance must be >= 0, got {loss_tolerance!r}")
        self.lam = float(lam)
        self.prune_at = prune_at
        self.gate_threshold = float(gate_threshold)
        self.network_budget = network_budget
        self.importance = importance
        self.input_shape = tuple(int(s) for s in input_shape)
        self.loss_tolerance = float(loss_tolerance)
        if max_removals_per_point < 1:
            raise DanceError(f"max_removals_per_point must be >= 1, got {max_removals_per_point}")
        self.max_removals_per_point = int(max_removals_per_point)
        if not channel_lambda >= 0:
            raise DanceError(f"network_slimming.channel_lambda must be >= 0, got {channel_lambda!r}")
        if channel_importance not in CHANNEL_IMPORTANCE_KINDS:
            raise DanceError(f"channel_importance must be one of "
                             f"{', '.join(CHANNEL_IMPORTANCE_KINDS)}, got {channel_importance!r}")
        if channels and network_budget is None:
            raise DanceError("channel slimming removes channels to meet a network_budget: give "
                             "network_budget (a fraction of the model's inference FLOPs) with "
                             "channels=True")
        if not channels and not multiscale_modules(unwrap_model(model)):
            raise DanceError(f"{type(unwrap_model(model)).__name__}: {NO_BRANCHES}: give "
                             f"channels=True with a network_budget")
        if channels:
            ch.output_layers(unwrap_model(model))  # the logits must be known: now, not mid-run
        if not (math.isfinite(memory_weight) and memory_weight >= 0):
            raise DanceError(f"network_slimming.memory_weight must be >= 0, got {memory_weight!r}")
        self.memory_weight = float(memory_weight)
        self.channels = bool(channels)
        self.channel_lambda = float(channel_lambda)
        self.channel_importance = channel_importance
        self.sparsity_after_last_point = bool(sparsity_after_last_point)
        if not 0 < max_channel_cut <= 1:
            raise DanceError(f"network_slimming.max_channel_cut must be in (0, 1], "
                             f"got {max_channel_cut!r}")
        self.max_channel_cut = float(max_channel_cut)
        self.revive_dead = bool(revive_dead)
        # each group's width as training starts: max_channel_cut is a fraction of it
        self.original_widths = ({g.layer: g.channels for g in
                                 ch.channel_groups(unwrap_model(model), self.input_shape)}
                                if self.channels and self.max_channel_cut < 1 else {})
        self._channel_terms: dict[tuple, list[tuple[list[str], float]]] = {}
        self._scales_key: tuple | None = None  # the parameters of the last architecture only
        self._scales: tuple[list[torch.Tensor], torch.Tensor] = ([], torch.zeros(0))
        self.original_gflops = count_gflops(unwrap_model(model), self.input_shape)
        self.done: list[float] = []
        self.events: list[PruneEvent] = []
        self._weights: dict[tuple, list[tuple[str, str, float]]] = {}

    # -- sparsity -------------------------------------------------------------------------------

    def sparsity_weights(self, model: nn.Module, mean_scale: float = 1.0) -> dict[str, float]:
        """``c_b`` per branch: its share of the model's FLOPs at ``input_shape`` scaled by
        ``mean_scale``. Cached per (architecture state, shape)."""
        return {f"{p}.{b}": c for p, b, c in self._cost_shares(unwrap_model(model), mean_scale)}

    def _cost_shares(self, model: nn.Module, mean_scale: float) -> list[tuple[str, str, float]]:
        shape = _scaled_shape(self.input_shape, mean_scale)
        key = (_live_branches(model), shape)
        if key not in self._weights:
            self._weights[key] = [(i.module_path, i.branch, float(i.gflops_share))
                                  for i in branches(model, shape)]
        return self._weights[key]

    def sparsity_loss(self, model: nn.Module, mean_scale: float = 1.0) -> torch.Tensor:
        """``lam * sum_b c_b * |g_b|`` (docs/method.md#network-slimming), differentiable w.r.t. the
        gates, plus, with channel slimming, ``channel_lambda * sum_g c_g * sum |gamma_g|`` over
        every removable channel group's BatchNorm scales (docs/method.md#channel-slimming).
        Zero once every pruning point is done (``sparsity_active``)."""
        model = unwrap_model(model)
        total = next(model.parameters()).new_zeros(())
        if not self.sparsity_active():
            return total
        if self.lam > 0:  # switched off: skip the FLOPs shares altogether
            shares = self._cost_shares(model, mean_scale)
            if shares:
                gates = torch.stack([model.get_submodule(p).gates[b] for p, b, _ in shares])
                c = torch.tensor([s for _, _, s in shares], dtype=gates.dtype, device=gates.device)
                total = total + self.lam * (c * gates.abs()).sum()
        if self.channels and self.channel_lambda > 0:
            scales, coef = self._channel_scales(model, mean_scale)
            if scales:  # one weighted sum over every scale: a handful of ops, not one per layer
                flat = torch.cat([w.reshape(-1) for w in scales])
                total = total + self.channel_lambda * (coef.to(flat) * flat.abs()).sum()
        return total

    def _channel_scales(self, model: nn.Module, mean_scale: float
                        ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The removable groups' BatchNorm scales and, per channel, its group's ``c_g``."""
        key = (id(model), architecture_signature(model),
               _scaled_shape(self.input_shape, mean_scale))
        if self._scales_key != key:
            weights, coef = [], []
            for bns, c in self._channel_cost(model, mean_scale):
                for bn in bns:
                    w = model.get_submodule(bn).weight
                    weights.append(w)
                    coef.append(torch.full((w.numel(),), float(c)))
            self._scales_key = key
            device = weights[0].device if weights else None
            self._scales = (weights, torch.cat(coef).to(device) if coef else torch.zeros(0))
        return self._scales

    def _channel_cost(self, model: nn.Module, mean_scale: float) -> list[tuple[list[str], float]]:
        """Per removable group: its BatchNorms and ``c_g``, what one of its channels costs at the
        data policy's mean scale over the mean of that cost across groups (so ``c_g`` averages 1
        and ``channel_lambda`` reads like Network Slimming's lambda). Cached per architecture."""
        shape = _scaled_shape(self.input_shape, mean_scale)
        key = (architecture_signature(model), shape)
        if key not in self._channel_terms:
            groups = [g for g in ch.channel_groups(model, shape) if g.bns]
            cost = [g.cost(self.memory_weight) for g in groups]
            mean = sum(cost) / max(len(groups), 1)
            self._channel_terms[key] = [(g.bns, c / max(mean, _MIN_GFLOPS))
                                        for g, c in zip(groups, cost)]
        return self._channel_terms[key]

    # -- schedule -------------------------------------------------------------------------------

    def sparsity_active(self) -> bool:
        """Whether the sparsity term still has a pruning point to prepare: after the last one
        nothing is removed, and an L1 pull on the slim network's scales only drives channels it
        keeps to zero (unless ``sparsity_after_last_point``)."""
        return self.sparsity_after_last_point or len(self.done) < len(self.prune_at)

    def _pending(self, progress: float) -> list[float]:
        return [p for p in self.prune_at if p <= progress and p not in self.done]

    def due(self, progress: float) -> bool:
        """Whether a scheduled pruning point at or before ``progress`` (in [0, 1]) is not done."""
        return bool(self._pending(progress))

    def target_fraction(self, point: float) -> float | None:
        """This point's share of ``network_budget``: the target falls linearly from 1 to the
        budget over the scheduled points, so the budget is met at the last one."""
        if self.network_budget is None:
            return None
        return _share(self.prune_at.index(point) + 1, len(self.prune_at), self.network_budget)

    @staticmethod
    def expected_fraction(prune_at: Sequence[float], network_budget: float | None,
                          start: float = 0.0, end: float = 1.0) -> float:
        """The model's inference FLOPs averaged over the part ``start``..``end`` of training
        (all of it by default), as a fraction of the original's, if every pruning point lands
        on its target: 1 until the first point, then each point's share of ``network_budget``
        (``target_fraction``). 1 without a budget."""
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"expected_fraction needs 0 <= start < end <= 1, got {start}, {end}")
        if network_budget is None or not prune_at:
            return 1.0
        points = [0.0] + sorted(prune_at) + [1.0]
        total = 0.0
        for k in range(len(points) - 1):  # piece k: after the k-th point, share k of the budget
            overlap = min(end, points[k + 1]) - max(start, points[k])
            if overlap > 0:
                total += overlap * _share(k, len(prune_at), network_budget)
        return total / (end - start)

    # -- pruning --------------------------------------------------------------------------------

    def prune(self, model: nn.Module, probe_batches: ProbeBatches, loss_fn: LossFn,
              progress: float) -> PruneEvent:
        """Measure every live branch, remove branches by the rule (module docstring), mark the
        scheduled point(s) reached by ``progress`` done. Points skipped over are done together,
        with the latest one's budget share. The model's train/eval mode is restored."""
        pending = self._pending(progress)
        if not pending:
            raise ValueError(f"no pruning point due at progress {progress}; "
                             f"scheduled {self.prune_at}, done {self.done}")
        model = unwrap_model(model)
        probe = None
        if probe_batches:
            probe = _Probe(model, probe_batches, loss_fn)
        elif self.importance == "loss":
            raise ValueError("importance='loss' needs probe batches")
        was_training = model.training
        model.eval()
        try:
            event = self._prune(model, probe, float(progress), self.target_fraction(pending[-1]))
            if (self.revive_dead and self.channels and probe is not None
                    and len(self.done) + len(pending) == len(self.prune_at)):
                event.revived = self._revive_dead(model, probe)
                event.message += f"; revived {event.revived} dead channels"
        finally:
            model.train(was_training)
        self.done.extend(pending)
        self.events.append(event)
        return event

    def follow(self, model: nn.Module, event: dict, ops: Sequence[str | dict],
               progress: float) -> PruneEvent:
        """Apply another process's pruning point (its ``PruneEvent`` as JSON and the
        architecture record it appended, ``ops``) to this copy of the model, so every DDP rank
        removes the same branches and channels in the same order."""
        pending = self._pending(progress)
        if not pending:
            raise ValueError(f"no pruning point due at progress {progress}")
        ch.replay(unwrap_model(model), ops)
        self.done.extend(pending)
        self.events.append(PruneEvent(**event))
        return self.events[-1]

    def _measure(self, model: nn.Module, probe: _Probe | None
                 ) -> tuple[dict[str, dict], float | None]:
        """Importance of every live branch of ``model`` as it is now, and the probe loss."""
        infos = branches(model, self.input_shape)
        total = count_gflops(model, self.input_shape)
        base = probe.loss() if probe is not None else None
        largest: dict[str, float] = {}
        for i in infos:
            largest[i.module_path] = max(largest.get(i.module_path, 0.0), abs(i.gate))
        traffic = ch.activation_traffic(model, self.input_shape) if self.memory_weight else 0.0
        table = {}
        for i in infos:
            rel_gate = abs(i.gate) / largest[i.module_path] if largest[i.module_path] > 0 else 0.0
            saved = i.gflops_share * total
            cost = saved
            if self.memory_weight and i.gflops_share > 0:  # a module's last branch stays: 0
                without = meta_copy(model)
                without.get_submodule(i.module_path).remove_branches([i.branch])
                cost += self.memory_weight * (
                    traffic - ch.activation_traffic(without, self.input_shape))
            rise = probe.loss([i.name]) - base if probe is not None else None
            rel_rise = None if rise is None else rise / max(abs(base), 1e-12)
            merit = rise if self.importance == "loss" else rel_gate
            table[i.name] = {
                "module": i.module_path, "branch": i.branch, "gate": float(i.gate),
                "rel_gate": rel_gate,
                "loss_rise": rise, "rel_loss_rise": rel_rise, "gflops_saved": saved,
                "score": merit / max(cost, _MIN_GFLOPS), "removed_by": None,
            }
        return table, base

    def _prune(self, model: nn.Module, probe: _Probe | None, progress: float,
               target_fraction: float | None) -> PruneEvent:
        table, base = self._measure(model, probe)
        gflops_before = count_gflops(model, self.input_shape)
        modules = dict(multiscale_modules(model))
        chosen: list[str] = []

        def take(name: str, rule: str) -> None:
            chosen.append(name)
            table[name]["removed_by"] = rule

        def removable(name: str) -> bool:  # with this point's choices still in the model
            module = table[name]["module"]
            return name not in chosen and modules[module].may_slim_away(
                [table[n]["branch"] for n in chosen + [name] if table[n]["module"] == module])

        # 1. gate threshold
        for name in sorted(table, key=lambda n: table[n]["rel_gate"]):
            if table[name]["rel_gate"] < self.gate_threshold and removable(name):
                take(name, "gate_threshold")
        # 2. negligible loss rise, cumulative so stand-ins for each other are not both removed
        if self.importance == "loss":
            allowed = base + self.loss_tolerance * abs(base)
            per_module: dict[str, int] = {}
            for name in sorted(table, key=lambda n: table[n]["score"]):
                module = table[name]["module"]
                if (per_module.get(module, 0) < self.max_removals_per_point
                        and table[name]["rel_loss_rise"] < self.loss_tolerance
                        and removable(name) and probe.loss(chosen + [name]) <= allowed):
                    take(name, "negligible_loss")
                    per_module[module] = per_module.get(module, 0) + 1
        if chosen:
            remove_branches(model, chosen)
        # 3. network budget: least important per GFLOP first, re-measured after each removal
        target = None if target_fraction is None else target_fraction * self.original_gflops
        short_of_budget = False
        removals: list[dict] = []
        if self.channels and target is not None:
            short_of_budget = self._budget_with_channels(model, probe, target, take, removals)
            target_loop = None
        else:
            target_loop = target
        while target_loop is not None and count_gflops(model, self.input_shape) > target_loop:
            now, _ = self._measure(model, probe)
            candidates = [n for n, r in now.items()
                          if model.get_submodule(r["module"]).may_slim_away([r["branch"]])]
            if not candidates:
                short_of_budget = True
                break
            name = min(candidates, key=lambda n: now[n]["score"])
            remove_branches(model, [name])
            take(name, "budget")
        gflops_after = count_gflops(model, self.input_shape)
        widths = ({g.layer: g.channels for g in ch.channel_groups(model, self.input_shape)}
                  if self.channels else {})
        return PruneEvent(
            progress=progress, importance=table, removed=chosen, gflops_before=gflops_before,
            gflops_after=gflops_after, probe_loss=base, target_gflops=target,
            message=self._message(table, chosen, gflops_before, gflops_after, target,
                                  short_of_budget, removals),
            channels=removals, widths=widths,
        )

    def _revive_dead(self, model: nn.Module, probe: _Probe) -> int:
        """After the last point: every channel of a removable group whose importance on the probe
        is exactly zero (no output and no gradient, a ReLU that never fires: mostly channels the
        L1 term drove there) gets its BatchNorm scales back at ``_REVIVE_SCALE`` of the live
        channels' mean ``|gamma|`` in the same BatchNorm, and a zero shift, so it learns again in
        the slim network (after "ReDo", Sokar et al., ICML 2023, which recycles dormant units;
        the small scale keeps the model's function nearly unchanged). Returns how many."""
        scores = self._channel_scores(model, probe)
        revived = 0
        with torch.no_grad():
            for g in ch.channel_groups(model, self.input_shape):
                dead = scores[g.layer] == 0
                if not dead.any() or dead.all():
                    continue
                for name in g.bns:
                    bn = model.get_submodule(name)
                    mask = dead.to(bn.weight.device)
                    bn.weight[mask] = _REVIVE_SCALE * bn.weight[~mask].abs().mean()
                    bn.bias[mask] = 0.0
                revived += int(dead.sum())
        return revived

    def _channel_scores(self, model: nn.Module, probe: _Probe | None) -> dict[str, torch.Tensor]:
        """Per removable group, each channel's importance (``channel_importance``); Taylor reads
        the gradients of the probe loss, computed here and cleared after: ``taylor`` of the
        probe batches' mean loss, ``taylor_batches`` of each batch's loss, averaged over the
        batches (equal with one batch)."""
        if self.channel_importance == "bn_scale" or probe is None:
            return ch.channel_importance(model, "bn_scale")
        return ch.taylor_importance(model, probe.batches, probe.loss_fn,
                                    per_batch=self.channel_importance == "taylor_batches")

    def _budget_with_channels(self, model: nn.Module, probe: _Probe | None, target: float,
                              take, removals: list[dict]) -> bool:
        """Meet ``target`` GFLOPs by removing channel chunks and branches together, least
        important per GFLOP first (docs/method.md#channel-slimming). In rounds: rank every chunk
        (``ROUND_TO`` channels of a group, its least important first) and every removable branch,
        take them in order until their estimated saving covers the gap (passing over any that
        would take it past the gap by more than ``_OVERSHOOT`` of the target; when all would,
        the one that saves least), remove, re-count, repeat.
        Returns True when nothing removable is left before the target is met."""
        while (now := count_gflops(model, self.input_shape)) > target:
            gap = now - target
            candidates = self._chunk_candidates(model, probe)
            if self.importance == "loss" and probe is not None:
                measured, _ = self._measure(model, probe)
                for name, r in measured.items():
                    if model.get_submodule(r["module"]).may_slim_away([r["branch"]]):
                        candidates.append({"branch": name, "score": r["score"],
                                           "gflops_saved": r["gflops_saved"],
                                           "module": r["module"], "in_module": r["branch"]})
            if not candidates:
                return True
            candidates.sort(key=lambda c: c["score"])
            picked, saved = [], 0.0
            for c in candidates:
                if saved + c["gflops_saved"] > gap + _OVERSHOOT * target:
                    continue  # would land far below the target: a smaller one may fit
                if "branch" in c and not model.get_submodule(c["module"]).may_slim_away(
                        [p["in_module"] for p in picked if p.get("module") == c["module"]]
                        + [c["in_module"]]):
                    continue  # every module keeps a branch, and a spatial one
                picked.append(c)
                saved += c["gflops_saved"]
                if saved >= gap:
                    break
            if not picked:  # every one overshoots: the one that overshoots least
                picked = [min(candidates, key=lambda c: c["gflops_saved"])]
            for c in picked:
                if "branch" in c:  # live at this point's start, so in ``table``
                    remove_branches(model, [c["branch"]])
                    take(c["branch"], "budget")
            by_layer: dict[str, list[dict]] = {}
            for c in picked:
                if "layer" in c:
                    by_layer.setdefault(c["layer"], []).append(c)
            live = {g.layer for g in ch.channel_groups(model, self.input_shape)}
            for layer, cs in by_layer.items():
                if layer not in live:  # its group went with a removed branch
                    continue
                idx = sorted(i for c in cs for i in c["channels"])
                width = model.get_submodule(layer).out_channels
                ch.remove_channels(model, layer, idx)
                imp = sum(c["importance"] for c in cs)
                gf = sum(c["gflops_saved"] for c in cs)
                removals.append({"layer": layer, "channels": idx, "width_before": width,
                                 "importance": imp, "gflops_saved": gf,
                                 "score": imp / max(gf, _MIN_GFLOPS), "removed_by": "budget"})
        return False

    def _chunk_candidates(self, model: nn.Module, probe: _Probe | None) -> list[dict]:
        """Every group's next chunks (down to ``ROUND_TO`` channels, and to no fewer than
        ``1 - max_channel_cut`` of its width as training started), least important first."""
        scores = self._channel_scores(model, probe)
        out = []
        for g in ch.channel_groups(model, self.input_shape):
            imp = scores[g.layer]
            if not torch.isfinite(imp).any():
                continue
            order = torch.argsort(imp).tolist()
            width, start = g.channels, 0
            floor = (1 - self.max_channel_cut) * self.original_widths.get(g.layer, 0)
            while (k := ch.chunk_size(width)) > 0 and width - k >= floor:
                idx = order[start:start + k]
                value = float(imp[idx].sum())
                if not math.isfinite(value):
                    break
                cost = k * g.cost(self.memory_weight)
                out.append({"layer": g.layer, "channels": idx, "importance": value,
                            "gflops_saved": k * g.gflops_per_channel,
                            "score": value / max(cost, _MIN_GFLOPS)})
                start, width = start + k, width - k
        return out

    def _message(self, table: dict[str, dict], chosen: list[str], before: float, after: float,
                 target: float | None, short_of_budget: bool, removals: Sequence[dict] = ()
                 ) -> str:
        why = {"gate_threshold": f"gate below {self.gate_threshold:g} of its module's largest",
               "negligible_loss": f"loss rise below {self.loss_tolerance:.0%}",
               "budget": "least important per GFLOP, for the network budget"}
        parts = [f"removed {n} ({why[table[n]['removed_by']]})" for n in chosen]
        if removals:
            n_channels = sum(len(r["channels"]) for r in removals)
            parts.append(f"removed {n_channels} channels from {len(removals)} groups "
                         f"({why['budget']})")
        text = "; ".join(parts) if parts else "removed nothing"
        text += (f"; {before:.4g} -> {after:.4g} GFLOPs "
                 f"({after / self.original_gflops:.1%} of the original)")
        if target is not None:
            text += f", target {target / self.original_gflops:.1%}"
            if short_of_budget:
                text += (f" NOT met: nothing removable left (every multi-scale module keeps "
                         f"at least one branch, every channel group {ch.ROUND_TO} channels; "
                         f"groups that reach the logits or pass a GroupNorm stay whole)"
                         if self.channels else
                         " NOT met: no removable branch left (every multi-scale module keeps at "
                         "least one branch)")
        return text

    # -- resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-serialisable state: the schedule's progress, the reference FLOPs, the history."""
        return {"prune_at": list(self.prune_at), "done": list(self.done),
                "original_gflops": self.original_gflops, "input_shape": list(self.input_shape),
                "events": [e.to_json() for e in self.events],
                "original_widths": dict(self.original_widths)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["input_shape"]) != list(self.input_shape):
            raise DanceError(f"network slimmer state was made for input shape "
                             f"{tuple(state['input_shape'])}, this run uses {self.input_shape}")
        self.done = [float(p) for p in state["done"]]
        self.original_gflops = float(state["original_gflops"])
        self.events = [PruneEvent(**e) for e in state["events"]]
        self.original_widths = dict(state.get("original_widths", self.original_widths))


def _share(k: int, points: int, network_budget: float) -> float:
    """The target after the k-th of ``points`` pruning points (1-based), as a fraction of the
    original FLOPs: falling linearly from 1 to ``network_budget``."""
    return 1.0 - (1.0 - network_budget) * k / points


def rebuild_optimizer(optimizer: torch.optim.Optimizer,
                      model: nn.Module) -> torch.optim.Optimizer:
    """Point ``optimizer`` at the model's current parameters after a structural removal.

    Parameters that survived keep their group and their state (e.g. momentum); removed ones are
    dropped with their state; new trainable parameters (a projection conv sliced to fewer inputs)
    join the group of the nearest parameter of their kind (`_nearest_group`), with fresh state,
    where an optimizer built by kind (weight decay for weights, none for gates) puts them after
    a resume too. The optimizer is updated in place and returned, so its class,
    hyper-parameters and param-group options are unchanged and LR schedulers (and anything
    else) holding it keep working.
    """
    named = list(unwrap_model(model).named_parameters())
    alive = {id(p) for _, p in named}
    group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
    for p in [p for p in optimizer.state if id(p) not in alive]:
        del optimizer.state[p]
    for group in optimizer.param_groups:
        # slice-assign: some optimizers (LBFGS) hold on to the list object itself
        group["params"][:] = [p for p in group["params"] if id(p) in alive]
    kinds = {f"{path}.{leaf}" if path else leaf: (type(m), leaf)
             for path, m in unwrap_model(model).named_modules()
             for leaf, _ in m.named_parameters(recurse=False)}
    for name, p in named:
        if id(p) not in group_of and p.requires_grad:
            group = _nearest_group(name, named, group_of, kinds)
            optimizer.param_groups[group]["params"].append(p)
    return optimizer


class OptimizerSnapshot:
    """What an optimizer knows about a model's parameters, taken just before a structural
    removal, to hand the surviving slices of every parameter their own state afterwards.

    A removal replaces every sliced layer's parameters with new, smaller ones (Torch-Pruning's
    surgery and ``slice_conv_inputs`` both do), so without this they restart with empty state.
    Under Adam that is a cold start in the middle of training: the first steps move every
    element of them by about the learning rate in the sign of its gradient, the instability
    warm-up exists to avoid (Liu et al., "On the Variance of the Adaptive Learning Rate and
    Beyond", ICLR 2020). ``carry`` slices each state tensor (Adam's moments, SGD's momentum)
    exactly as its parameter was sliced and keeps scalars (Adam's step count).

    Which elements survived is read by replaying the removal on a float64 copy of the model
    (no weights copied) whose gradients hold each element's position: the surgery slices
    gradients with the parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        self.optimizer = optimizer
        model = unwrap_model(model)
        self.params = dict(model.named_parameters())
        self.group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups)
                         for p in g["params"]}
        self.start = len(model.dance_arch.removed)
        self.shell = meta_copy(model).to_empty(device="cpu").double()
        for p in self.shell.parameters():
            p.grad = torch.arange(p.numel(), dtype=torch.float64).view(p.shape)

    def carry(self, model: nn.Module) -> int:
        """Give the parameters that the removals since the snapshot replaced the sliced state
        of the ones they came from; returns how many parameters got it. Call it before
        ``rebuild_optimizer``, which drops the replaced parameters' state."""
        model = unwrap_model(model)
        ops = model.dance_arch.removed[self.start:]
        ch.replay(self.shell, ops)
        positions = {n: p.grad for n, p in self.shell.named_parameters() if p.grad is not None}
        carried = 0
        for name, new in model.named_parameters():
            old = self.params.get(name)
            if old is None or old is new or name not in positions:
                continue
            state = self.optimizer.state.get(old)
            pos = positions[name]
            if not state or pos.shape != new.shape:
                continue
            index = pos.reshape(-1).to(device=new.device, dtype=torch.long)
            self.optimizer.state[new] = {
                k: (v.reshape(-1)[index].view(new.shape).clone()
                    if v.shape == old.shape else v.clone()) if torch.is_tensor(v) else v
                for k, v in state.items()}
            if id(old) in self.group_of:  # its old group, where rebuild_optimizer keeps it
                self.optimizer.param_groups[self.group_of[id(old)]]["params"].append(new)
            carried += 1
        return carried


def _nearest_group(name: str, named: list[tuple[str, nn.Parameter]],
                   group_of: dict[int, int], kinds: dict[str, tuple[type, str]]) -> int:
    """The group of the optimizer-held parameter of the same kind (``kinds``: module type and
    parameter name, e.g. a convolution's weight) that shares the longest module path with
    ``name``, anywhere in the model if none nearby does; else of any parameter that shares a
    path; group 0 when none does. The kind comes first because a module can hold parameters
    of a different group than its children: a multi-scale module's gates have no weight decay,
    the convolutions of its branches do."""
    parts = name.split(".")[:-1]
    for same_kind in (True, False):
        for depth in range(len(parts), -1 if same_kind else 0, -1):
            prefix = ".".join(parts[:depth]) + "." if depth else ""
            for other, q in named:
                if (other.startswith(prefix) and id(q) in group_of
                        and (not same_kind or kinds[other] == kinds[name])):
                    return group_of[id(q)]
    return 0
