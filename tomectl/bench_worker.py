"""One timed configuration of `tomectl bench`, run in its own process.

    python -m tomectl.bench_worker SPEC.json OUT.json

SPEC: {backend, batch, input_size, threads, warmup (calls at least), warmup_s (seconds at least;
0 when absent), warmup_max_s, iters | duration, and per backend: recipe, weights, random_weights
(torch*), onnx (ort*), engine (trt)}. OUT: {samples_ms, peak_mem_mb, mem_kind, threads, warmup
{calls, s, settled}} or {error}. A fresh process per configuration keeps onnxruntime's spinning
thread pool, torch's OpenMP pool, allocator state and compiled graphs of one configuration from
disturbing the next. The parent side is `tomectl.bench.run_isolated`.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


# Warm-up defaults shared by `tomectl bench`, `bench.measure_latency` (calibrate) and the latency
# model's probes. Per-call traces of fresh DeiT-T batch-1 processes (torch and onnxruntime, 1 thread,
# the shared 2-core machine): the first 5 calls ran 1.2-2.2x the process's later median, calls 5-25
# (the old fixed warm-up of 5, then 20 timed) were still up to 22 % high; after this warm-up (10-40
# calls, 0.5-1 s) within 6 %.
WARMUP_MIN_CALLS = 5
WARMUP_MIN_S = 0.5
WARMUP_MAX_S = 5.0
SETTLE_WINDOW = 5  # calls per window of the running median
SETTLE_TOL = 0.05  # the last window's median within 5 % of the window before it


@dataclass(frozen=True)
class WarmUp:
    """What a warm-up did: calls made, seconds spent, whether the running median settled."""

    calls: int
    seconds: float
    settled: bool

    def to_dict(self) -> dict:
        return {"calls": self.calls, "s": round(self.seconds, 3), "settled": self.settled}


def settled(times_ms: Sequence[float], window: int = SETTLE_WINDOW, tol: float = SETTLE_TOL) -> bool:
    """Whether the median of the last `window` call times is within `tol` (relative) of the median of
    the `window` before them."""
    if window < 1 or len(times_ms) < 2 * window:
        return False
    last = sorted(times_ms[-window:])[window // 2]
    prev = sorted(times_ms[-2 * window:-window])[window // 2]
    return abs(last - prev) <= tol * prev


def warm_up(fn: Callable[[], None], sync: Callable[[], None] = lambda: None, min_s: float = WARMUP_MIN_S,
            min_calls: int = WARMUP_MIN_CALLS, max_s: float = WARMUP_MAX_S, *, window: int = SETTLE_WINDOW,
            tol: float = SETTLE_TOL, clock: Callable[[], float] = time.perf_counter) -> WarmUp:
    """Untimed calls of `fn` until at least `min_calls` calls and `min_s` seconds have run and the
    running median has settled (`settled`), or `max_s` seconds have passed (never fewer than
    `min_calls` calls). `min_s=0` is a plain count of `min_calls` calls, with no settling asked."""
    times: list[float] = []
    start = clock()
    max_s = max(max_s, min_s)
    while True:
        elapsed = clock() - start
        if len(times) >= min_calls:
            if min_s <= 0:
                return WarmUp(len(times), elapsed, True)
            ok = settled(times, window, tol)
            if (elapsed >= min_s and ok) or elapsed >= max_s:
                return WarmUp(len(times), elapsed, ok)
        t0 = clock()
        fn()
        sync()
        times.append((clock() - t0) * 1000.0)


def time_loop(fn: Callable[[], None], warmup: int, iters: Optional[int], duration: Optional[float],
              sync: Callable[[], None], *, warmup_s: float = 0.0, warmup_max_s: float = WARMUP_MAX_S,
              clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """A warm-up (`warm_up`: at least `warmup` calls and `warmup_s` seconds, until the median settles;
    `warmup_s=0`: exactly `warmup` calls), then one latency sample (ms) per call: `iters` calls, or
    for `duration` seconds (and at least 3 calls)."""
    warm_up(fn, sync, warmup_s, warmup, warmup_max_s, clock=clock)
    return timed_calls(fn, iters, duration, sync, clock=clock)


def timed_calls(fn: Callable[[], None], iters: Optional[int], duration: Optional[float],
                sync: Callable[[], None], *, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """One latency sample (ms) per call, no warm-up: `iters` calls, or for `duration` seconds."""
    sync()
    samples: list[float] = []
    start = clock()
    while True:
        t0 = clock()
        fn()
        sync()
        samples.append((clock() - t0) * 1000.0)
        if duration is not None:
            if clock() - start >= duration and len(samples) >= 3:
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
    """Time one configuration in this process: {samples_ms, peak_mem_mb, mem_kind, threads, warmup}."""
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
    warm = warm_up(fn, sync, spec.get("warmup_s", 0.0), spec["warmup"],
                   spec.get("warmup_max_s", WARMUP_MAX_S))
    samples = timed_calls(fn, spec.get("iters"), spec.get("duration"), sync)
    if backend == "trt":
        # the execution context's device memory (activations, scratch: TensorRT allocates it, torch's
        # allocator never sees it) plus the torch-held input and output buffers
        peak = (fn.device_memory_bytes + torch.cuda.max_memory_allocated()) / 2**20
        kind = "cuda-trt"
    elif cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda"
    else:
        peak, kind = peak_rss_mb(), "rss"
    return {"samples_ms": samples, "peak_mem_mb": peak, "mem_kind": kind, "threads": spec["threads"],
            "warmup": warm.to_dict()}


def run_side_by_side(spec: dict) -> dict:
    """Time several configurations in this one process, round-robin (`spec["configs"]`, each a
    spec as for `run_worker`; `spec["rounds"]`, each in a shuffled order seeded by `spec["seed"]`):
    {samples_ms: [per config], rounds: [[per round p50 per config, in the configs' order]]}. Drift
    of the machine then hits every configuration alike, so their ratios hold even where absolute
    times move."""
    import statistics

    import torch

    torch.set_num_threads(spec["threads"])
    fns = []
    for c in spec["configs"]:
        c = dict(spec, **c)
        if c["backend"].startswith("torch"):
            fn, sync, _ = _torch_fn(c)
        elif c["backend"].startswith("ort"):
            fn, sync, _ = _ort_fn(c)
        else:
            raise UserError(f"side-by-side timing runs torch and onnxruntime backends, not {c['backend']}")
        fn()
        sync()
        fns.append((fn, sync))
    samples: list[list[float]] = [[] for _ in fns]
    per_round = []
    # each round in its own order (seeded): no configuration always follows the same other one
    order = list(range(len(fns)))
    shuffle = random.Random(spec.get("seed", 0)).shuffle
    for _ in range(spec.get("rounds", 5)):
        row = [0.0] * len(fns)
        shuffle(order)
        for k in order:
            fn, sync = fns[k]
            got = time_loop(fn, spec["warmup"], spec.get("iters"), spec.get("duration"), sync,
                            warmup_s=spec.get("warmup_s", 0.0),
                            warmup_max_s=spec.get("warmup_max_s", WARMUP_MAX_S))
            samples[k] += got
            row[k] = statistics.median(got)
        per_round.append(row)
    return {"samples_ms": samples, "rounds": per_round, "threads": spec["threads"]}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tomectl.bench_worker SPEC.json OUT.json (internal; use `tomectl bench`)",
              file=sys.stderr)
        return 2
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_side_by_side(spec) if "configs" in spec else run_worker(spec)
    except UserError as e:
        result = {"error": str(e)}
    except Exception as e:  # reported in the row; the bench goes on with the other configurations
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result = {"error": f"{type(e).__name__}: {first}"[:300]}
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
