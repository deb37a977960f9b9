"""Comparing a reduced model's predictions with the unreduced model's, image by image.

Two absolute accuracies on 1,300 images each carry ~1.1 points of standard error; comparing the
same images' predictions (agreement, flips, KL) measures a drop far more tightly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Comparison:
    n: int
    agreement: float  # top-1 prediction equal to the reference's
    agreement_ci95: tuple[float, float]  # Wilson interval
    kl: float  # mean KL(reference || model), nats
    top1: Optional[float] = None
    top5: Optional[float] = None
    ref_top1: Optional[float] = None
    flips_right_to_wrong: Optional[int] = None
    flips_wrong_to_right: Optional[int] = None
    n_labelled: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["agreement_ci95"] = list(self.agreement_ci95)
        return d


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def kl_per_image(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(logits)) per image, in nats."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).float().mean().item()


def compare(ref_logits: torch.Tensor, logits: torch.Tensor,
            labels: Optional[torch.Tensor] = None) -> Comparison:
    """Agreement, KL, and (for images with a label >= 0) top-1/top-5 and flips."""
    n = ref_logits.shape[0]
    ref_pred, pred = ref_logits.argmax(-1), logits.argmax(-1)
    agree = int((ref_pred == pred).sum())
    kl = kl_per_image(ref_logits, logits).mean().item() if n else 0.0
    out = dict(n=n, agreement=agree / n if n else 0.0, agreement_ci95=wilson(agree, n), kl=kl)
    if labels is not None:
        lab = labels >= 0
        if lab.any():
            y, lg, rl = labels[lab], logits[lab], ref_logits[lab]
            right, ref_right = lg.argmax(-1) == y, rl.argmax(-1) == y
            out.update(
                top1=right.float().mean().item(),
                top5=topk_accuracy(lg, y, min(5, lg.shape[-1])),
                ref_top1=ref_right.float().mean().item(),
                flips_right_to_wrong=int((ref_right & ~right).sum()),
                flips_wrong_to_right=int((~ref_right & right).sum()),
                n_labelled=int(lab.sum()),
            )
    return Comparison(**out)
