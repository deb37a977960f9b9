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


# --- one trace per distinct graph ----------------------------------------------------------------
#
# torch's ONNX exporter takes 10-30 s per DeiT graph here, and many tests export the same model
# (DeiT-Tiny ToMe r=13, the unreduced baselines) through different entry points. `export_graph` is a
# pure function of the module (structure, attributes, reduction plan, weights) and the example's
# shape, so the suite traces each distinct graph once and hands later callers a copy of the proto.
# Everything after the trace (parity checks, onnxslim, conversion, validation, writing) still runs.
# TOMECTL_TEST_TRACE_CACHE=0 switches it off (to check the exporter's own determinism, for one).


def _module_key(model: torch.nn.Module, h) -> None:
    import dataclasses

    h.update(repr(model).encode())
    for name, mod in model.named_modules():
        attrs = []
        for k, v in sorted(vars(mod).items()):
            if isinstance(v, (bool, int, float, str, tuple, type(None))) or dataclasses.is_dataclass(v):
                attrs.append(f"{k}={v!r}")
        h.update(f"{name}|{type(mod).__qualname__}|{'|'.join(attrs)}".encode())
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name, t in sorted(tensors.items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())


@pytest.fixture(autouse=True, scope="session")
def _trace_once():
    import hashlib

    import onnx

    from tomectl.export import onnx as onnx_export

    if os.environ.get("TOMECTL_TEST_TRACE_CACHE", "1") == "0":
        yield
        return
    real = onnx_export.export_graph
    traced: dict[str, bytes] = {}

    def export_graph(model, example, opset=onnx_export.OPSET, output_names=(onnx_export.OUTPUT_NAME,)):
        h = hashlib.sha256()
        _module_key(model, h)
        h.update(f"{type(model).__qualname__}{model.training}{tuple(example.shape)}{example.dtype}{opset}{tuple(output_names)}".encode())
        key = h.hexdigest()
        if key not in traced:
            traced[key] = real(model, example, opset, output_names).SerializeToString()
        proto = onnx.ModelProto()
        proto.ParseFromString(traced[key])
        return proto

    onnx_export.export_graph = export_graph
    yield
    onnx_export.export_graph = real
