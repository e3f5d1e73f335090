"""What a checkpoint holds of a run in progress: the ``train_state`` of ``state.json``.

Everything the loop changes as it goes and a resume must restore: where it stands (epoch,
step), the data plan as last re-planned, per-image hardness, the cost ledger, the samples it
skipped, the per-epoch history and pruning events. The JSON is flat, so ``state.json`` stays
readable (field list: docs/checkpoints.md).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dance.data.plan import DataSlimmingPlan, Hardness
from dance.engine.cost import CostLedger
from dance.errors import DanceError

_LEDGER_FIELDS = ("train_gflops", "full_gflops", "images_seen", "accounting_seconds")
_LEDGER_OPTIONAL = ("train_mpixels", "full_mpixels", "train_units", "epochs_trained",  # absent
                    "plan_gflops", "actual_units")
# from older checkpoints


@dataclass
class TrainState:
    plan: DataSlimmingPlan  # as last re-planned
    hardness: Hardness  # per-image loss EMA (NaN: not seen yet), dataset order
    epoch: int = 0  # epochs finished
    global_step: int = 0
    ledger: CostLedger = field(default_factory=CostLedger)
    wall_seconds: float = 0.0
    skipped: set[str] = field(default_factory=set)  # ids of bad samples skipped
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    prune_events: list[dict] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase, so far
    forced_resume: bool = False  # resumed with --force under a different fingerprint

    def to_json(self) -> dict:
        return {
            "epoch": self.epoch, "global_step": self.global_step,
            **{k: getattr(self.ledger, k) for k in (*_LEDGER_FIELDS, *_LEDGER_OPTIONAL)},
            "wall_seconds": self.wall_seconds, "hardness": self.hardness.to_json(),
            "skipped": sorted(self.skipped), "history": list(self.history),
            "prune_events": list(self.prune_events), "plan": self.plan.to_json(), "phases": dict(self.phases),
            "forced_resume": self.forced_resume,
        }

    @classmethod
    def from_json(cls, d: Any, source: str = "train_state") -> TrainState:
        """From ``state.json``'s ``train_state``; a missing key is a DanceError naming it."""
        if not isinstance(d, Mapping):
            raise DanceError(f"{source}: train_state is not a mapping")
        needed = ("epoch", "global_step", *_LEDGER_FIELDS, "wall_seconds", "hardness", "skipped",
                  "history", "prune_events", "plan")
        missing = [k for k in needed if k not in d]
        if missing:
            raise DanceError(f"{source}: train_state lacks {', '.join(missing)}")
        return cls(plan=DataSlimmingPlan.from_json(d["plan"]),
                   hardness=Hardness(len(d["hardness"]), d["hardness"]),
                   epoch=int(d["epoch"]), global_step=int(d["global_step"]),
                   ledger=CostLedger(**{k: d[k] for k in _LEDGER_FIELDS},
                                     **{"epochs_trained": float(d["epoch"]),
                                        **{k: d[k] for k in _LEDGER_OPTIONAL if k in d}}),
                   wall_seconds=float(d["wall_seconds"]), skipped=set(d["skipped"]),
                   history=list(d["history"]), prune_events=list(d["prune_events"]),
                   phases=dict(d.get("phases", {})),
                   forced_resume=bool(d.get("forced_resume", False)))
