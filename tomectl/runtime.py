"""The runtime layer under the commands: running a model, an ONNX graph or an engine on images.

- `ort_session`: the one onnxruntime session builder (CPU, CUDA or TensorRT provider, threads).
- `chunks` / `FixedBatchRunner`: a fixed-batch graph (ONNX, TensorRT engine) fed any number of
  images. One padding policy: a short last chunk is filled with copies of its first image (a real
  input, so a merge decision on the padding is an ordinary one), and the padding's outputs dropped.
- `torch_runner`, `ort_runner`, `engine_runner`: image batch -> logits (CPU float) callables.
- `predict`: logits of a whole set of images or a loader through any runner or torch model.

Export (`export/onnx.py`, `export/tensorrt.py`), eval, bench and calibrate all run models
through these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .errors import UserError

Runner = Callable[[torch.Tensor], torch.Tensor]
#: the progress callbacks of long library calls: `progress(what, done, total)` for counted work
#: (bench, calibrate), `status(message)` for steps without a count (export)
ProgressFn = Callable[[str, int, int], None]
Progress = Optional[ProgressFn]
Status = Optional[Callable[[str], None]]

ORT_PROVIDERS = {
    "ort": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def ort_session(path: str | Path, threads: Optional[int] = None, backend: str = "ort"):
    """An onnxruntime session (full graph optimisation; `threads` intra-op threads) on the
    providers of `backend` ("ort": CPU, "ort-cuda", "ort-trt")."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: constant-folding notes are not for users
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    path = _check_onnx_file(path)
    try:
        return ort.InferenceSession(str(path), so, providers=ORT_PROVIDERS[backend])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own classes for a bad graph
        if type(e).__name__ not in ONNX_LOAD_ERRORS:
            raise
        text = str(e).replace("[ONNXRuntimeError] : ", "").strip()
        first = (text.splitlines() or [type(e).__name__])[0]
        if type(e).__name__ == "InvalidProtobuf":
            first = "it is not an ONNX protobuf (truncated, or another kind of file)"
        raise UserError(f"ONNX file {path} cannot be loaded by onnxruntime: {first[:200]}; "
                        f"expected {ONNX_EXPECTED}") from None


#: onnxruntime's exception classes that mean "this file is not a graph it can load"
ONNX_LOAD_ERRORS = ("InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NoModel", "NoSuchFile", "Fail",
                    "NotImplemented")
ONNX_EXPECTED = "an ONNX graph (as `tomectl export ART --onnx FILE` writes)"


def _check_onnx_file(path: str | Path) -> Path:
    """The file, if it can be an ONNX graph at all: one UserError for a missing, empty, directory or
    text file (an ONNX file is a binary protobuf)."""
    from .artifact import check_input_file, text_start

    path = check_input_file(path, "ONNX file", ONNX_EXPECTED)
    start = text_start(path)
    if start is not None:
        raise UserError(f"ONNX file {path} is a text file (it starts with {start!r}), not a binary "
                        f"ONNX graph; expected {ONNX_EXPECTED}")
    return path


def chunks(images: torch.Tensor, batch: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(chunk [batch, ...], how many of its rows are real) over `images`; the last chunk is padded
    with copies of its first image."""
    n = images.shape[0]
    for start in range(0, n, batch):
        chunk = images[start : start + batch]
        real = chunk.shape[0]
        if real < batch:
            chunk = torch.cat([chunk, chunk[:1].expand(batch - real, *chunk.shape[1:])])
        yield chunk, real


class FixedBatchRunner:
    """Feeds a graph of fixed batch `batch` (None: any batch) any number of images.

    run: the graph's call, numpy float32 in and out (`numpy_io`) or torch tensors."""

    def __init__(self, run: Callable, batch: Optional[int], numpy_io: bool = True):
        self.run, self.batch, self.numpy_io = run, batch, numpy_io

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if self.numpy_io:
            return torch.from_numpy(np.asarray(self.run(x.numpy().astype(np.float32, copy=False)))).float()
        return self.run(x).float().cpu()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous()
        if self.batch is None:
            return self._call(x)
        return torch.cat([self._call(chunk)[:real] for chunk, real in chunks(x, self.batch)])


def session_runner(session) -> FixedBatchRunner:
    """A FixedBatchRunner over an onnxruntime session (its batch read from the graph's input)."""
    inp = session.get_inputs()[0]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
    return FixedBatchRunner(lambda a: session.run(None, {inp.name: a})[0], batch, numpy_io=True)


def run_session(session, images: torch.Tensor, batch: Optional[int] = None) -> np.ndarray:
    """Logits of a (fixed-batch) session for any number of images."""
    runner = session_runner(session)
    if batch is not None:
        runner.batch = batch
    return runner(images).numpy()


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def torch_runner(model: torch.nn.Module) -> Runner:
    """A callable image batch -> logits (CPU float) for a torch model, under inference_mode."""
    device = _device_of(model)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.to(device)).float().cpu()

    return run


def torch_fixed(model: torch.nn.Module, batch: int) -> FixedBatchRunner:
    """A torch model fed in the same fixed-size chunks an exported graph of `batch` sees."""
    return FixedBatchRunner(torch_runner(model), batch, numpy_io=False)


def ort_runner(path: str | Path, threads: Optional[int] = None,
               backend: str = "ort") -> tuple[FixedBatchRunner, Optional[list[int]]]:
    """(runner, input size [3, H, W] or None) for an ONNX file."""
    session = ort_session(path, threads=threads, backend=backend)
    shape = list(session.get_inputs()[0].shape)
    size = [int(d) for d in shape[1:]] if all(isinstance(d, int) for d in shape[1:]) else None
    return session_runner(session), size


def engine_runner(path: str | Path) -> tuple[FixedBatchRunner, Optional[list[int]]]:
    """(runner, input size) for a TensorRT engine (UserError without TensorRT or a GPU)."""
    try:
        from .export.tensorrt import TrtRunner
    except ImportError as e:
        raise UserError(f"running a TensorRT engine needs tomectl's TensorRT support ({e})") from None
    trt = TrtRunner(path)
    shape = list(trt.input_shape)
    return FixedBatchRunner(trt, int(shape[0]), numpy_io=True), [int(d) for d in shape[1:]]


def predict(model_or_runner: Union[torch.nn.Module, Runner], images_or_loader: Union[torch.Tensor, Iterable],
            *, batch_size: int = 64, progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Logits [N, classes], batched: a torch model (under inference_mode) or any runner.

    `images_or_loader`: a tensor [N, 3, H, W], or an iterable of `data.Batch` (from `data.loader`)
    or of plain tensors; with a loader, undecodable images are simply absent from the result.
    `progress(k)` is called with the number of images done after each batch.
    """
    from . import data as data_mod

    run = torch_runner(model_or_runner) if isinstance(model_or_runner, torch.nn.Module) else model_or_runner
    if isinstance(images_or_loader, torch.Tensor):
        batches: Iterable = images_or_loader.split(batch_size)
    else:
        batches = images_or_loader
    out = []
    for b in batches:
        x = b.images if isinstance(b, data_mod.Batch) else b
        if len(x):
            out.append(run(x))
        if progress is not None:
            progress(len(x) + (len(b.skipped) if isinstance(b, data_mod.Batch) else 0))
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)
