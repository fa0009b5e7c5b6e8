"""flare_duallora: personalised federated LoRA for NVIDIA FLARE on MONAI bundles.

``from flare_duallora import DualLoRARecipe`` gives the job recipe.  It is imported lazily: importing nvflare's
recipe module removes ``--export`` / ``--export-dir`` from ``sys.argv``, and FLARE's site processes, which import this
package for its runtime components, never need it.
"""

__version__ = "0.2.0"
__all__ = ["DualLoRARecipe"]


def __getattr__(name):
    if name == "DualLoRARecipe":
        from flare_duallora.deploy.recipe import DualLoRARecipe

        return DualLoRARecipe
    raise AttributeError(f"module 'flare_duallora' has no attribute {name!r}")
