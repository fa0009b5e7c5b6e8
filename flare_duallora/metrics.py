"""Classification metrics with scikit-learn semantics: per class and macro, binary and multi-class.

``balanced_accuracy`` is scikit-learn's (mean recall over the classes present in ``y_true``); sensitivity and
specificity are one-vs-rest per class; for a binary task the headline sensitivity / specificity are those of
the positive class (1 = disease), as in Med-DualLoRA and CineMA.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, matthews_corrcoef, roc_auc_score


def _safe_div(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def classification_metrics(
    y_true: Sequence[int],
    probs: np.ndarray,
    num_classes: Optional[int] = None,
    label_names: Optional[Sequence[str]] = None,
) -> dict:
    """Metrics from true labels and predicted class probabilities ``(N, C)``.

    Returns a flat dict: ``balanced_accuracy``, ``accuracy``, ``sensitivity``, ``specificity``, ``mcc``,
    ``auc`` (macro one-vs-rest over classes present), plus ``<metric>/<class>`` per class and ``n``.
    """
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or len(probs) != len(y_true):
        raise ValueError(f"probs must be (N, C) with N = len(y_true) = {len(y_true)}; got {probs.shape}")
    c = num_classes or probs.shape[1]
    names = list(label_names) if label_names is not None else [str(i) for i in range(c)]
    y_pred = probs.argmax(1)
    labels = list(range(c))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    total = cm.sum()
    out: dict = {"n": int(len(y_true))}
    sens, spec, aucs = [], [], []
    present = set(y_true.tolist())
    for k in labels:
        tp = cm[k, k]
        fn = cm[k].sum() - tp
        fp = cm[:, k].sum() - tp
        tn = total - tp - fn - fp
        s_k, p_k = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp)
        out[f"sensitivity/{names[k]}"], out[f"specificity/{names[k]}"] = s_k, p_k
        if k in present and len(present) > 1:
            a_k = float(roc_auc_score((y_true == k).astype(int), probs[:, k]))
            out[f"auc/{names[k]}"] = a_k
            aucs.append(a_k)
        if k in present:
            sens.append(s_k)
            spec.append(p_k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on classes absent from y_pred
        out["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else float("nan")
        out["mcc"] = float(matthews_corrcoef(y_true, y_pred)) if len(y_true) else float("nan")
    out["accuracy"] = _safe_div(np.trace(cm), total)
    if c == 2:
        out["sensitivity"], out["specificity"] = out[f"sensitivity/{names[1]}"], out[f"specificity/{names[1]}"]
        out["auc"] = out.get(f"auc/{names[1]}", float("nan"))
    else:
        out["sensitivity"] = float(np.mean(sens)) if sens else float("nan")
        out["specificity"] = float(np.mean(spec)) if spec else float("nan")
        out["auc"] = float(np.mean(aucs)) if aucs else float("nan")
    return out


HEADLINE = ("balanced_accuracy", "sensitivity", "specificity", "mcc", "auc")

#: every metric name :func:`classification_metrics` writes (per class as ``<name>/<class>``), plus ``loss``
METRIC_NAMES = ("balanced_accuracy", "accuracy", "sensitivity", "specificity", "mcc", "auc", "n", "loss")
#: the models a site reports metrics of
MODEL_KINDS = ("personalised", "global_only", "global_only_received", "personalised_after_training")


def is_metric_name(name: str) -> bool:
    """``balanced_accuracy``, ``sensitivity/AK``, ...: a name :func:`classification_metrics` writes."""
    base, sep, label = str(name).partition("/")
    if base not in METRIC_NAMES:
        return False
    return not sep or (0 < len(label) <= 64 and "/" not in label and "." not in label)
