"""Shared fixtures. The real weights and images live in ../shared beside the checkout; tests that
need them skip with a clear reason where it is absent (never commit them into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOMECTL_SHARED", ROOT.parent / "shared"))
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
VAL = SHARED / "data" / "imagenet-val-1300"
TRAIN = SHARED / "data" / "imagenet-train-1000"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (put the project's shared/ folder beside the checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_weights() -> Path:
    return _need(WEIGHTS, "shared DeiT-Tiny weights")


@pytest.fixture(scope="session")
def val_dir() -> Path:
    return _need(VAL, "shared ImageNet validation images")


@pytest.fixture(scope="session")
def train_dir() -> Path:
    return _need(TRAIN, "shared ImageNet training images")


@pytest.fixture
def deit_tiny(tiny_weights):
    """A fresh DeiT-Tiny with the real shared weights (eval mode). Fresh per test: apply() mutates."""
    from tomectl import models

    return models.create("deit_tiny_patch16_224", weights=tiny_weights).model


@pytest.fixture(scope="session")
def val_images(val_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """48 shared validation images (squashed to 224) and their labels, decoded once."""
    from tomectl import data, models

    pre = models.preprocessing(models.create("deit_tiny_patch16_224", random_weights=True).model)
    samples = data.scan(val_dir, limit=48)
    x = data.load_images(val_dir, pre, 48, resize="squash")
    y = torch.tensor([s.label for s in samples])
    return x, y
