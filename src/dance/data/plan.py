"""The data-slimming plan: per image a scale, a keep probability and a loss weight
(docs/method.md#data-policy).

Policy, from the percentile rank ``p_i`` of each image's complexity score (mid-rank: the share of
images below plus half the share tied with it, so ties get equal rank and ``0 < p_i < 1``):

* scale   ``s_i = quantise(s_min + (1 - s_min) * p_i ** gamma)`` onto ``scale_set`` (nearest);
* keep    ``keep_i = keep_min`` if ``p_i <= drop_quantile`` else 1, re-drawn every epoch;
* weight  ``w_i ∝ 1 + beta' * (p_i - 0.5)``, normalised so the expected mean weight of the kept
  images is 1 (``Σ keep_i w_i = Σ keep_i``);
* predicted cost ``= mean_i keep_i * s_i²`` (1.0 is the plain run).

Budget rule (how the free parameters follow from the budget alone). Measurements on
real data say complexity guidance pays for dropping, so the saving is spent in this order, one parameter
moving at a time along a path whose cost falls monotonically:

1. drop: ``drop_quantile`` grows 0 -> 0.5 with ``keep_min = 0.5`` (the least complex images are
   dropped first; the whole lowest half at a 25% saving);
2. downsample: ``s_min`` falls 1 -> min(scale_set) with ``gamma = 1``;
3. downsample harder: ``gamma`` grows 1 -> ``gamma_max`` geometrically (``gamma_max`` puts every
   image at min(scale_set)), which moves all but the most complex images to small scales.

The planner bisects the path for the last point whose cost is still >= the budget. Quantisation
makes the cost a step function of the path, so the images that would change at the next step
(the "boundary" images) have their keep probability lowered just enough to hit the budget
exactly. The boundary reduction is always partial (< 1), so every image keeps a non-zero chance.
With ``drop=False`` the boundary images instead get a scale between their two quantised ones.
Loss weighting strengthens with the saving: ``beta' = beta * min(1, 2 * (1 - budget))``, so
budget 1.0 is exactly the plain run (every scale 1, keep 1, weight 1).

Ablations: ``drop=False`` walks steps 2-3 only; ``downsample=False`` walks
``drop_quantile`` 0 -> 1 at ``keep_min = 0.5`` and then ``keep_min`` 0.5 -> 0.25. Overriding a
parameter (``s_min=``, ``gamma=``, ``drop_quantile=``, ``keep_min=``) pins it and removes its step.

Progressive schedule: the per-epoch budget follows progressive resizing,
``B_e = (a + (b - a) * e / (E - 1)) ** 2`` with mean ``B_e`` = budget; ``b = 1`` when the start
``a`` can stay >= min(scale_set), else ``a = min(scale_set)`` and ``b`` is lowered. Each epoch's
budget is then split across images by the same rule, so scales never shrink from one epoch to
the next and the mean cost over epochs equals the plan's predicted cost.
"""
from __future__ import annotations

import json
import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dance.errors import DanceError

DEFAULT_SCALE_SET = (0.5, 0.625, 0.75, 0.875, 1.0)
KEEP_MIN = 0.5  # keep probability of dropped images: half of them trained each epoch
DROP_QUANTILE_MAX = 0.5  # the least complex half is dropped before any image is downsampled
DROP_ONLY_KEEP_MIN = 0.25  # with downsample=False the keep probability falls this far
BUDGET_TOLERANCE = 0.01  # predicted cost within ±1% of the budget
SCHEDULES = ("static", "progressive")
POLICIES = ("complexity", "uniform")
_OVERRIDABLE = ("s_min", "gamma", "drop_quantile", "keep_min")


@dataclass
class ImagePolicy:
    id: str
    score: float
    rank: float
    scale: float
    keep_prob: float
    weight: float


@dataclass
class EpochPolicy:
    """What the sampler and the loss use in one epoch, per image (arrays of length n)."""

    scale: np.ndarray
    keep_prob: np.ndarray
    weight: np.ndarray

    @property
    def cost(self) -> float:
        return float(np.mean(self.keep_prob * self.scale ** 2))

    @property
    def mean_scale(self) -> float:
        """The kept images' mean scale, on the 1/8 grid (what the slimmer's sparsity term is
        priced at; on a grid, so its FLOPs shares stay cached)."""
        if not (self.keep_prob > 0).any():
            return 1.0
        mean = float((self.scale * self.keep_prob).sum() / self.keep_prob.sum())
        return round(mean * 8) / 8


# ---------------------------------------------------------------------------------------------
# validation


def check_budget(budget: Any) -> float:
    """The budget as a float in (0, 1]; DanceError naming the value otherwise."""
    if isinstance(budget, str):
        try:
            value = float(budget)
        except ValueError:
            raise DanceError(f"budget must be a number in (0, 1], got {budget!r}") from None
    elif isinstance(budget, numbers.Real) and not isinstance(budget, bool):
        value = float(budget)
    else:
        raise DanceError(f"budget must be a number in (0, 1], got {budget!r}")
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise DanceError(f"budget must be a number in (0, 1], got {budget!r}")
    return value


def _check_scale_set(scale_set: Sequence[float]) -> tuple[float, ...]:
    try:
        s = tuple(sorted({float(v) for v in scale_set}))
    except (TypeError, ValueError):
        raise DanceError(f"scale_set must be numbers in (0, 1], got {scale_set!r}") from None
    if not s or s[0] <= 0 or s[-1] != 1.0:
        raise DanceError(f"scale_set must be numbers in (0, 1] that include 1.0 (the plain run), "
                         f"got {list(scale_set)}")
    return s


def _check_overrides(overrides: Mapping[str, Any], drop: bool, downsample: bool) -> dict:
    out = {}
    for k, v in overrides.items():
        if k not in _OVERRIDABLE:
            raise DanceError(f"unknown plan option {k!r}; the solver's parameters are "
                             f"{', '.join(_OVERRIDABLE)}")
        if k in ("drop_quantile", "keep_min") and not drop:
            raise DanceError(f"{k}={v!r} given with drop=False")
        if k in ("s_min", "gamma") and not downsample:
            raise DanceError(f"{k}={v!r} given with downsample=False")
        v = float(v)
        ok = {"s_min": 0 < v <= 1, "gamma": 0 < v < math.inf, "drop_quantile": 0 <= v <= 1,
              "keep_min": 0 < v <= 1}[k]
        if not ok:
            raise DanceError(f"plan option {k}={v!r} is out of range")
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# the policy and its budget solver


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Mid-rank percentile in (0, 1): share below plus half the share tied; ties rank equal."""
    values = np.asarray(values, dtype=np.float64)
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    below = np.cumsum(counts) - counts
    return ((below + 0.5 * counts) / len(values))[inverse.reshape(-1)]


def _quantise(s: np.ndarray, scale_set: tuple[float, ...]) -> np.ndarray:
    """Nearest scale of the set (monotone non-decreasing in s)."""
    grid = np.asarray(scale_set)
    mids = (grid[1:] + grid[:-1]) / 2
    return grid[np.searchsorted(mids, s, side="left")]


@dataclass(frozen=True)
class _Rule:
    """Everything besides ranks and budget that decides a complexity policy."""

    scale_set: tuple[float, ...]
    drop: bool
    downsample: bool
    overrides: Mapping[str, float]
    keep_floor: float = KEEP_MIN
    scales_per_epoch: int = 0  # 0: as many of scale_set as the rule gives; 1 or 2: coarse

    def path(self, ranks: np.ndarray) -> tuple[dict[str, float], list[tuple[str, float, float]]]:
        """Starting parameters and the ordered steps (parameter, from, to) of the budget rule."""
        base = {"drop_quantile": 0.0, "keep_min": KEEP_MIN if self.drop else 1.0,
                "s_min": 1.0, "gamma": 1.0}
        steps: list[tuple[str, float, float]] = []
        if self.drop and self.downsample:
            steps.append(("drop_quantile", 0.0, DROP_QUANTILE_MAX))
            if self.keep_floor < KEEP_MIN:  # drop the least complex half harder, then downsample
                steps.append(("keep_min", KEEP_MIN, self.keep_floor))
        elif self.drop:
            steps += [("drop_quantile", 0.0, 1.0), ("keep_min", KEEP_MIN, DROP_ONLY_KEEP_MIN)]
        if self.downsample:
            # gamma_max: the most complex image's p**gamma falls to 1e-3, i.e. onto min(scale_set)
            gamma_max = max(1.0, math.log(1e-3) / math.log(float(np.max(ranks))))
            steps += [("s_min", 1.0, self.scale_set[0]), ("gamma", 1.0, gamma_max)]
        base.update(self.overrides)
        return base, [s for s in steps if s[0] not in self.overrides]

    def evaluate(self, ranks: np.ndarray,
                 params: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """(scale, keep_prob) per image for the given parameters."""
        if self.downsample:
            raw = params["s_min"] + (1.0 - params["s_min"]) * ranks ** params["gamma"]
            scale = _quantise(raw, self.scale_set)
        else:
            scale = np.ones_like(ranks)
        if self.drop:
            # tolerance: a mid-rank of exactly the quantile (e.g. 0.5) counts as inside it
            keep = np.where(ranks <= params["drop_quantile"] + 1e-12, params["keep_min"], 1.0)
        else:
            keep = np.ones_like(ranks)
        return scale, keep


def _at(base: dict, steps: list, t: float) -> dict[str, float]:
    """Parameters at position t in [0, len(steps)] of the path (step k spans [k, k+1])."""
    params = dict(base)
    for k, (name, start, end) in enumerate(steps):
        u = min(max(t - k, 0.0), 1.0)
        # gamma moves geometrically so each bit of the path moves the cost by a similar amount
        params[name] = start * (end / start) ** u if name == "gamma" else start + (end - start) * u
    return params


def _cost(scale: np.ndarray, keep: np.ndarray) -> float:
    return float(np.mean(keep * scale ** 2))


def _weights(ranks: np.ndarray, keep: np.ndarray, beta_eff: float) -> np.ndarray:
    raw = 1.0 + beta_eff * (ranks - 0.5)
    return raw * (keep.sum() / (keep * raw).sum())


def _effective_beta(beta: float, budget: float, weighting: bool) -> float:
    """Weighting strengthens with the saving, so budget 1.0 is the plain run (weights 1)."""
    return beta * min(1.0, 2.0 * (1.0 - budget)) if weighting else 0.0


def _coarse(ranks: np.ndarray, budget: float, rule: _Rule) -> tuple[np.ndarray, np.ndarray, dict]:
    """Coarse scales: every image at one of the (at most two) scales of ``scale_set`` that
    bracket sqrt(budget), the most complex images at the upper one; with one scale per epoch,
    every image at sqrt(budget). The image at the boundary takes a scale between the two, so
    the cost lands on the budget."""
    n, target = len(ranks), math.sqrt(budget)
    grid = np.asarray(rule.scale_set)
    keep = np.ones(n)
    if rule.scales_per_epoch == 1 or target <= grid[0] or target in rule.scale_set:
        scale = np.full(n, target)
        lo = hi = target
    else:
        hi = float(grid[np.searchsorted(grid, target)])
        lo = float(grid[np.searchsorted(grid, target) - 1])
        share = (budget - lo * lo) / (hi * hi - lo * lo) * n  # images at hi, fractional
        order = np.argsort(-ranks, kind="stable")  # most complex first
        scale = np.full(n, lo)
        whole = int(math.floor(share))
        scale[order[:whole]] = hi
        if whole < n:
            scale[order[whole]] = math.sqrt(lo * lo + (share - whole) * (hi * hi - lo * lo))
    params = {"drop_quantile": 0.0, "keep_min": 1.0, "s_min": lo, "gamma": 1.0}
    return scale, keep, params


def _solve(ranks: np.ndarray, budget: float, rule: _Rule) -> tuple[np.ndarray, np.ndarray, dict]:
    """(scale, keep_prob, parameters) with predicted cost == budget (docs/method.md#budget-rule)."""
    if rule.scales_per_epoch:
        return _coarse(ranks, budget, rule)
    base, steps = rule.path(ranks)
    end = float(len(steps))

    def cost_at(t: float) -> float:
        return _cost(*rule.evaluate(ranks, _at(base, steps, t)))

    c_start, c_end = cost_at(0.0), cost_at(end)
    if c_start <= budget or c_end >= budget:
        t = 0.0 if c_start <= budget else end
        c = c_start if t == 0.0 else c_end
        if abs(c - budget) > BUDGET_TOLERANCE * budget:
            what = "below the lowest" if c > budget else "above the highest"
            raise DanceError(f"budget {budget:g} is {what} cost this plan can reach ({c:.3f}) "
                             f"with drop={rule.drop}, downsample={rule.downsample}"
                             + (f", {dict(rule.overrides)}" if rule.overrides else ""))
        params = _at(base, steps, t)
        return (*rule.evaluate(ranks, params), params)
    lo, hi = 0.0, end  # cost(lo) >= budget > cost(hi)
    while hi - lo > 1e-10:  # then only the boundary images differ between lo and hi
        mid = 0.5 * (lo + hi)
        if cost_at(mid) >= budget:
            lo = mid
        else:
            hi = mid
    params = _at(base, steps, lo)
    scale, keep = rule.evaluate(ranks, params)
    scale_hi, keep_hi = rule.evaluate(ranks, _at(base, steps, hi))
    # Fine adjustment of the images that change at the next step ("boundary" images), just
    # enough to land on the budget: they give up keep probability (less than their next step
    # saves, so it stays > 0); with drop=False they instead take a scale between their two
    # quantised ones, so the ablation never drops an image.
    boundary = (scale != scale_hi) | (keep != keep_hi)
    excess = (_cost(scale, keep) - budget) * len(ranks)
    if excess > 0 and boundary.any():
        if rule.drop:
            keep = keep.copy()
            keep[boundary] *= 1.0 - excess / float((keep * scale ** 2)[boundary].sum())
        else:
            step = scale[boundary] ** 2 - scale_hi[boundary] ** 2
            scale = scale.copy()
            scale[boundary] = np.sqrt(scale[boundary] ** 2 - excess / float(step.sum()) * step)
    return scale, keep, params


def progressive_scales(budget: float, epochs: int,
                       s_floor: float = DEFAULT_SCALE_SET[0], final_full: float = 0.0) -> np.ndarray:
    """One scale per epoch, linear in the epoch, non-decreasing, with mean(scale²) == budget.

    Ends at full scale when the first epoch can stay at >= ``s_floor``; otherwise starts at
    ``s_floor`` and ends lower; a budget below ``s_floor²`` is a flat ``sqrt(budget)``.
    ``final_full``: the last ``round(final_full * epochs)`` epochs run at full scale (FixRes:
    train at the resolution of the test), the ramp before them spending what is left.
    """
    if epochs < 1:
        raise DanceError(f"epochs must be >= 1, got {epochs}")
    if not 0.0 <= final_full < 1.0:
        raise DanceError(f"final_full must be in [0, 1), got {final_full!r}")
    n_full = min(int(round(final_full * epochs)), epochs - 1)
    if n_full:
        rest = (budget * epochs - n_full) / (epochs - n_full)
        if rest <= 0:
            raise DanceError(f"budget {budget:g} cannot pay for {n_full} of {epochs} epochs at "
                             "full scale")
        ramp = progressive_scales(rest, epochs - n_full, s_floor)
        return np.concatenate([ramp, np.ones(n_full)])
    x = np.arange(epochs) / max(epochs - 1, 1)
    m1, m2 = float(x.mean()), float((x ** 2).mean())
    a_coef = 1.0 - 2.0 * m1 + m2  # mean((a + (b - a) x)²) = a² a_coef + 2ab (m1 - m2) + b² m2

    def root(qa: float, qb: float, qc: float) -> float:
        return (-qb + math.sqrt(max(qb * qb - 4 * qa * qc, 0.0))) / (2 * qa)

    if budget <= s_floor ** 2:
        return np.full(epochs, math.sqrt(budget))
    a, b = root(a_coef, 2.0 * (m1 - m2), m2 - budget), 1.0  # end at full scale
    if a < s_floor:
        a = s_floor
        b = root(m2, 2.0 * a * (m1 - m2), a * a * a_coef - budget)
    return a + (b - a) * x


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass
class DataSlimmingPlan:
    """A training set's data-slimming policy under a budget (docs/method.md#data-policy; its
    fields: docs/cli.md#plan-json)."""

    budget: float
    predicted_cost: float
    per_image: list[ImagePolicy]
    drop_quantile: float
    keep_min: float
    s_min: float
    gamma: float
    scale_set: tuple[float, ...] = DEFAULT_SCALE_SET
    schedule: str = "static"  # "static" | "progressive"
    policy: str = "complexity"  # "complexity" (by rank) | "uniform" (every image alike)
    beta: float = 0.5
    drop: bool = True
    downsample: bool = True
    weighting: bool = True
    overrides: dict[str, float] = field(default_factory=dict)
    keep_floor: float = KEEP_MIN
    permutation: list[int] | None = None  # set by `shuffled`: image i takes image perm[i]'s policy
    scales_per_epoch: int = 0  # coarse scales (`_coarse`); 0: the budget rule's mix
    final_full: float = 0.0  # progressive schedule: share of the last epochs at full scale
    _epoch_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def scales(self) -> dict[float, int]:
        """Histogram scale -> number of images."""
        return dict(sorted(Counter(p.scale for p in self.per_image).items()))

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.per_image]

    def _rule(self) -> _Rule:
        return _Rule(self.scale_set, self.drop, self.downsample, dict(self.overrides),
                     self.keep_floor, self.scales_per_epoch)

    def _ranks(self) -> np.ndarray:
        return np.array([p.rank for p in self.per_image], dtype=np.float64)

    def _split(self, ranks: np.ndarray, budget: float) -> EpochPolicy:
        """This plan's policy for ``budget``, before any shuffling."""
        if self.policy == "uniform":
            ones = np.ones(len(ranks))
            return EpochPolicy(ones * math.sqrt(budget), ones, ones.copy())
        scale, keep, _ = _solve(ranks, budget, self._rule())
        beta_eff = _effective_beta(self.beta, self.budget, self.weighting)
        return EpochPolicy(scale, keep, _weights(ranks, keep, beta_eff))

    def _floor_scale(self, ranks: np.ndarray) -> float:
        """The lowest scale a progressive epoch may start at (its budget must stay reachable)."""
        if self.policy == "uniform":
            return self.scale_set[0]
        base, steps = self._rule().path(ranks)
        lowest = _cost(*self._rule().evaluate(ranks, _at(base, steps, float(len(steps)))))
        return max(self.scale_set[0], math.sqrt(lowest))

    def epoch_policy(self, epoch: int, epochs: int) -> EpochPolicy:
        """What the sampler and the loss use in ``epoch`` (0-based) of ``epochs``."""
        if not 0 <= epoch < epochs:
            raise DanceError(f"epoch {epoch} is outside 0..{epochs - 1}")
        key = (epoch, epochs) if self.schedule == "progressive" else None
        if key not in self._epoch_cache:
            if self.schedule == "static":
                pol = EpochPolicy(*(np.array([getattr(p, f) for p in self.per_image])
                                    for f in ("scale", "keep_prob", "weight")))
            else:
                pol = self._split(self._ranks(), float(self.epoch_costs(epochs)[epoch]))
                if self.permutation is not None:
                    perm = np.asarray(self.permutation)
                    pol = EpochPolicy(pol.scale[perm], pol.keep_prob[perm], pol.weight[perm])
            self._epoch_cache[key] = pol
        return self._epoch_cache[key]

    def epoch_costs(self, epochs: int, budget: float | None = None) -> np.ndarray:
        """The predicted cost (mean keep · scale²) of each epoch of a run of ``epochs``, for this
        plan's budget or, to price a plan before making it, for ``budget``: flat for the
        static schedule, the ramp of `progressive_scales` for the progressive one."""
        budget = self.budget if budget is None else check_budget(budget)
        if self.schedule == "static":
            return np.full(epochs, budget)
        return progressive_scales(budget, epochs, self._floor_scale(self._ranks()),
                                  self.final_full) ** 2

    def _rebuild(self, ranks: np.ndarray, permutation: list[int] | None) -> DataSlimmingPlan:
        """The same plan (budget and options) re-solved for new ranks or a new permutation."""
        return _build(self.ids, [p.score for p in self.per_image], ranks, self.budget,
                      self.scale_set, self.schedule, self.policy, self.beta, self.drop,
                      self.downsample, self.weighting, self.overrides, permutation,
                      self.keep_floor, self.scales_per_epoch, self.final_full)

    def replan(self, hardness: np.ndarray | Mapping[str, float],
               alpha: float = 0.5) -> DataSlimmingPlan:
        """Adaptive re-plan (docs/method.md#hardness): blend complexity rank with hardness rank, same budget.

        ``hardness`` is per image (array in plan order, or id -> value), e.g. an EMA of the
        training loss; NaN or missing images keep their complexity rank. Always blends with the
        complexity rank of the scores, so repeated re-plans do not compound.
        """
        if not 0.0 <= alpha <= 1.0:
            raise DanceError(f"replan alpha must be in [0, 1], got {alpha!r}")
        n = len(self.per_image)
        if isinstance(hardness, Mapping):
            h = np.array([hardness.get(i, np.nan) for i in self.ids], dtype=np.float64)
        else:
            h = np.asarray(hardness, dtype=np.float64).reshape(-1)
            if len(h) != n:
                raise DanceError(f"hardness has {len(h)} values for a plan of {n} images")
        p = percentile_rank(np.array([q.score for q in self.per_image]))
        known = np.isfinite(h)
        h_rank = p.copy()
        if known.any():
            h_rank[known] = percentile_rank(h[known])
        return self._rebuild(percentile_rank((1.0 - alpha) * p + alpha * h_rank), self.permutation)

    def shuffled(self, seed: int) -> DataSlimmingPlan:
        """The ``compare`` control: policies permuted across images (same cost, no guidance)."""
        perm = np.random.default_rng(seed).permutation(len(self.per_image))
        if self.permutation is not None:  # shuffling a shuffled plan composes the permutations
            perm = np.asarray(self.permutation)[perm]
        return self._rebuild(self._ranks(), [int(i) for i in perm])

    def to_json(self) -> dict:
        """The plan fields (docs/cli.md#plan-json) plus what `from_json` needs for an exact round trip."""
        return {
            "budget": self.budget,
            "predicted_cost": self.predicted_cost,
            "scales": {repr(s): c for s, c in self.scales.items()},
            "drop_quantile": self.drop_quantile,
            "keep_min": self.keep_min,
            "s_min": self.s_min,
            "gamma": self.gamma,
            "scale_set": list(self.scale_set),
            "schedule": self.schedule,
            "policy": self.policy,
            "beta": self.beta,
            "drop": self.drop,
            "downsample": self.downsample,
            "weighting": self.weighting,
            "overrides": dict(self.overrides),
            "keep_floor": self.keep_floor,
            "permutation": self.permutation,
            "scales_per_epoch": self.scales_per_epoch,
            "final_full": self.final_full,
            "per_image": [{"id": p.id, "score": p.score, "rank": p.rank, "scale": p.scale,
                           "keep_prob": p.keep_prob, "weight": p.weight} for p in self.per_image],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DataSlimmingPlan:
        """Inverse of `to_json` (derived and unknown keys, e.g. ``scales``, are ignored)."""
        try:
            return cls(
                budget=float(d["budget"]), predicted_cost=float(d["predicted_cost"]),
                per_image=[ImagePolicy(str(p["id"]), float(p["score"]), float(p["rank"]),
                                       float(p["scale"]), float(p["keep_prob"]), float(p["weight"]))
                           for p in d["per_image"]],
                drop_quantile=float(d["drop_quantile"]), keep_min=float(d["keep_min"]),
                s_min=float(d["s_min"]), gamma=float(d["gamma"]),
                scale_set=tuple(float(s) for s in d["scale_set"]), schedule=str(d["schedule"]),
                policy=str(d["policy"]), beta=float(d["beta"]), drop=bool(d["drop"]),
                downsample=bool(d["downsample"]), weighting=bool(d["weighting"]),
                overrides={str(k): float(v) for k, v in d["overrides"].items()},
                keep_floor=float(d.get("keep_floor", KEEP_MIN)),
                permutation=(None if d["permutation"] is None
                             else [int(i) for i in d["permutation"]]),
                scales_per_epoch=int(d.get("scales_per_epoch", 0)),
                final_full=float(d.get("final_full", 0.0)),
            )
        except KeyError as e:
            raise DanceError(f"data plan JSON lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise DanceError(f"data plan JSON is malformed ({e})") from None


def load_plan(path: str | Path, ids: Sequence[str] | None = None,
              budget: float | None = None) -> DataSlimmingPlan:
    """A plan file (``dance plan --out``, a run's ``plan.json``), checked: every value in range,
    and, when given, made for these image ``ids`` (the same images; reordered to ``ids`` when
    only the order differs) and at this ``budget``. Every problem is a one-line DanceError
    naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DanceError(f"{path}: no such plan file (write one with dance plan --out)") from None
    except IsADirectoryError:
        raise DanceError(f"{path}: is a folder, not a plan file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DanceError(f"{path}: not a plan file ({type(e).__name__}: {e})") from None
    if not isinstance(raw, Mapping):
        raise DanceError(f"{path}: not a plan file (expected a JSON object)")
    try:
        p = DataSlimmingPlan.from_json(raw)
    except DanceError as e:
        raise DanceError(f"{path}: {e}") from None
    problem = _plan_problem(p)
    if problem:
        raise DanceError(f"{path}: {problem}")
    if ids is not None:
        ids = [str(i) for i in ids]
        if p.ids != ids:
            mine, theirs = set(ids), set(p.ids)
            if mine != theirs or p.permutation is not None:
                missing = sorted(mine - theirs)[:1] or sorted(theirs - mine)[:1] or ["(order)"]
                raise DanceError(f"{path}: made for {len(theirs)} images, the training set has "
                                 f"{len(mine)} and they differ (first: {missing[0]}); make the "
                                 f"plan from this training set's scores")
            by_id = {q.id: q for q in p.per_image}
            p.per_image = [by_id[i] for i in ids]
    if budget is not None:
        check_plan_budget(path, p, budget)
    return p


def check_plan_budget(path: str | Path, p: DataSlimmingPlan, budget: float) -> None:
    """That the plan read from ``path`` was made at ``budget`` (to the 6 digits the message
    gives): a one-line DanceError if not."""
    if abs(p.budget - budget) > 1e-6:
        raise DanceError(f"{path}: made at budget {p.budget:g}, this run plans its data at "
                         f"{budget:g}; make the plan with --budget {budget:g}, or set "
                         f"data_slimming.budget to match")


def _plan_problem(p: DataSlimmingPlan) -> str | None:
    """What is out of range in a plan read from a file, or None."""
    try:
        _check_common(p.budget, p.scale_set, p.schedule)
        _check_final_full(p.final_full, p.schedule)
    except DanceError as e:
        return str(e)
    if p.policy not in POLICIES:
        return f"policy must be one of {', '.join(POLICIES)}, got {p.policy!r}"
    if not p.per_image:
        return "the plan has no images"
    if len(set(p.ids)) != len(p.ids):
        return "an image id appears more than once"
    for q in p.per_image:
        values = (q.score, q.rank, q.scale, q.keep_prob, q.weight)
        if not all(math.isfinite(v) for v in values):
            return f"image {q.id!r} has a non-finite value"
        if not (0 < q.scale <= 1 and 0 < q.keep_prob <= 1 and q.weight > 0 and 0 < q.rank < 1):
            return (f"image {q.id!r}: scale {q.scale:g}, keep_prob {q.keep_prob:g}, weight "
                    f"{q.weight:g} or rank {q.rank:g} out of range (scale and keep_prob in "
                    f"(0, 1], weight > 0, rank in (0, 1))")
    if p.permutation is not None and sorted(p.permutation) != list(range(len(p.per_image))):
        return "permutation is not a permutation of the images"
    if not (p.scales_per_epoch in (0, 1, 2) and 0 <= p.beta < 2):
        return f"scales_per_epoch {p.scales_per_epoch} or beta {p.beta:g} out of range"
    return None


class Hardness:
    """How hard each training image still is: an EMA of its mean training loss per epoch.

    The adaptive plan re-ranks images by it (``DataSlimmingPlan.replan``; see
    docs/method.md#hardness). The trainer hands over each step's per-image losses
    (``observe``); at the epoch end ``end_epoch`` folds the epoch's means into the EMA. An image
    not yet seen has NaN. A distributed trainer sums ``loss_sum`` and ``loss_count`` over ranks
    before ``end_epoch``. The values are what a checkpoint keeps (``to_json``).
    """

    def __init__(self, n_images: int, values: Sequence[float] | None = None):
        self.values = (np.full(n_images, np.nan) if values is None
                       else np.array(values, dtype=np.float64))
        if len(self.values) != n_images:
            raise DanceError(f"hardness has {len(self.values)} values for {n_images} images")
        self.loss_sum = np.zeros(n_images, dtype=np.float64)
        self.loss_count = np.zeros(n_images, dtype=np.float64)

    def observe(self, index: np.ndarray, per_image_loss: np.ndarray) -> None:
        np.add.at(self.loss_sum, np.asarray(index), np.asarray(per_image_loss, dtype=np.float64))
        np.add.at(self.loss_count, np.asarray(index), 1.0)

    def end_epoch(self, momentum: float) -> float | None:
        """Fold this epoch's mean losses into the EMA (weight ``momentum`` on the old value);
        return their mean over the images seen."""
        seen = self.loss_count > 0
        mean_loss = self.loss_sum / np.maximum(self.loss_count, 1)
        fresh = seen & np.isnan(self.values)
        self.values[fresh] = mean_loss[fresh]
        upd = seen & ~fresh
        self.values[upd] = momentum * self.values[upd] + (1 - momentum) * mean_loss[upd]
        self.loss_sum[:] = 0
        self.loss_count[:] = 0
        return float(mean_loss[seen].mean()) if seen.any() else None

    def filled(self) -> np.ndarray | None:
        """The EMA with unseen images at the median, or None before any image was seen."""
        if not np.isfinite(self.values).any():
            return None
        return np.where(np.isfinite(self.values), self.values, np.nanmedian(self.values))

    def to_json(self) -> list[float]:
        return [float(v) for v in self.values]


def _build(ids: list[str], scores: Sequence[float], ranks: np.ndarray, budget: float,
           scale_set: tuple[float, ...], schedule: str, policy: str, beta: float, drop: bool,
           downsample: bool, weighting: bool, overrides: Mapping[str, float],
           permutation: list[int] | None, keep_floor: float = KEEP_MIN,
           scales_per_epoch: int = 0, final_full: float = 0.0) -> DataSlimmingPlan:
    """Solve the base (static) policy for ``budget`` and wrap it as a plan."""
    rule = _Rule(scale_set, drop, downsample, dict(overrides), keep_floor, scales_per_epoch)
    if policy == "uniform":
        s = math.sqrt(budget)
        scale, keep, weight = np.full(len(ids), s), np.ones(len(ids)), np.ones(len(ids))
        params = {"drop_quantile": 0.0, "keep_min": 1.0, "s_min": s, "gamma": 1.0}
    else:
        scale, keep, params = _solve(ranks, budget, rule)
        weight = _weights(ranks, keep, _effective_beta(beta, budget, weighting))
    if permutation is not None:
        perm = np.asarray(permutation)
        scale, keep, weight = scale[perm], keep[perm], weight[perm]
    per_image = [ImagePolicy(i, float(sc), float(r), float(s), float(k), float(w))
                 for i, sc, r, s, k, w in zip(ids, scores, ranks, scale, keep, weight)]
    return DataSlimmingPlan(
        budget=budget, predicted_cost=_cost(scale, keep), per_image=per_image,
        drop_quantile=float(params["drop_quantile"]), keep_min=float(params["keep_min"]),
        s_min=float(params["s_min"]), gamma=float(params["gamma"]), scale_set=scale_set,
        schedule=schedule, policy=policy, beta=beta, drop=drop, downsample=downsample,
        weighting=weighting, overrides=dict(overrides), keep_floor=keep_floor,
        permutation=permutation, scales_per_epoch=scales_per_epoch, final_full=final_full,
    )


def _ids_and_scores(scores: Any, ids: Sequence[str] | None) -> tuple[list[str], np.ndarray]:
    if isinstance(scores, Mapping):
        if ids is not None:
            raise DanceError("give ids either as the keys of scores or as ids, not both")
        ids, scores = list(scores.keys()), list(scores.values())
    try:
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DanceError("complexity scores must be numbers") from None
    if len(values) == 0:
        raise DanceError("no complexity scores to plan from (empty training set?)")
    ids = [str(i) for i in range(len(values))] if ids is None else [str(i) for i in ids]
    if len(ids) != len(values):
        raise DanceError(f"{len(ids)} ids for {len(values)} complexity scores")
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise DanceError(f"image id {dup!r} appears more than once")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DanceError(f"image {ids[bad[0]]!r} has a non-finite complexity score "
                         f"({values[bad[0]]})")
    return ids, values


def _check_common(budget: Any, scale_set: Sequence[float], schedule: str) -> tuple[float, tuple]:
    if schedule not in SCHEDULES:
        raise DanceError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return check_budget(budget), _check_scale_set(scale_set)


def plan(scores: Sequence[float] | Mapping[str, float] | np.ndarray, budget: float,
         ids: Sequence[str] | None = None, *, scale_set: Sequence[float] = DEFAULT_SCALE_SET,
         schedule: str = "static", drop: bool = True, downsample: bool = True,
         weighting: bool = True, beta: float = 0.5, keep_floor: float = KEEP_MIN,
         scales_per_epoch: int = 0, final_full: float = 0.0,
         **overrides: float) -> DataSlimmingPlan:
    """DANCE's data plan: complexity-guided drops, scales and loss weights under ``budget``.

    ``overrides`` pin solver parameters (``s_min``, ``gamma``, ``drop_quantile``, ``keep_min``);
    the others are still chosen by the budget rule (module docstring). ``scales_per_epoch`` 1
    or 2 replaces the mix of scales by coarse ones (``_coarse``; downsampling only).
    ``final_full`` (progressive schedule): the share of the last epochs at full scale.
    """
    budget, scale_set = _check_common(budget, scale_set, schedule)
    ids, values = _ids_and_scores(scores, ids)
    if not 0.0 <= beta < 2.0:  # weights stay positive for every rank in (0, 1)
        raise DanceError(f"beta must be in [0, 2), got {beta!r}")
    if not (drop or downsample) and budget != 1.0:
        raise DanceError(f"budget {budget:g} needs drop or downsample; both are off")
    overrides = _check_overrides(overrides, drop, downsample)
    if not 0.0 < keep_floor <= KEEP_MIN:
        raise DanceError(f"keep_floor must be in (0, {KEEP_MIN}], got {keep_floor!r}")
    if scales_per_epoch not in (0, 1, 2):
        raise DanceError(f"scales_per_epoch must be 0, 1 or 2, got {scales_per_epoch!r}")
    if scales_per_epoch and (drop or not downsample or overrides):
        raise DanceError("scales_per_epoch 1 or 2 downsamples only: it needs drop=False, "
                         "downsample=True and no solver overrides")
    _check_final_full(final_full, schedule)
    return _build(ids, values.tolist(), percentile_rank(values), budget, scale_set, schedule,
                  "complexity", beta, drop, downsample, weighting, overrides, None, keep_floor,
                  scales_per_epoch, final_full)


def _check_final_full(final_full: float, schedule: str) -> None:
    if not 0.0 <= final_full < 1.0:
        raise DanceError(f"final_full must be in [0, 1), got {final_full!r}")
    if final_full and schedule != "progressive":
        raise DanceError("final_full needs the progressive schedule")


def uniform_plan(ids: Sequence[str], budget: float, *, schedule: str = "static",
                 scale_set: Sequence[float] = DEFAULT_SCALE_SET,
                 final_full: float = 0.0) -> DataSlimmingPlan:
    """The ``uniform`` control: every image at scale sqrt(budget), keep 1, weight 1."""
    budget, scale_set = _check_common(budget, scale_set, schedule)
    _check_final_full(final_full, schedule)
    ids = [str(i) for i in ids]
    if not ids:
        raise DanceError("no images to plan for (empty training set?)")
    zeros = np.zeros(len(ids))
    return _build(ids, zeros.tolist(), percentile_rank(zeros), budget, scale_set, schedule,
                  "uniform", 0.0, False, True, False, {}, None, final_full=final_full)


def progressive_plan(ids: Sequence[str], budget: float, *,
                     scale_set: Sequence[float] = DEFAULT_SCALE_SET,
                     final_full: float = 0.0) -> DataSlimmingPlan:
    """The ``progressive`` control: one scale per epoch for every image, growing over training
    (`progressive_scales`), equal total cost, keep 1, weight 1. The number of epochs is given
    later, to `DataSlimmingPlan.epoch_policy`."""
    return uniform_plan(ids, budget, schedule="progressive", scale_set=scale_set,
                        final_full=final_full)


# ---------------------------------------------------------------------------------------------
# `dance plan`


def _table(p: DataSlimmingPlan) -> str:
    keep = np.array([q.keep_prob for q in p.per_image])
    lines = [
        f"{len(p.per_image)} images  budget {p.budget:g}  predicted cost {p.predicted_cost:.4f}"
        f"  schedule {p.schedule}",
        f"drop: images with rank <= {p.drop_quantile:.3f} kept with probability {p.keep_min:.3f}"
        f" (expected {keep.mean():.1%} of images per epoch)",
        f"scale: s_min {p.s_min:.3f}  gamma {p.gamma:.3f}",
        f"{'scale':>7} {'images':>7} {'mean keep':>10} {'mean weight':>12}",
    ]
    for s in p.scales:
        sel = [q for q in p.per_image if q.scale == s]
        lines.append(f"{s:>7.3f} {len(sel):>7d} {np.mean([q.keep_prob for q in sel]):>10.3f} "
                     f"{np.mean([q.weight for q in sel]):>12.3f}")
    return "\n".join(lines)


def plan_for_policy(ds, budget: float, ids: Sequence[str], scores: np.ndarray | None = None,
                    seed: int = 0) -> DataSlimmingPlan:
    """The plan of a ``data_slimming`` config section ``ds`` (its policy and options) at
    ``budget``: what `dance train` trains with and `dance plan` shows. ``scores`` (in ``ids``
    order) are needed by the complexity-guided policies, dance and shuffled."""
    if ds.policy == "uniform":
        return uniform_plan(ids, budget)
    if ds.policy == "progressive":
        return progressive_plan(ids, budget, final_full=ds.final_full)
    p = plan(scores, budget, ids, **plan_options(ds, budget))
    return p.shuffled(seed) if ds.policy == "shuffled" else p


def drops_instead(drop_above: float | None, budget: float, drop: bool, downsample: bool) -> bool:
    """Whether a plan at ``budget`` drops the least complex images' steps instead of
    downscaling (``data_slimming.drop_above``): it is set, the budget is at least that (the
    plan has little to cut), and the options ask for downsampling alone."""
    return drop_above is not None and budget >= drop_above - 1e-12 and not drop and downsample


# what drop_above turns a downsampling plan into: drops at mixed scales (coarse scales only
# downsample)
DROP_INSTEAD = {"drop": True, "downsample": False, "scales_per_epoch": 0}


def with_drop_above(options: dict[str, Any], drop_above: float | None,
                    budget: float) -> dict[str, Any]:
    """``options`` of ``plan`` at ``budget``, turned into a dropping plan's where
    ``drop_above`` says the plan cuts little (``drops_instead``)."""
    if drops_instead(drop_above, budget, options["drop"], options["downsample"]):
        return {**options, **DROP_INSTEAD}
    return options


def plan_options(ds, budget: float | None = None) -> dict[str, Any]:
    """The options of ``plan`` that a ``data_slimming`` config section ``ds`` sets, at
    ``budget`` where ``ds.drop_above`` may turn downsampling into dropping."""
    options = {"schedule": ds.schedule, "drop": ds.drop, "downsample": ds.downsample,
               "weighting": ds.weighting, "keep_floor": ds.keep_floor,
               "scales_per_epoch": ds.scales_per_epoch, "final_full": ds.final_full}
    return options if budget is None else with_drop_above(options, ds.drop_above, budget)


def cli_plan(args) -> int:
    """``dance plan --scores FILE --budget B [--config C] [--indicator I] [--out F] [--json]``:
    the plan `dance train` would start from, with its data_slimming settings (the config's, or
    the defaults)."""
    budget = check_budget(args.budget)  # before reading anything
    from dance.data.scoring import read_scores_csv
    from dance.engine.config import load_config
    cfg = load_config(args.config)  # no file: the defaults dance train uses
    ids, scores = read_scores_csv(args.scores, args.indicator)
    p = plan_for_policy(cfg.data_slimming, budget, ids, scores, cfg.train.seed)
    if args.out:
        from dance.fileio import atomic_write_json
        atomic_write_json(args.out, p.to_json())
    if args.json:
        print(json.dumps(p.to_json()))
    else:
        print(_table(p) + (f"\n-> {args.out}" if args.out else ""))
    return 0
