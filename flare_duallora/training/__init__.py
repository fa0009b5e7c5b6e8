"""Local training of an adapted network on one site (no FLARE)."""

from flare_duallora.training.batch import pick_device
from flare_duallora.training.site import RoundStats, SiteTrainer, make_loader, state_checksum

__all__ = ["RoundStats", "SiteTrainer", "make_loader", "pick_device", "state_checksum"]
