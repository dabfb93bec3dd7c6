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
        "test_many": "90",
        "test_medium": "80",
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


def test_readme_table_is_rewritten_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{rep.README_BEGIN}\nold table\n{rep.README_END}\nafter\n")
    rows = [
        _row("grid", lo, 2, s, 80 + s + (lo == "acl"), 50 + 2 * (lo == "acl")) for lo in ("la", "acl") for s in (1, 2)
    ]
    rep.update_readme(readme, rows)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{rep.README_END}\nafter\n") and "old table" not in text
    assert "| ACL (2) | 2 | 82.5 ± 6.4 |" in text  # mean of 82, 83 with a t-interval over 2 seeds
    assert "| logit-adjusted CE (2) | 2 |" in text and "+1.0 [+1.0, +1.0] | +2.0 [+2.0, +2.0] |" in text
    assert (
        "| ACL (2) | 2 | 82.5 ± 6.4 | 90.0 ± 0.0 | 80.0 ± 0.0 | 52.0 ± 0.0 |  |  |" in text
    )  # no difference with itself


def test_recommended_acl_is_the_validation_best_of_grid_and_ablation_and_the_config_follows(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "SEEDS", (1, 2))
    rows = [
        _row("grid", lo, v, s, 80, 50, settings={"gamma": 1.0}, val=80 + v)
        for lo in ("la", "acl")
        for v in (2, 4, 8)
        for s in (1, 2)
    ]
    small = {"gamma": 0.1, "alpha": 0.05, "lr": 0.1}
    rows += [_row("ablation", "acl", 2, s, 90 + s, 60, settings=small, variant="gamma 0.1", val=95) for s in (1, 2)]
    for r in rows:
        r["epochs"] = str(study.REGIME["epochs"])  # as the saved config's
    rows += [_row("ablation", "acl", 4, 1, 0, 0, settings={"gamma": 0.0}, variant="gamma 0", val=99)]  # one seed only
    name, v, rs = rep.recommended_acl(rows)
    assert (name, v, len(rs)) == ("gamma 0.1", 2, 2)
    table = "\n".join(rep.readme_table(rows))
    assert "| recommended ACL: gamma 0.1 (2) | 2 | 91.5 ± 6.4 |" in table
    acl_8 = "| ACL (8) | 2 | 80.0 ± 0.0 | 90.0 ± 0.0 | 80.0 ± 0.0 | 50.0 ± 0.0 |"
    assert f"{acl_8} +11.5 [+5.1, +17.9] | +10.0 [+10.0, +10.0] |" in table
    rep.save_configs(rows, tmp_path)
    acl = (tmp_path / "mnist_lt_acl.yaml").read_text()
    assert "gamma: 0.1" in acl and "n_views: 2" in acl and "more candidates than the other losses" in acl
    assert "n_views: 8" in (tmp_path / "mnist_lt_la.yaml").read_text()
    monkeypatch.setattr(study.config_mod, "find_config", lambda name: tmp_path / f"{name}.yaml")
    assert "2 seeds of mnist_lt_acl" in study.summary("mnist_lt_acl", rows)  # the ablation runs of that setting
