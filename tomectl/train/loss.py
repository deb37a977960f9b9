"""The training loss: distillation from the unreduced model (see the package docstring)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _pre_logits_tap(model):
    """Forward hook on the classifier head: keeps its input (the pre-logits features)."""
    box: dict = {}

    def hook(module, inputs, output):
        box["features"] = inputs[0]

    head = getattr(model, "head", None)
    handle = head.register_forward_hook(hook) if isinstance(head, torch.nn.Module) else None
    return box, handle


def _aux_loss(modules) -> torch.Tensor:
    total = None
    for m in modules.modules():
        a = getattr(m, "aux_loss", None)
        if isinstance(a, torch.Tensor):
            total = a if total is None else total + a
    return total


def distillation_loss(model, x: torch.Tensor, *, teacher=None, labels: Optional[torch.Tensor] = None,
                      ce_weight: float = 0.0, feature_weight: float = 0.0, student=None,
                      taps: Optional[tuple] = None) -> tuple[torch.Tensor, dict]:
    """The training loss on one batch and its parts {kl, aux, ce} (see the module docstring).

    The reference is `teacher` (a frozen copy) or, by default, `model` itself with its reduction
    switched off (same frozen weights). `student` is what runs the reduced forward (the DDP wrapper
    of `model` in a distributed run). `taps` = (student box, teacher box) from `_pre_logits_tap`,
    needed for feature distillation.
    """
    from ..reduced import learned_modules, reduction_off

    student = model if student is None else student
    with torch.no_grad():
        if teacher is not None:
            t_logits = teacher(x)
        else:
            with reduction_off(model):
                t_logits = model(x)
        t_feat = None
        if taps is not None:
            t_feat = (taps[1] if teacher is not None else taps[0]).get("features")
    s_logits = student(x)
    kl = F.kl_div(F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1),
                  reduction="batchmean", log_target=True)
    loss = kl
    if feature_weight > 0 and taps is not None and t_feat is not None:
        loss = loss + feature_weight * F.mse_loss(taps[0]["features"], t_feat)
    modules = learned_modules(model)
    aux = _aux_loss(modules) if modules is not None else None
    if aux is not None:
        loss = loss + aux
    ce = None
    if labels is not None and ce_weight > 0:
        ce = F.cross_entropy(s_logits, labels)
        loss = loss + ce_weight * ce
    return loss, {"kl": kl, "aux": aux, "ce": ce}
