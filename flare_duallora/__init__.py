"""flare_duallora: personalised federated LoRA for NVIDIA FLARE on MONAI bundles."""

__version__ = "0.1.0"
