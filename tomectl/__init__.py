"""tomectl: token merging and pruning for timm Vision Transformers.

Python API:

    import timm, tomectl
    model = tomectl.apply(timm.create_model("deit_small_patch16_224", pretrained=True), r=13)
    model = tomectl.load("runs/deit_s_r13")      # rebuild a reduced model from an artifact
    tomectl.remove(model)                         # back to the plain timm model
"""

__version__ = "0.1.0"


def apply(model, method: str = "tome", r=None, **kwargs):
    """Install a token reduction into a timm ViT in place and return it (see `tomectl.build.apply`)."""
    from .build import apply as _apply

    return _apply(model, method, r, **kwargs)


def load(artifact_dir, weights=None, random_weights: bool = False, track_source: bool = False):
    """Rebuild the reduced model an artifact directory describes (eval mode)."""
    from .artifact import read
    from .build import build

    recipe, _summary = read(artifact_dir)
    return build(recipe, weights=weights, random_weights=random_weights, track_source=track_source).model


def remove(model):
    """Uninstall the reduction: the model computes exactly what timm's model does again."""
    from .adapters import adapter_for

    return adapter_for(model).remove(model)


__all__ = ["__version__", "apply", "load", "remove"]
