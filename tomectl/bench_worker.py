"""One timed configuration of `tomectl bench`, run in its own process.

    python -m tomectl.bench_worker SPEC.json OUT.json

SPEC: {backend, batch, input_size, threads, warmup, iters | duration, and per backend: recipe,
weights, random_weights (torch*), onnx (ort*), engine (trt)}. OUT: {samples_ms, peak_mem_mb,
mem_kind, threads} or {error}. A fresh process per configuration keeps onnxruntime's spinning
thread pool, torch's OpenMP pool, allocator state and compiled graphs of one configuration from
disturbing the next. The parent side is `tomectl.bench.run_isolated`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from .errors import UserError
from .runtime import ORT_PROVIDERS, ort_session  # noqa: F401  (ORT_PROVIDERS: older import path)


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM, Linux) so the peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_loop(fn: Callable[[], None], warmup: int, iters: Optional[int], duration: Optional[float],
              sync: Callable[[], None]) -> list[float]:
    """Warm-up calls, then one latency sample (ms) per call: `iters` calls, or for `duration` seconds."""
    for _ in range(warmup):
        fn()
    sync()
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1000.0)
        if duration is not None:
            if time.perf_counter() - start >= duration and len(samples) >= 3:
                return samples
        elif len(samples) >= (iters or 1):
            return samples


def _torch_fn(spec: dict):
    import torch

    from .build import build
    from .recipe import from_dict

    recipe = from_dict(spec["recipe"], where="bench spec")
    model = build(recipe, weights=spec.get("weights"), random_weights=spec.get("random_weights", False)).model
    cuda = spec["backend"] == "torch-cuda"
    device = torch.device("cuda" if cuda else "cpu")
    model.to(device)
    if spec["backend"] == "torch-compile":
        model = torch.compile(model)
    x = torch.randn(spec["batch"], *spec["input_size"], generator=torch.Generator().manual_seed(0)).to(device)

    def fn() -> None:
        with torch.inference_mode():
            model(x)

    return fn, (torch.cuda.synchronize if cuda else (lambda: None)), cuda


def _ort_fn(spec: dict):
    import numpy as np

    sess = ort_session(spec["onnx"], threads=spec["threads"], backend=spec["backend"])
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((spec["batch"], *spec["input_size"])).astype(np.float32)

    def fn() -> None:
        sess.run(None, {name: x})

    return fn, (lambda: None), False


def _trt_fn(spec: dict):
    import torch

    from .export.tensorrt import TrtRunner

    runner = TrtRunner(spec["engine"])
    x = torch.randn(spec["batch"], *spec["input_size"]).cuda()

    def fn() -> None:
        runner(x)

    fn.device_memory_bytes = runner.device_memory_bytes  # TensorRT's own allocation, unseen by torch
    return fn, torch.cuda.synchronize, True


def run_worker(spec: dict) -> dict:
    """Time one configuration in this process: {samples_ms, peak_mem_mb, mem_kind, threads}."""
    import torch

    torch.set_num_threads(spec["threads"])
    backend = spec["backend"]
    if backend.startswith("torch"):
        fn, sync, cuda = _torch_fn(spec)
    elif backend.startswith("ort"):
        fn, sync, cuda = _ort_fn(spec)
    elif backend == "trt":
        fn, sync, cuda = _trt_fn(spec)
    else:
        raise UserError(f"unknown backend {backend}")
    fn()  # first call (allocations, compilation) outside the peak-memory window
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        peak_rss_reset()
    samples = time_loop(fn, spec["warmup"], spec.get("iters"), spec.get("duration"), sync)
    if backend == "trt":
        # the execution context's device memory (activations, scratch: TensorRT allocates it, torch's
        # allocator never sees it) plus the torch-held input and output buffers
        peak = (fn.device_memory_bytes + torch.cuda.max_memory_allocated()) / 2**20
        kind = "cuda-trt"
    elif cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda"
    else:
        peak, kind = peak_rss_mb(), "rss"
    return {"samples_ms": samples, "peak_mem_mb": peak, "mem_kind": kind, "threads": spec["threads"]}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tomectl.bench_worker SPEC.json OUT.json (internal; use `tomectl bench`)",
              file=sys.stderr)
        return 2
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_worker(spec)
    except UserError as e:
        result = {"error": str(e)}
    except Exception as e:  # reported in the row; the bench goes on with the other configurations
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result = {"error": f"{type(e).__name__}: {first}"[:300]}
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
