"""Model adapters: install a token reduction into a model family without copying its code.

One adapter per family; `adapter_for(model)` picks it or raises a one-line UserError.
"""

from __future__ import annotations

from ..errors import UserError
from . import vit


def adapter_for(model):
    if vit.handles(model):
        return vit
    raise UserError(
        f"{type(model).__name__} is not a model family tomectl can reduce; supported: "
        "timm VisionTransformer (DeiT, DeiT-III, ViT AugReg, MAE, DINOv2, register-token ViTs)"
    )
