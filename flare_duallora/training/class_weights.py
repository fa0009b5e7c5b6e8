"""Class weights of a site's loss, from the site's own training labels (nothing leaves the site).

A bundle asks for them with two config ids (the reference bundles do)::

    "class_weighting": "inverse_frequency",   # or "none"
    "class_weights": null,                     # filled in by the site before the loss is built
    "loss": {"_target_": "torch.nn.CrossEntropyLoss",
             "weight": "$None if @class_weights is None else torch.tensor(@class_weights, dtype=torch.float32)"}

:func:`apply_class_weighting` reads the labels of the bundle's ``train_datalist`` (the site's training split, as the
bundle reads it; never validation or test), computes the weights and sets ``class_weights`` before the loss is
parsed.  Inverse frequency: ``w_c = N / (K_present * n_c)`` over the ``N`` training labels, ``K_present`` classes
that occur, so the weighted mean weight of the training examples is 1; a class the site has no training example of
gets weight 0 (no term of the loss carries it).  Balanced accuracy, the benchmark's metric, weighs every class alike;
so does this loss.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

CLASS_WEIGHTING = ("none", "inverse_frequency")


def inverse_frequency(labels: Sequence[int], num_classes: int) -> list[float]:
    """``w_c = N / (K_present * n_c)`` for the classes present in ``labels``, 0 for absent ones."""
    counts = Counter(int(y) for y in labels)
    if not counts:
        raise ValueError("no training labels to weigh the classes by")
    bad = sorted(c for c in counts if not 0 <= c < num_classes)
    if bad:
        raise ValueError(f"training labels {bad} are outside 0..{num_classes - 1}")
    n, present = sum(counts.values()), len(counts)
    return [n / (present * counts[c]) if counts[c] else 0.0 for c in range(num_classes)]


def apply_class_weighting(runtime) -> Optional[list[float]]:
    """Set the bundle's ``class_weights`` from the site's training labels when its ``class_weighting`` asks for it;
    the weights, or None (``none`` or no ``class_weighting`` id).  Call before the loss is parsed."""
    from flare_duallora.bundle import BundleConfigError

    mode = runtime.get("class_weighting")
    if mode is None or mode == "none":
        return None
    if mode not in CLASS_WEIGHTING:
        raise BundleConfigError(f"config id 'class_weighting' = {mode!r} in {runtime.source_of('class_weighting')}: "
                                f"expected one of {CLASS_WEIGHTING}")
    if not runtime.has("class_weights"):
        raise BundleConfigError(f"config id 'class_weighting' in {runtime.source_of('class_weighting')} needs a "
                                f"'class_weights' id (null) that the loss reads")
    items = runtime.parsed("train_datalist")
    try:
        labels = [int(item["label"]) for item in items]
    except (TypeError, KeyError, ValueError) as e:
        raise BundleConfigError(f"class_weighting = {mode}: the training items need integer 'label's ({e})") from None
    k = runtime.num_classes or (max(labels) + 1 if labels else 0)
    weights = inverse_frequency(labels, int(k))
    runtime.parser.set(weights, "class_weights")
    return weights
