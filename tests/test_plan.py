"""The data-slimming plan: policy, budget solver, controls, JSON, `dance plan`."""
import json

import numpy as np
import pytest

from dance.cli import main
from dance.data.plan import (
    DataSlimmingPlan,
    percentile_rank,
    plan,
    progressive_plan,
    progressive_scales,
    uniform_plan,
)
from dance.errors import DanceError

BUDGETS = np.round(np.arange(0.25, 1.0001, 0.01), 2)


def _arrays(p: DataSlimmingPlan):
    return (np.array([q.rank for q in p.per_image]), np.array([q.scale for q in p.per_image]),
            np.array([q.keep_prob for q in p.per_image]), np.array([q.weight for q in p.per_image]))


def _score_sets():
    rng = np.random.default_rng(0)
    sets = {f"n={n}": rng.random(n) for n in range(1, 6)}
    sets.update({
        "uniform 200": rng.random(200),
        "lognormal 150": rng.lognormal(0, 1.5, 150),
        "heavy ties 60": rng.integers(0, 3, 60).astype(float),
        "all equal 7": np.full(7, 4.2),
        "pair tied n=3": np.array([1.0, 1.0, 2.0]),
    })
    return sets


def test_percentile_rank_is_mid_rank_with_equal_ties():
    assert percentile_rank(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [0.875, 0.125, 0.5, 0.5]
    assert percentile_rank(np.array([7.0])).tolist() == [0.5]


def test_known_policy_and_cost_with_every_parameter_pinned():
    # ranks 0.1..0.9 -> raw scales 0.55..0.95 -> nearest of the default set; ranks <= 0.5 dropped
    p = plan([10, 20, 30, 40, 50], 0.4734375, s_min=0.5, gamma=1.0, drop_quantile=0.5,
             keep_min=0.5)
    ranks, scale, keep, weight = _arrays(p)
    np.testing.assert_allclose(ranks, [0.1, 0.3, 0.5, 0.7, 0.9])
    assert scale.tolist() == [0.5, 0.625, 0.75, 0.875, 1.0]
    assert keep.tolist() == [0.5, 0.5, 0.5, 1.0, 1.0]
    # mean(keep * s²) = (0.125 + 0.1953125 + 0.28125 + 0.765625 + 1) / 5
    assert p.predicted_cost == pytest.approx(0.4734375, abs=1e-15)
    # w ∝ 1 + 0.5 (p - 0.5) = 0.8 .. 1.2, scaled so Σ keep·w = Σ keep = 3.5
    np.testing.assert_allclose(weight, np.array([0.8, 0.9, 1.0, 1.1, 1.2]) * 3.5 / 3.65)
    assert p.scales == {0.5: 1, 0.625: 1, 0.75: 1, 0.875: 1, 1.0: 1}
    with pytest.raises(DanceError, match="budget 0.3 is below"):
        plan([10, 20, 30, 40, 50], 0.3, s_min=0.5, gamma=1.0, drop_quantile=0.5, keep_min=0.5)


@pytest.mark.parametrize("options", [{}, {"drop": False}, {"downsample": False},
                                     {"weighting": False}])
def test_budget_solver_hits_every_budget_within_one_percent(options):
    for name, scores in _score_sets().items():
        for b in BUDGETS:
            p = plan(scores, b, **options)
            _, scale, keep, weight = _arrays(p)
            assert abs(p.predicted_cost - b) <= 0.01 * b, (name, b, p.predicted_cost)
            assert p.predicted_cost == pytest.approx(np.mean(keep * scale ** 2))
            assert ((keep > 0) & (keep <= 1)).all(), (name, b)
            if options.get("drop") is False:  # never drops; boundary images take a scale
                assert (keep == 1).all()          # between two of the set instead
                assert len(scores) < 100 or np.isin(scale, p.scale_set).mean() > 0.95
            else:
                assert np.isin(scale, p.scale_set).all()
            if options.get("downsample") is False:
                assert (scale == 1).all()
            if options.get("weighting") is False:
                assert (weight == 1).all()


def test_scales_grow_with_rank_and_weights_average_one_over_kept():
    scores = np.random.default_rng(1).lognormal(0, 1, 300)
    for b in (0.3, 0.5, 0.7):
        ranks, scale, keep, weight = _arrays(plan(scores, b))
        order = np.argsort(ranks, kind="stable")
        assert (np.diff(scale[order]) >= 0).all()
        assert (np.diff(weight[order]) > 0).all()  # loss weight grows with complexity
        assert (keep * weight).sum() / keep.sum() == pytest.approx(1.0, abs=1e-12)
        assert set(scale) <= {0.5, 0.625, 0.75, 0.875, 1.0}


def test_saving_goes_to_dropping_the_least_complex_first():
    scores = np.arange(100.0)
    ranks, scale, keep, _ = _arrays(plan(scores, 0.9))
    assert (scale == 1).all()  # no downsampling yet
    assert (keep[ranks > 0.25] == 1).all() and (keep[ranks < 0.19] == 0.5).all()
    p = plan(scores, 0.5)
    ranks, scale, keep, _ = _arrays(p)
    assert p.drop_quantile == 0.5 and p.keep_min == 0.5
    assert scale[np.argmax(ranks)] == 1.0 and scale[np.argmin(ranks)] == 0.5


@pytest.mark.parametrize("scores", [np.arange(10.0), np.zeros(3)])
def test_budget_one_is_exactly_the_plain_run(scores):
    p = plan(scores, 1.0)
    _, scale, keep, weight = _arrays(p)
    assert p.predicted_cost == 1.0
    assert (scale == 1).all() and (keep == 1).all() and (weight == 1).all()


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), float("inf"), "half", None, True])
def test_invalid_budget_is_a_one_line_error(bad):
    with pytest.raises(DanceError, match="budget must be a number in \\(0, 1\\]"):
        plan([1.0, 2.0], bad)


def test_empty_or_bad_scores_are_errors():
    with pytest.raises(DanceError, match="no complexity scores"):
        plan([], 0.5)
    with pytest.raises(DanceError, match="'b' has a non-finite"):
        plan([1.0, float("nan")], 0.5, ["a", "b"])
    with pytest.raises(DanceError, match="unknown plan option 'smin'"):
        plan([1.0, 2.0], 0.5, smin=0.5)


def _scores_csv(tmp_path, n=12):
    path = tmp_path / "scores.csv"
    rows = [f"img{i:02d},/data/img{i:02d}.png,si,{(i * 7) % n + 0.5}" for i in range(n)]
    path.write_text("id,path,indicator,score\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("bad", ["0", "-0.5", "1.5", "nan", "abc", "inf"])
def test_cli_rejects_invalid_budget_with_one_line(tmp_path, capsys, bad):
    rc = main(["plan", "--scores", str(_scores_csv(tmp_path)), "--budget", bad])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and f"budget must be a number in (0, 1], got '{bad}'" in err


def test_cli_json_has_the_spec_fields(tmp_path, capsys):
    assert main(["plan", "--scores", str(_scores_csv(tmp_path)), "--budget", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"budget", "predicted_cost", "scales", "drop_quantile", "keep_min",
            "per_image"} <= set(out)
    assert out["budget"] == 0.5 and out["predicted_cost"] == pytest.approx(0.5, rel=0.01)
    assert sum(out["scales"].values()) == 12 and len(out["per_image"]) == 12
    assert set(out["per_image"][0]) == {"id", "score", "rank", "scale", "keep_prob", "weight"}
    assert main(["plan", "--scores", str(_scores_csv(tmp_path)), "--budget", "0.5"]) == 0
    table = capsys.readouterr().out
    assert "predicted cost 0.5000" in table and "12 images" in table


def test_json_round_trip_is_exact():
    scores = np.random.default_rng(2).random(40)
    for p in (plan(scores, 0.37, schedule="progressive", beta=0.8).shuffled(5),
              plan(scores, 0.6, drop=False, gamma=2.0), progressive_plan(list("abc"), 0.5)):
        d = json.loads(json.dumps(p.to_json()))
        q = DataSlimmingPlan.from_json(d)
        assert q == p and q.to_json() == p.to_json()
        np.testing.assert_array_equal(q.epoch_policy(2, 5).scale, p.epoch_policy(2, 5).scale)


def test_replan_keeps_the_budget_and_moves_hard_images_up():
    scores = np.arange(20.0)
    ids = [f"im{i}" for i in range(20)]
    p = plan(scores, 0.5, ids)
    hardness = np.zeros(20)
    hardness[0] = 5.0  # the least complex image turns out to be the hardest
    q = p.replan(hardness, alpha=0.5)
    assert q.predicted_cost == pytest.approx(0.5, rel=1e-9)
    assert q.per_image[0].rank > 0.45 > p.per_image[0].rank
    assert q.per_image[0].scale > p.per_image[0].scale
    assert q.per_image[0].score == 0.0  # scores are data; only the rank moves
    assert p.replan(hardness, alpha=0.0) == p
    # by id, with unknown images keeping their complexity rank
    assert p.replan({"im0": 5.0, "im1": 0.0}, alpha=0.5).per_image[0].rank > p.per_image[0].rank


def test_shuffled_keeps_cost_and_multiset_of_policies():
    p = plan(np.random.default_rng(3).random(50), 0.45)
    s = p.shuffled(7)
    assert s.predicted_cost == pytest.approx(p.predicted_cost, rel=1e-12)
    triples = lambda x: sorted((q.scale, q.keep_prob, q.weight) for q in x.per_image)  # noqa: E731
    assert triples(s) == triples(p)
    assert [q.id for q in s.per_image] == [q.id for q in p.per_image]
    assert [q.scale for q in s.per_image] != [q.scale for q in p.per_image]
    assert s == p.shuffled(7) and s != p.shuffled(8)


def test_progressive_dance_plan_grows_scales_and_spends_the_budget():
    p = plan(np.random.default_rng(4).random(80), 0.5, schedule="progressive")
    for epochs in (1, 3, 8):
        pols = [p.epoch_policy(e, epochs) for e in range(epochs)]
        assert np.mean([x.cost for x in pols]) == pytest.approx(p.predicted_cost, rel=0.01)
        for a, b in zip(pols, pols[1:]):
            assert (b.scale >= a.scale).all()
    pols = [p.epoch_policy(e, 8) for e in range(8)]
    # per-epoch budgets are those of progressive resizing: (0.5 -> 0.891)² over 8 epochs
    assert [x.cost for x in pols] == pytest.approx(progressive_scales(0.5, 8) ** 2, rel=1e-9)
    assert pols[0].cost == pytest.approx(0.25) and pols[-1].cost == pytest.approx(0.7937, abs=1e-4)
    static = plan(np.arange(5.0), 0.5)
    assert static.epoch_policy(0, 3).scale.tolist() == static.epoch_policy(2, 3).scale.tolist()


def test_progressive_and_uniform_controls():
    ids = [f"im{i}" for i in range(6)]
    p = progressive_plan(ids, 0.5)
    pols = [p.epoch_policy(e, 4) for e in range(4)]
    per_epoch = [np.unique(x.scale) for x in pols]
    assert all(len(u) == 1 for u in per_epoch)  # one scale per epoch
    np.testing.assert_allclose([u[0] for u in per_epoch], progressive_scales(0.5, 4))
    assert np.all(np.diff([u[0] for u in per_epoch]) > 0)
    assert np.mean([x.cost for x in pols]) == pytest.approx(0.5, rel=1e-12)
    assert all((x.keep_prob == 1).all() and (x.weight == 1).all() for x in pols)
    # 4 epochs at budget 0.5: starts at min(scale_set), linear, ends below 1
    # (0.25 + 0.39473 + 0.57236 + 0.78291) / 4 = 0.5
    np.testing.assert_allclose(progressive_scales(0.5, 4), [0.5, 0.62827, 0.75655, 0.88482],
                               atol=1e-5)
    assert progressive_scales(0.9, 4)[-1] == pytest.approx(1.0)
    u = uniform_plan(ids, 0.49)
    assert {q.scale for q in u.per_image} == {0.7} and u.predicted_cost == pytest.approx(0.49)


def test_keep_floor_drops_the_least_complex_harder_before_downsampling():
    scores = np.random.default_rng(3).random(200)
    soft, hard = plan(scores, 0.5), plan(scores, 0.5, keep_floor=0.2)
    for p in (soft, hard):
        assert abs(p.predicted_cost - 0.5) < 0.005
    assert hard.keep_min == pytest.approx(0.2) and soft.keep_min == pytest.approx(0.5)
    # the saving moved from downsampling to dropping: the kept images are larger
    mean_scale = [np.mean([q.scale for q in p.per_image if q.rank > 0.5]) for p in (soft, hard)]
    assert mean_scale[1] > mean_scale[0]
    assert DataSlimmingPlan.from_json(hard.to_json()).keep_floor == pytest.approx(0.2)
    with pytest.raises(DanceError, match="keep_floor"):
        plan(scores, 0.5, keep_floor=0.0)


def test_coarse_scales_put_each_epoch_on_the_two_scales_around_its_budget():
    scores = np.random.default_rng(5).random(120)
    p = plan(scores, 0.5, schedule="progressive", drop=False, scales_per_epoch=2)
    ranks = np.array([q.rank for q in p.per_image])
    targets = progressive_scales(0.5, 6)
    for e in range(6):
        pol = p.epoch_policy(e, 6)
        assert pol.cost == pytest.approx(targets[e] ** 2, rel=1e-9)
        grid = np.array(p.scale_set)
        on_grid = np.isclose(pol.scale[:, None], grid[None]).any(1)
        assert (~on_grid).sum() <= 1  # one boundary image between the two scales
        assert len(np.unique(pol.scale[on_grid])) <= 2
        lo, hi = grid[grid <= targets[e] + 1e-12].max(), grid[grid >= targets[e] - 1e-12].min()
        assert pol.scale.min() >= lo - 1e-12 and pol.scale.max() <= hi + 1e-12
        # the most complex images hold the upper scale
        assert (np.diff(pol.scale[np.argsort(ranks)]) >= -1e-12).all()
    one = plan(scores, 0.5, schedule="progressive", drop=False, scales_per_epoch=1)
    for e in range(6):
        np.testing.assert_allclose(one.epoch_policy(e, 6).scale, targets[e])
    again = DataSlimmingPlan.from_json(json.loads(json.dumps(p.to_json())))
    np.testing.assert_array_equal(again.epoch_policy(3, 6).scale, p.epoch_policy(3, 6).scale)
    with pytest.raises(DanceError, match="needs drop=False"):
        plan(scores, 0.5, scales_per_epoch=2)
    with pytest.raises(DanceError, match="scales_per_epoch must be 0, 1 or 2"):
        plan(scores, 0.5, drop=False, scales_per_epoch=3)


def test_final_full_ends_the_schedule_at_full_scale_on_the_same_budget():
    s = progressive_scales(0.5, 12, final_full=0.17)
    assert s[-2:].tolist() == [1.0, 1.0] and (s[:-2] < 1).all()
    assert np.mean(s ** 2) == pytest.approx(0.5, rel=1e-12)
    np.testing.assert_allclose(s[:-2], progressive_scales((0.5 * 12 - 2) / 10, 10))
    assert (np.diff(s) >= 0).all()
    scores = np.random.default_rng(6).random(50)
    p = plan(scores, 0.5, schedule="progressive", drop=False, final_full=0.25)
    assert (p.epoch_policy(7, 8).scale == 1).all() and (p.epoch_policy(5, 8).scale < 1).any()
    assert np.mean([p.epoch_policy(e, 8).cost for e in range(8)]) == pytest.approx(0.5, rel=0.01)
    c = progressive_plan([str(i) for i in range(5)], 0.5, final_full=0.25)
    assert (c.epoch_policy(7, 8).scale == 1).all()
    assert DataSlimmingPlan.from_json(c.to_json()).final_full == 0.25
    with pytest.raises(DanceError, match="needs the progressive schedule"):
        plan(scores, 0.5, final_full=0.2)
    with pytest.raises(DanceError, match="cannot pay"):
        progressive_scales(0.1, 4, final_full=0.5)


def test_cli_plans_as_training_does_and_writes_the_plan(tmp_path, capsys):
    """dance plan shows the plan dance train starts from: the same data_slimming settings
    (defaults: progressive, no drops, one scale per epoch), or a config's."""
    from dance.data.plan import plan_for_policy
    from dance.data.scoring import read_scores_csv
    from dance.engine.config import load_config
    csv = _scores_csv(tmp_path)
    out = tmp_path / "plan.json"
    assert main(["plan", "--scores", str(csv), "--budget", "0.5", "--out", str(out)]) == 0
    assert "schedule progressive" in capsys.readouterr().out
    ids, scores = read_scores_csv(csv)
    expected = plan_for_policy(load_config(None).data_slimming, 0.5, ids, scores)
    assert DataSlimmingPlan.from_json(json.loads(out.read_text())) == expected
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data_slimming: {schedule: static, drop: true, scales_per_epoch: 0}\n")
    assert main(["plan", "--scores", str(csv), "--budget", "0.5", "--config", str(cfg),
                 "--json"]) == 0
    static = json.loads(capsys.readouterr().out)
    assert static["schedule"] == "static" and static["keep_min"] < 1.0


def test_a_plan_that_cuts_little_drops_instead_of_downscaling():
    """data_slimming.drop_above: a plan at a budget of at least it (a long run whose slim
    network leaves the data little to cut) drops the least complex images' steps at mixed
    scales; below it, or with drop or downsample set otherwise, the options are as written."""
    from dance.data.plan import drops_instead, plan_for_policy
    from dance.engine.config import DataSlimmingConfig
    ids = [str(i) for i in range(60)]
    scores = np.random.default_rng(3).random(60)
    ds = DataSlimmingConfig(drop_above=0.8)
    light = plan_for_policy(ds, 0.9, ids, scores)
    assert (light.drop, light.downsample, light.scales_per_epoch) == (True, False, 0)
    assert set(light.scales) == {1.0} and light.predicted_cost == pytest.approx(0.9, abs=0.01)
    written = DataSlimmingConfig(drop=True, downsample=False, scales_per_epoch=0)
    assert light == plan_for_policy(written, 0.9, ids, scores)  # the same plan as written out
    kept = np.array([q.keep_prob for q in light.per_image])
    ranks = np.array([q.rank for q in light.per_image])
    assert kept[ranks <= 0.05].max() < 1.0 and kept[ranks >= 0.5].min() == 1.0  # least complex
    assert drops_instead(0.8, 0.8, False, True) and not drops_instead(0.8, 0.79, False, True)
    heavy = plan_for_policy(ds, 0.7, ids, scores)
    assert heavy == plan_for_policy(DataSlimmingConfig(), 0.7, ids, scores)  # as written
    assert heavy.downsample and not heavy.drop and heavy.scales_per_epoch == 1
    assert plan_for_policy(DataSlimmingConfig(drop_above=None), 0.9, ids, scores).downsample
    assert not plan_for_policy(DataSlimmingConfig(), 0.9, ids, scores).downsample  # 0.8
    both = DataSlimmingConfig(drop_above=0.8, drop=True, scales_per_epoch=0)
    assert plan_for_policy(both, 0.9, ids, scores).downsample
    # the library's plan() takes the option as dance train does
    import dance
    assert not dance.plan(scores, 0.9, ids, drop_above=0.8).downsample
    assert not dance.plan(scores, 0.9, ids).downsample  # the default, as dance train's
    assert dance.plan(scores, 0.9, ids, drop_above=None).downsample
    assert dance.plan(scores, 0.7, ids, drop_above=0.8).downsample
    with pytest.raises(ValueError, match="drop_above"):
        DataSlimmingConfig(drop_above=1.5)
