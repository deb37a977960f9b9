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

# under pytest-xdist (`make test` runs a worker per core) each worker computes on one thread
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


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


def _trace_dir(factory) -> Path:
    """Where traces are kept: one folder for the whole run, shared by pytest-xdist's workers (their
    base temp folders are subfolders of the controller's), so each distinct graph is traced once per
    run, not per worker."""
    base = factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "traces"


@pytest.fixture(autouse=True, scope="session")
def _trace_once(tmp_path_factory):
    import hashlib

    import onnx

    from tomectl.export import onnx as onnx_export

    if os.environ.get("TOMECTL_TEST_TRACE_CACHE", "1") == "0":
        yield
        return
    real = onnx_export.export_graph
    store = _trace_dir(tmp_path_factory)
    store.mkdir(parents=True, exist_ok=True)

    def export_graph(model, example, opset=onnx_export.OPSET, output_names=(onnx_export.OUTPUT_NAME,)):
        h = hashlib.sha256()
        _module_key(model, h)
        h.update(f"{type(model).__qualname__}{model.training}{tuple(example.shape)}{example.dtype}{opset}{tuple(output_names)}".encode())
        path = store / f"{h.hexdigest()}.onnx"
        if not path.exists():
            data = real(model, example, opset, output_names).SerializeToString()
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # whole or absent: another worker may read it meanwhile
        proto = onnx.ModelProto()
        proto.ParseFromString(path.read_bytes())
        return proto

    onnx_export.export_graph = export_graph
    yield
    onnx_export.export_graph = real


@pytest.fixture
def in_process_workers(monkeypatch):
    """Timing workers run in the test's own process (the real worker code on the real backend, spec
    and result through JSON as between processes), for tests of what is done with the timings;
    each fresh process costs ~7 s of imports here. Process isolation itself: tests/test_bench.py."""
    import json

    from tomectl import bench, bench_worker

    def run_isolated(spec, workdir, timeout=bench.WORKER_TIMEOUT_S):
        threads = torch.get_num_threads()
        spec = json.loads(json.dumps(spec))
        try:
            run = bench_worker.run_side_by_side if "configs" in spec else bench_worker.run_worker
            return json.loads(json.dumps(run(spec)))
        finally:
            torch.set_num_threads(threads)

    monkeypatch.setattr(bench, "run_isolated", run_isolated)


def pytest_sessionfinish(session):
    """The traces (a few hundred MB a run) go when the run ends; pytest keeps its last temp folders.
    Under pytest-xdist this runs in the controller, after every worker has finished."""
    import shutil

    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # the controller removes it
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        shutil.rmtree(_trace_dir(factory), ignore_errors=True)
