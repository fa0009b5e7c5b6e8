"""MONAI bundle runtime: parse a bundle, build its network/datasets/loss/optimizer, export personalised bundles."""

from .export import export_bundle, load_bundle_network
from .runtime import REQUIRED_IDS, BundleConfigError, BundleRuntime, load_state_dict_file

__all__ = [
    "REQUIRED_IDS",
    "BundleConfigError",
    "BundleRuntime",
    "export_bundle",
    "load_bundle_network",
    "load_state_dict_file",
]
