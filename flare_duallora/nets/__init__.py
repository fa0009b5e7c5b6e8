"""Network wrappers used by the reference bundles (``_target_: flare_duallora.nets.ViTClassifier``)."""

from .vit_classifier import ViTClassifier

__all__ = ["ViTClassifier"]
