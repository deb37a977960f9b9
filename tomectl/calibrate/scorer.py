"""Scoring schedules: top-1 agreement and KL against the unreduced model on calibration images."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..adapters import adapter_for
from ..metrics import compare
from ..reduced import plan_of, reduction_off, replan
from .space import Candidate


class Scorer:
    """Scores schedules on fixed calibration images against the unreduced model (computed once)."""

    def __init__(self, model, images: torch.Tensor, labels: Optional[torch.Tensor], method_options: dict,
                 batch_size: int = 64):
        from ..evaluate import predict

        self._predict = predict
        self.model = model
        self.images = images
        self.labels = labels if labels is not None and (labels >= 0).any() else None
        self.batch_size = batch_size
        self.options = method_options
        self.cache: dict = {}
        adapter = adapter_for(model)
        self.adapter = adapter
        if plan_of(model) is None:
            from ..build import install

            install(model, "tome", [0] * adapter.num_layers(model))
        with reduction_off(model):  # the reference: timm's own model
            self.ref = predict(model, images, batch_size=batch_size)

    def _install(self, method: str, removed: Sequence[int]) -> None:
        """Re-plan the model for a candidate (eager PyTorch: the scatter formulation; the numbers do
        not depend on it)."""
        options = dict(self.options.get(method) or {})
        replan(self.model, method=method, removed=tuple(removed), options=options, formulation="scatter")

    def score(self, cand: Candidate, n: Optional[int] = None) -> Candidate:
        """Score on the first `n` images (all by default); the cache keeps each (schedule, n)."""
        n = len(self.images) if n is None else min(n, len(self.images))
        key = (cand.method, cand.removed, n)
        if key not in self.cache:
            self._install(cand.method, cand.removed)
            logits = self._predict(self.model, self.images[:n], batch_size=self.batch_size)
            labels = None if self.labels is None else self.labels[:n]
            c = compare(self.ref[:n], logits, labels)
            self.cache[key] = (c.agreement, c.kl, c.top1)
        cand.agreement, cand.kl, cand.top1 = self.cache[key]
        cand.n_scored = n
        return cand
