"""Many (>100 training images) / Medium (20-100) / Few (<20) accuracy."""

import math

import numpy as np

from train.metrics import accuracy_report, class_groups


def test_group_boundaries():
    assert class_groups([101, 100, 20, 19, 0, 5000]).tolist() == [0, 1, 1, 2, 2, 0]


def test_accuracy_report():
    train_counts = [500, 101, 100, 20, 19, 1]  # Many: 0,1  Medium: 2,3  Few: 4,5
    total = np.array([10, 10, 10, 10, 10, 20])
    correct = np.array([10, 8, 5, 3, 1, 0])
    r = accuracy_report(correct, total, train_counts)
    assert math.isclose(r["top1"], 100 * 27 / 70)
    assert math.isclose(r["many"], 90.0) and math.isclose(r["medium"], 40.0) and math.isclose(r["few"], 5.0)
    assert np.allclose(r["per_class"], [100, 80, 50, 30, 10, 0])


def test_empty_group_and_unseen_class():
    r = accuracy_report([3, 0], [4, 0], [200, 50])  # class 1 absent from the evaluation set
    assert r["many"] == 75.0 and math.isnan(r["medium"]) and math.isnan(r["few"])
    assert math.isnan(r["per_class"][1])
