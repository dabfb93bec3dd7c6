"""The MNIST-LT study's plan and statistics (no training: the rows are made up here)."""

import json
import math
from types import SimpleNamespace

import pytest

pytest.importorskip("yaml")
pytest.importorskip("scipy")

from train import study  # noqa: E402
from train import study_report as rep  # noqa: E402


def test_every_loss_gets_the_same_number_of_candidates():
    sizes = {loss: len(study.candidates(loss)) for loss in study.LOSSES}
    assert set(sizes.values()) == {8}, sizes
    for loss in study.LOSSES:  # distinct candidates, each a setting the config accepts
        cands = study.candidates(loss)
        assert len({json.dumps(c, sort_keys=True) for c in cands}) == 8
        assert set(cands[0]) == set(study.SPACES[loss])


def test_mean_ci_is_the_t_interval():
    m, h = rep.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # sd = 1.5811, t(0.975, 4) = 2.7764, n = 5
    assert m == 3.0 and h == pytest.approx(2.7764 * 1.5811388 / math.sqrt(5), rel=1e-4)
    assert math.isnan(rep.mean_ci([2.0])[1])


def _row(phase, loss, v, seed, top1, few, settings=None, variant="", val=None, curve="1 2 3 4 5"):
    return {
        "phase": phase,
        "variant": variant,
        "loss": loss,
        "n_views": str(v),
        "seed": str(seed),
        "settings": json.dumps(settings or {}, sort_keys=True),
        "epochs": "5",
        "best_epoch": "3",
        "val_top1": str(top1 if val is None else val),
        "test_top1": str(top1),
        "test_few": str(few),
        "val_curve": curve,
    }


def test_paired_difference_pairs_by_seed():
    a = [_row("grid", "acl", 2, s, t, 0) for s, t in ((1, 80.0), (2, 70.0), (3, 90.0))]
    b = [_row("grid", "la", 2, s, t, 0) for s, t in ((3, 89.0), (1, 78.0), (2, 69.0), (4, 10.0))]
    m, h, n = rep.paired(a, b, "test_top1")
    assert n == 3 and m == pytest.approx((2 + 1 + 1) / 3)
    assert h == pytest.approx(rep.mean_ci([2.0, 1.0, 1.0])[1])


def test_chosen_cell_is_the_best_mean_validation_and_needs_every_seed():
    rows = [_row("grid", "acl", 2, s, 0, 0, val=50 + s) for s in (1, 2)]
    rows += [_row("grid", "acl", 4, s, 0, 0, val=60 + s) for s in (1, 2)]
    rows += [_row("grid", "acl", 8, 1, 0, 0, val=99)]  # one seed only: not a candidate yet
    v, rs = rep.chosen_cell(rows, "acl")
    assert v == 4 and len(rs) == 2


def test_convergence_counts_the_best_epoch_in_the_first_80_percent():
    late = _row("grid", "la", 2, 1, 0, 0, curve="1 2 3 4 9")
    late["best_epoch"] = "5"
    rows = [_row("grid", "acl", 2, 1, 0, 0, curve="1 5 3 4 4"), late, _row("search", "la", 2, 0, 0, 0)]
    assert rep.converged_fraction(rows) == (1, 2)
    assert rep.late_gain(late) == 5.0 and rep.late_gain(rows[0]) == 0.0


def test_plan_stages_wait_for_the_search_and_skip_the_unchanged_ablation():
    args = SimpleNamespace(runs="runs/x", cache=".cache", epochs=5, seeds="1,2")
    stages = study.plan([], ["la", "acl"], args)
    assert len(stages[0]) == 16 and not any(stages[1:])
    rows = [
        _row("search", lo, 2, 0, 50, 0, settings=c, val=i)
        for lo in ("la", "acl")
        for i, c in enumerate(study.candidates(lo))
    ]
    stages = study.plan(rows, ["la", "acl"], args)
    best_acl = study.candidates("acl")[-1]
    assert all(j["run"]["settings"] == best_acl for j in stages[1] if j["run"]["loss"] == "acl")
    assert len(stages[1]) == 4  # 2 losses x 2 seeds at V = 2
    variants = {j["variant"] for j in stages[2]}
    changed = {n for n, c in study.ABLATION.items() if not study._unchanged(best_acl, c)}
    assert variants == changed and "gamma 1" not in variants  # best_acl has gamma 1
    assert "negatives by batch count" not in variants  # the base config's own weighting
    assert {j["run"]["n_views"] for j in stages[5]} == {4, 8}
