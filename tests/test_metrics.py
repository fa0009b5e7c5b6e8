"""Classification metrics against their definitions and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, matthews_corrcoef, roc_auc_score

from flare_duallora.metrics import classification_metrics


def test_binary_sensitivity_specificity_are_those_of_the_disease_class():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.7, 0.3, 0.9, 0.8, 0.4, 0.6, 0.7, 0.2])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1), label_names=["NOR", "disease"])
    pred = (p1 > 0.5).astype(int)
    tp, fn = ((pred == 1) & (y == 1)).sum(), ((pred == 0) & (y == 1)).sum()
    tn, fp = ((pred == 0) & (y == 0)).sum(), ((pred == 1) & (y == 0)).sum()
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["balanced_accuracy"] == pytest.approx((m["sensitivity"] + m["specificity"]) / 2)
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["sensitivity/NOR"] == pytest.approx(m["specificity/disease"])


def test_multiclass_macro_metrics_follow_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    probs = rng.dirichlet(np.ones(4), 60)
    probs[np.arange(60), y] += 0.3 * rng.random(60)
    probs /= probs.sum(1, keepdims=True)
    m = classification_metrics(y, probs)
    pred = probs.argmax(1)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    per_class_sens = [((pred == k) & (y == k)).sum() / (y == k).sum() for k in range(4)]
    assert m["sensitivity"] == pytest.approx(np.mean(per_class_sens))
    assert set(k for k in m if k.startswith("specificity/")) == {f"specificity/{k}" for k in range(4)}


def test_absent_class_does_not_enter_balanced_accuracy_and_bad_shapes_fail():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
    m = classification_metrics(y, probs)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert np.isnan(m["sensitivity/2"])
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics([0, 1], np.ones((3, 2)))
