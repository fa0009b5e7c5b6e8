"""Network wrappers used by the reference bundles (``_target_: flare_duallora.nets.ViTClassifier`` /
``flare_duallora.nets.ViTSegmenter``)."""

from .vit_classifier import ViTClassifier
from .vit_segmenter import ViTSegmenter

__all__ = ["ViTClassifier", "ViTSegmenter"]
