"""Classification metrics with scikit-learn semantics (per class and macro, binary and multi-class) and
segmentation metrics with ``monai.metrics`` (Dice and 95 % Hausdorff distance per foreground class and their mean).

``balanced_accuracy`` is scikit-learn's (mean recall over the classes present in ``y_true``); sensitivity and
specificity are one-vs-rest per class; for a binary task the headline sensitivity / specificity are those of
the positive class (1 = disease), as in Med-DualLoRA and CineMA.
"""

from __future__ import annotations

import re
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


def _finite(v) -> Optional[float]:
    v = float(v)
    return v if np.isfinite(v) else None


def segmentation_metrics(preds: Sequence, labels: Sequence, label_names: Sequence[str],
                         spacings: Optional[Sequence[Optional[Sequence[float]]]] = None) -> dict:
    """Dice and 95 % Hausdorff distance of one-hot ``(1, C, ...)`` predictions against one-hot labels, one pair per
    validation volume, with ``monai.metrics``.

    ``spacings``: each volume's voxel size (mm per voxel, from its MetaTensor affine); the distances are then in mm.
    Without a spacing for every volume they are in voxels, and ``hd95_unit`` says which (1: mm, 0: voxels).

    Returns ``dice`` / ``hd95`` (mean over the foreground classes, channel 0 being the background), ``dice/<class>``
    and ``hd95/<class>`` per foreground class (mean over the volumes where the class is present; None where it is
    present in none, or where a prediction is empty so the distance is undefined) and ``n`` (volumes).
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    spacings = list(spacings) if spacings is not None else [None] * len(preds)
    in_mm = len(spacings) == len(preds) and all(s is not None and len(s) == p.ndim - 2 and all(v > 0 for v in s)
                                                for p, s in zip(preds, spacings))
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    # no distance for the background (channel 0): it is never reported, and it is the largest surface
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    for p, y, sp in zip(preds, labels, spacings):
        p, y = _plain(p), _plain(y)  # MetaTensor bookkeeping costs more than the distances on small volumes
        dice(y_pred=p, y=y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # monai warns for classes absent from a prediction or a label
            hd(y_pred=p, y=y, **({"spacing": [float(v) for v in sp]} if in_mm else {}))
    d = dice.aggregate().double().cpu().numpy()  # (N, C), NaN where the class is absent from the label
    h = hd.aggregate().double().cpu().numpy()  # (N, C - 1)
    h[~np.isfinite(h)] = np.nan
    out: dict = {"n": int(d.shape[0]), "hd95_unit": 1 if in_mm else 0}
    per_dice, per_hd = [], []
    for c in range(1, d.shape[1]):
        name = label_names[c] if c < len(label_names) else str(c)
        dc = np.nanmean(d[:, c]) if np.isfinite(d[:, c]).any() else np.nan
        hc = np.nanmean(h[:, c - 1]) if np.isfinite(h[:, c - 1]).any() else np.nan
        out[f"dice/{name}"], out[f"hd95/{name}"] = _finite(dc), _finite(hc)
        per_dice.append(dc)
        per_hd.append(hc)
    dice_fg = [v for v in per_dice if np.isfinite(v)]
    hd_fg = [v for v in per_hd if np.isfinite(v)]
    out["dice"] = _finite(np.mean(dice_fg)) if dice_fg else None
    out["hd95"] = _finite(np.mean(hd_fg)) if hd_fg else None
    return out


def _plain(t):
    """A MetaTensor as a plain tensor (same storage); anything else as it is."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


HEADLINE = ("balanced_accuracy", "sensitivity", "specificity", "mcc", "auc")
#: what the summary table shows for a segmentation site
SEGMENTATION_HEADLINE = ("dice", "hd95")

#: every metric name :func:`classification_metrics` and :func:`segmentation_metrics` write (per class as
#: ``<name>/<class>``), plus ``loss``; a bundle's ``validate#key_metric`` travels under its own ``val_*`` name
METRIC_NAMES = ("balanced_accuracy", "accuracy", "sensitivity", "specificity", "mcc", "auc", "n", "loss", "dice",
                "hd95", "hd95_unit")
_KEY_METRIC = re.compile(r"val_[a-z0-9_]{1,60}")
#: the models a site reports metrics of
MODEL_KINDS = ("personalised", "global_only", "global_only_received", "personalised_after_training")


def is_key_metric(name: str) -> bool:
    """A bundle's key metric name (``val_mean_dice``, ``val_accuracy``)."""
    return bool(_KEY_METRIC.fullmatch(str(name)))


def is_metric_name(name: str) -> bool:
    """``balanced_accuracy``, ``sensitivity/AK``, ``dice/spleen``, ``val_mean_dice``, ...: a name the metric
    functions write, or a bundle key metric's ``val_*`` name."""
    if is_key_metric(name):
        return True  # a bundle's key metric (model-zoo names: val_mean_dice, val_accuracy)
    base, sep, label = str(name).partition("/")
    if base not in METRIC_NAMES:
        return False
    return not sep or (0 < len(label) <= 64 and "/" not in label and "." not in label)
