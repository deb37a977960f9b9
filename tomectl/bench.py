"""`tomectl bench`: latency, throughput and memory of reduced models beside the unreduced one.

Every (backend, batch, schedule) configuration is timed in its own fresh process (``python -m
tomectl.bench --worker SPEC OUT``): onnxruntime's spinning thread pool, torch's OpenMP pool, the
allocator's state and a compiled graph would otherwise disturb the timings of whatever runs next
in the same process. The parent builds the models, counts GMACs analytically, exports the ONNX
files (export is not timed) and then runs the workers one after another; with ``rounds > 1`` all
configurations are run round-robin that many times and their samples pooled, so slow drift of a
shared machine hits the reduced and the unreduced rows alike.

Backends: ``torch`` (eager CPU), ``torch-compile`` (``torch.compile``), ``torch-cuda``, ``ort``
(onnxruntime CPU), ``ort-cuda`` / ``ort-trt`` (onnxruntime's CUDA / TensorRT providers) and ``trt``
(a TensorRT engine built from the ONNX export).

report.json (`BenchReport.to_dict`), schema_version 1:

    schema_version  1
    kind            "bench"
    model           timm model name
    config          {warmup, iters, duration_s, threads, rounds, random_weights, weights, backends, batches}
    rows            one per (backend, batch, schedule), baseline (r=0) first within each group:
        backend, batch, label ("r=13" or the artifact's name), schedule, method, removed_per_layer,
        params, gmacs (analytic, per image), gmacs_base, flops_ratio (gmacs_base / gmacs),
        latency_ms {mean, p10, p50, p90, p95, p99, min, std, n} per batch (n = timed iterations),
        img_per_s (batch / mean latency), peak_mem_mb, mem_kind ("rss": the worker's peak resident
        set during timing, model included; "cuda": torch.cuda.max_memory_allocated), threads,
        speedup (baseline p50 / this p50, same backend and batch, same run), efficiency
        (speedup / flops_ratio: 1.0 means every FLOP saved became time saved), error (null, or why
        this configuration could not run)
    evals           eval results given with --eval (target, schedule, gmacs, top1, agreement, ...)
    provenance      {versions, machine, date}
    notes           free-text caveats (e.g. "timings on a shared CPU")
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import UserError
from .recipe import Recipe

SCHEMA_VERSION = 1
BACKENDS = ("torch", "torch-compile", "torch-cuda", "ort", "ort-cuda", "ort-trt", "trt")
ORT_PROVIDERS = {
    "ort": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
WORKER_TIMEOUT_S = 1800


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one forward pass of a whole batch, in milliseconds."""

    mean: float
    p10: float
    p50: float
    p90: float
    p95: float
    p99: float
    min: float
    std: float
    n: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / p50: the relative width of the middle 80 % (noise of the measurement)."""
        return (self.p90 - self.p10) / self.p50 if self.p50 else float("inf")

    @staticmethod
    def of(samples_ms: Sequence[float]) -> "LatencyStats":
        if not samples_ms:
            raise ValueError("no latency samples")
        s = sorted(samples_ms)
        n = len(s)
        mean = sum(s) / n
        std = (sum((v - mean) ** 2 for v in s) / max(1, n - 1)) ** 0.5

        def q(p: float) -> float:  # linear interpolation between order statistics
            k = (n - 1) * p
            lo = int(k)
            hi = min(lo + 1, n - 1)
            return s[lo] + (s[hi] - s[lo]) * (k - lo)

        return LatencyStats(mean=mean, p10=q(0.10), p50=q(0.50), p90=q(0.90), p95=q(0.95), p99=q(0.99),
                            min=s[0], std=std, n=n)

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class BenchRow:
    backend: str
    batch: int
    label: str
    schedule: str
    method: str
    removed_per_layer: list[int]
    params: int
    gmacs: float
    gmacs_base: float
    threads: int
    latency: Optional[LatencyStats] = None
    peak_mem_mb: Optional[float] = None
    mem_kind: Optional[str] = None
    speedup: Optional[float] = None
    efficiency: Optional[float] = None
    error: Optional[str] = None
    baseline: bool = False

    @property
    def flops_ratio(self) -> float:
        return self.gmacs_base / self.gmacs

    @property
    def img_per_s(self) -> Optional[float]:
        return self.batch * 1000.0 / self.latency.mean if self.latency else None

    def to_dict(self) -> dict:
        return {
            "backend": self.backend, "batch": self.batch, "label": self.label, "schedule": self.schedule,
            "method": self.method, "baseline": self.baseline, "removed_per_layer": self.removed_per_layer,
            "params": self.params, "gmacs": round(self.gmacs, 4), "gmacs_base": round(self.gmacs_base, 4),
            "flops_ratio": round(self.flops_ratio, 4),
            "latency_ms": self.latency.to_dict() if self.latency else None,
            "img_per_s": round(self.img_per_s, 2) if self.img_per_s else None,
            "peak_mem_mb": round(self.peak_mem_mb, 1) if self.peak_mem_mb is not None else None,
            "mem_kind": self.mem_kind, "threads": self.threads,
            "speedup": round(self.speedup, 4) if self.speedup is not None else None,
            "efficiency": round(self.efficiency, 4) if self.efficiency is not None else None,
            "error": self.error,
        }


@dataclass
class BenchReport:
    model: str
    config: dict
    rows: list[BenchRow]
    provenance: dict
    evals: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "bench",
            "model": self.model,
            "config": self.config,
            "rows": [r.to_dict() for r in self.rows],
            "evals": self.evals,
            "provenance": self.provenance,
            "notes": self.notes,
        }

    def row(self, backend: str, batch: int, label: str) -> BenchRow:
        for r in self.rows:
            if (r.backend, r.batch, r.label) == (backend, batch, label):
                return r
        raise KeyError((backend, batch, label))


# --------------------------------------------------------------------------------------------
# What to run


@dataclass(frozen=True)
class Entry:
    """One model configuration to time: a label and its recipe."""

    label: str
    recipe: Recipe


def entries_for(target: str | Sequence[str], schedules: Optional[Sequence[int]] = None,
                method: str = "tome", prop_attn: bool = True, formulation: str = "scatter") -> tuple[str, list[Entry]]:
    """(model name, entries) for a model name + constant-r schedules, or artifact directories.

    The unreduced baseline (r=0) is always the first entry; with artifacts, --r values add more
    constant schedules of the same model.
    """
    from .artifact import is_artifact, read
    from .schedule import Schedule

    targets = [target] if isinstance(target, (str, Path)) else list(target)
    if not targets:
        raise UserError("name a model (e.g. deit_small_patch16_224) or one or more artifact directories")
    artifacts = [t for t in targets if is_artifact(t)]
    entries: list[Entry] = []
    if artifacts:
        others = [t for t in targets if not is_artifact(t)]
        if others:
            raise UserError(f"{others[0]} is not an artifact directory (no recipe.yaml); give artifacts or one model")
        for a in artifacts:
            rec = read(a)[0]
            entries.append(Entry(Path(a).name or str(a), rec))
        names = {e.recipe.model for e in entries}
        if len(names) > 1:
            raise UserError(f"artifacts of different models ({', '.join(sorted(names))}); bench one model at a time")
        model = entries[0].recipe.model
        base_weights = entries[0].recipe.weights
    else:
        if len(targets) > 1:
            raise UserError("give one model name (or several artifact directories)")
        model = str(targets[0])
        if Path(model).is_dir():
            raise UserError(f"{model} is a directory but not an artifact (no recipe.yaml)")
        base_weights = None
    rs = list(schedules or [])
    for r in rs:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise UserError(f"--r values must be whole numbers >= 0, got {r!r}")
    rs = [r for r in dict.fromkeys(rs) if r != 0]
    extra = [Entry(f"r={r}", Recipe(model=model, schedule=Schedule.make(r=r), method=method, prop_attn=prop_attn,
                                     formulation=formulation, weights=base_weights)) for r in rs]
    base = Entry("r=0", Recipe(model=model, schedule=Schedule.make(r=0), method=method, weights=base_weights))
    return model, [base, *entries, *extra]


def check_backends(backends: Sequence[str]) -> list[str]:
    out = []
    for b in backends:
        if b not in BACKENDS:
            raise UserError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
        if b not in out:
            out.append(b)
    if not out:
        raise UserError("give at least one backend (e.g. --backend torch,ort)")
    need_cuda = [b for b in out if b in ("torch-cuda", "trt", "ort-cuda", "ort-trt")]
    if need_cuda:
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"backend {need_cuda[0]} needs a CUDA GPU and none is visible; use torch or ort")
    for b in out:
        if b in ("ort-cuda", "ort-trt"):
            import onnxruntime as ort

            if ORT_PROVIDERS[b][0] not in ort.get_available_providers():
                raise UserError(f"backend {b} needs onnxruntime's {ORT_PROVIDERS[b][0]}, which this install lacks "
                                f"(available: {', '.join(ort.get_available_providers())})")
        if b == "trt":
            try:
                import tensorrt  # noqa: F401
            except ImportError:
                raise UserError("backend trt needs TensorRT (pip install 'tomectl[trt]') and a GPU") from None
    return out


# --------------------------------------------------------------------------------------------
# The worker: runs in its own process, times one configuration, writes JSON.


def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so the peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_loop(fn: Callable[[], None], warmup: int, iters: Optional[int], duration: Optional[float],
               sync: Callable[[], None]) -> list[float]:
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
                break
        elif len(samples) >= (iters or 1):
            break
    return samples


def _torch_fn(spec: dict):
    import torch

    from .build import build
    from .recipe import from_dict

    recipe = from_dict(spec["recipe"], where="bench spec")
    built = build(recipe, weights=spec.get("weights"), random_weights=spec.get("random_weights", False))
    model = built.model
    cuda = spec["backend"] == "torch-cuda"
    device = torch.device("cuda" if cuda else "cpu")
    model.to(device)
    if spec["backend"] == "torch-compile":
        model = torch.compile(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(spec["batch"], *spec["input_size"], generator=gen).to(device)

    def fn() -> None:
        with torch.inference_mode():
            model(x)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    return fn, sync, cuda


def _ort_fn(spec: dict):
    import numpy as np

    from .export.onnx import ort_session

    sess = ort_session(spec["onnx"], threads=spec["threads"])
    want = ORT_PROVIDERS[spec["backend"]]
    if sess.get_providers()[0] != want[0]:  # re-create with the requested providers
        import onnxruntime as ort

        sess = ort.InferenceSession(spec["onnx"], sess_options=_ort_options(sess, spec["threads"]), providers=want)
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((spec["batch"], *spec["input_size"])).astype(np.float32)
    feed = {inp.name: x}

    def fn() -> None:
        sess.run(None, feed)

    return fn, (lambda: None), False


def _ort_options(sess, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return opts


def _trt_fn(spec: dict):
    import torch

    from .export.tensorrt import TrtRunner

    runner = TrtRunner(spec["engine"])
    x = torch.randn(spec["batch"], *spec["input_size"]).cuda()

    def fn() -> None:
        runner(x)

    return fn, torch.cuda.synchronize, True


def run_worker(spec: dict) -> dict:
    """Time one configuration in this process: {samples_ms, peak_mem_mb, mem_kind, threads}."""
    threads = spec["threads"]
    import torch

    torch.set_num_threads(threads)
    backend = spec["backend"]
    if backend.startswith("torch"):
        fn, sync, cuda = _torch_fn(spec)
    elif backend.startswith("ort"):
        fn, sync, cuda = _ort_fn(spec)
    elif backend == "trt":
        fn, sync, cuda = _trt_fn(spec)
    else:  # pragma: no cover - checked by check_backends
        raise UserError(f"unknown backend {backend}")
    fn()  # first call (allocations, compilation) outside the peak-memory window
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _peak_rss_reset()
    samples = _time_loop(fn, spec["warmup"], spec.get("iters"), spec.get("duration"), sync)
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda"
    else:
        peak, kind = _peak_rss_mb(), "rss"
    return {"samples_ms": samples, "peak_mem_mb": peak, "mem_kind": kind, "threads": threads}


def _worker_main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_worker(spec)
    except UserError as e:
        result = {"error": str(e)}
    except Exception as e:  # reported in the row; the bench goes on with the other configurations
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    Path(out_path).write_text(json.dumps(result))
    return 0


def _worker_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_isolated(spec: dict, workdir: Path, timeout: float = WORKER_TIMEOUT_S) -> dict:
    """Run `run_worker(spec)` in a fresh Python process; returns its result dict."""
    fd, spec_path = tempfile.mkstemp(suffix=".json", prefix="spec-", dir=workdir)
    os.close(fd)
    out_path = spec_path.replace("spec-", "out-")
    Path(spec_path).write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "tomectl.bench", "--worker", spec_path, out_path]
    try:
        proc = subprocess.run(cmd, env=_worker_env(spec["threads"]), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if not Path(out_path).is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        return {"error": f"worker exited with code {proc.returncode}: {tail[0][:300]}"}
    return json.loads(Path(out_path).read_text())


# --------------------------------------------------------------------------------------------
# The parent


def _default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _check_counts(warmup: int, iters: Optional[int], duration: Optional[float], batches: Sequence[int],
                  threads: int, rounds: int) -> None:
    if warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {warmup}")
    if duration is None and (iters is None or iters < 1):
        raise UserError(f"--iters must be >= 1, got {iters}")
    if duration is not None and duration <= 0:
        raise UserError(f"--duration must be positive, got {duration}")
    if not batches or any(b < 1 for b in batches):
        raise UserError(f"--batch values must be >= 1, got {list(batches)}")
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if rounds < 1:
        raise UserError(f"rounds must be >= 1, got {rounds}")


# ToMe's matching is a discrete choice: with random weights near-ties are common, and float rounding
# that differs between PyTorch and onnxruntime flips one now and then (measured: 2 of 16 images off
# by 2e-3 and 5e-3, the other 14 within 1e-6). The graph's cost does not depend on which tokens
# merge, so a random-weights export is accepted at this tolerance (its parity goes in the notes).
RANDOM_WEIGHTS_ATOL = 5e-2


def _export(recipe: Recipe, batch: int, *, onnx_out: Path, engine_out: Optional[Path] = None, weights=None,
            random_weights: bool = False, simplify: bool = True) -> str:
    """Export `recipe` at `batch` to `onnx_out` (and a TensorRT engine) with tomectl's exporter,
    checked against PyTorch; returns a one-line parity note. UserError when the export fails.

    onnxruntime gets the recipe's merge formulation; an engine is built from a onehot graph
    (TensorRT runs ScatterElements with a reduction only through its plugins)."""
    import dataclasses

    from .adapters import adapter_for
    from .build import build
    from .export.onnx import ATOL, export_onnx
    from .models import preprocessing

    built = build(recipe, weights=weights, random_weights=random_weights)
    model = built.model
    formulation = recipe.formulation if engine_out is None else "onehot"
    if model.tomectl_plan.formulation != formulation:
        adapter_for(model).install(model, dataclasses.replace(model.tomectl_plan, formulation=formulation))
    res = export_onnx(model, onnx_out, batch=batch, input_size=tuple(preprocessing(model)["input_size"]),
                      simplify=simplify, atol=RANDOM_WEIGHTS_ATOL if random_weights else ATOL,
                      meta={"model": recipe.model, "recipe": recipe.to_dict(),
                            "weights": built.loaded.weights.to_dict()})
    note = f"max |diff| {res.max_abs_diff:.1e} vs PyTorch on {res.n_check} inputs"
    if engine_out is not None:
        from .export.tensorrt import build_engine

        eng = build_engine(onnx_out, engine_out, batch=batch)
        note += f"; engine vs onnxruntime top-1 agreement {eng.top1_agreement:.1%}"
    return note


def run_bench(
    target: str | Sequence[str],
    schedules: Optional[Sequence[int]] = (0, 8, 13, 16),
    backends: Sequence[str] = ("torch",),
    batches: Sequence[int] = (1,),
    *,
    warmup: int = 5,
    iters: Optional[int] = 20,
    duration: Optional[float] = None,
    threads: Optional[int] = None,
    compile: bool = False,
    random_weights: bool = False,
    weights: Optional[str | Path] = None,
    method: str = "tome",
    prop_attn: bool = True,
    formulation: str = "scatter",
    rounds: int = 1,
    simplify: bool = True,
    evals: Sequence[dict] = (),
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> BenchReport:
    """Time every (backend, batch, schedule) in its own process; see the module docstring.

    target: a timm model name (with `schedules`, constant r values; r=0 is always added) or one
    or more artifact directories of one model. `progress(description, done, total)` is called
    before each step and once at the end.
    """
    from .build import build
    from .models import preprocessing
    from .provenance import machine, now, versions

    threads = threads or _default_threads()
    _check_counts(warmup, iters, duration, batches, threads, rounds)
    backends = check_backends(list(backends) + (["torch-compile"] if compile and "torch" in backends else []))
    model, entries = entries_for(target, schedules, method, prop_attn, formulation)
    batches = list(dict.fromkeys(int(b) for b in batches))

    # Build each configuration once here: validates schedules and weights, gives params and GMACs.
    built = {}
    for e in entries:
        b = build(e.recipe, weights=weights, random_weights=random_weights)
        built[e.label] = b
    first = built[entries[0].label]
    input_size = preprocessing(first.model)["input_size"]
    weights_desc = first.loaded.weights.to_dict()
    base_gmacs = first.base_macs().gmacs

    n_exports = any(b.startswith("ort") for b in backends) + ("trt" in backends)
    steps = len(entries) * len(batches) * (n_exports + len(backends) * rounds)
    done = 0

    def tick(desc: str) -> None:
        nonlocal done
        if progress is not None:
            progress(desc, done, steps)
        done += 1

    workdir = Path(tempfile.mkdtemp(prefix="tomectl-bench-"))
    try:
        onnx_files: dict[tuple[str, int], Path] = {}
        engines: dict[tuple[str, int], Path] = {}
        export_errors: dict[tuple[str, int], str] = {}
        engine_errors: dict[tuple[str, int], str] = {}
        parity: dict[tuple[str, int, str], str] = {}
        for bs in batches:
            for i, e in enumerate(entries):
                kw = dict(weights=weights, random_weights=random_weights, simplify=simplify)
                if any(b.startswith("ort") for b in backends):
                    tick(f"export ONNX {e.label} batch {bs}")
                    path = workdir / f"m{i}_b{bs}.onnx"
                    try:
                        parity[(e.label, bs, "onnx")] = _export(e.recipe, bs, onnx_out=path, **kw)
                        onnx_files[(e.label, bs)] = path
                    except UserError as err:
                        export_errors[(e.label, bs)] = str(err)
                if "trt" in backends:
                    tick(f"build TensorRT engine {e.label} batch {bs}")
                    eng = workdir / f"m{i}_b{bs}.engine"
                    try:
                        parity[(e.label, bs, "trt")] = _export(e.recipe, bs, onnx_out=workdir / f"t{i}_b{bs}.onnx",
                                                               engine_out=eng, **kw)
                        engines[(e.label, bs)] = eng
                    except UserError as err:
                        engine_errors[(e.label, bs)] = str(err)

        samples: dict[tuple[str, int, str], list[float]] = {}
        results: dict[tuple[str, int, str], dict] = {}
        for rnd in range(rounds):
            for backend in backends:
                for bs in batches:
                    for e in entries:
                        key = (backend, bs, e.label)
                        suffix = f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""
                        tick(f"{backend} batch {bs} {e.label}{suffix}")
                        if key in results and "error" in results[key]:
                            continue
                        spec = {
                            "backend": backend, "batch": bs, "input_size": list(input_size), "threads": threads,
                            "warmup": warmup, "iters": iters, "duration": duration,
                            "recipe": e.recipe.to_dict(), "random_weights": random_weights,
                            "weights": str(weights) if weights else None,
                        }
                        if backend.startswith("ort"):
                            if (e.label, bs) not in onnx_files:
                                results[key] = {"error": export_errors.get((e.label, bs), "ONNX export failed")}
                                continue
                            spec["onnx"] = str(onnx_files[(e.label, bs)])
                        if backend == "trt":
                            if (e.label, bs) not in engines:
                                results[key] = {"error": engine_errors.get((e.label, bs), "engine build failed")}
                                continue
                            spec["engine"] = str(engines[(e.label, bs)])
                        res = run_isolated(spec, workdir)
                        if "error" in res:
                            results[key] = res
                            continue
                        samples.setdefault(key, []).extend(res["samples_ms"])
                        prev = results.get(key, {})
                        res["peak_mem_mb"] = max(res["peak_mem_mb"], prev.get("peak_mem_mb", 0.0))
                        results[key] = res
        if progress is not None:
            progress("done", steps, steps)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows: list[BenchRow] = []
    for backend in backends:
        for bs in batches:
            base_row = None
            for e in entries:
                b = built[e.label]
                key = (backend, bs, e.label)
                res = results.get(key, {"error": "not run"})
                row = BenchRow(
                    backend=backend, batch=bs, label=e.label, schedule=e.recipe.schedule.describe(),
                    method=e.recipe.method, removed_per_layer=list(b.removed),
                    params=sum(p.numel() for p in b.model.parameters()), gmacs=b.macs().gmacs,
                    gmacs_base=base_gmacs, threads=threads, baseline=e is entries[0],
                )
                if "error" in res:
                    row.error = res["error"]
                else:
                    row.latency = LatencyStats.of(samples[key])
                    row.peak_mem_mb, row.mem_kind = res["peak_mem_mb"], res["mem_kind"]
                if row.baseline:
                    base_row = row
                if base_row is not None and base_row.latency and row.latency:
                    row.speedup = base_row.latency.p50 / row.latency.p50
                    row.efficiency = row.speedup / row.flops_ratio
                rows.append(row)

    config = {
        "warmup": warmup, "iters": iters, "duration_s": duration, "threads": threads, "rounds": rounds,
        "random_weights": random_weights, "weights": weights_desc, "backends": backends, "batches": batches,
        "input_size": list(input_size), "simplify_onnx": simplify,
    }
    notes = ["each configuration timed in its own process; speedup uses median (p50) latencies"]
    for (label, bs, kind), text in parity.items():
        notes.append(f"{'ONNX' if kind == 'onnx' else 'TensorRT'} export {label} batch {bs}: {text}")
    if (os.cpu_count() or 1) <= 4:
        notes.append(f"small CPU ({os.cpu_count()} cores): compare rows of the same run, not across runs")
    return BenchReport(model=model, config=config, rows=rows,
                       provenance={"versions": versions(), "machine": machine() | {"bench_threads": threads},
                                   "date": now()},
                       evals=[eval_summary(d) for d in evals], notes=notes)


def eval_summary(doc: dict) -> dict:
    """The part of an eval result JSON (tomectl eval --out) a bench report plots."""
    if not isinstance(doc, dict) or doc.get("kind") != "eval":
        raise UserError("--eval expects a JSON written by `tomectl eval --out FILE`")
    comp = doc.get("comparison") or {}
    return {
        "target": doc.get("target"), "model": doc.get("model"), "schedule": doc.get("schedule"),
        "gmacs": doc.get("gmacs"), "gmacs_base": doc.get("gmacs_base"), "top1": doc.get("top1"),
        "top5": doc.get("top5"), "agreement": comp.get("agreement"), "ref_top1": comp.get("ref_top1"),
        "n": doc.get("data", {}).get("evaluated"),
    }


def load_eval(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"eval result {p} does not exist")
    try:
        return eval_summary(json.loads(p.read_text()))
    except ValueError:
        raise UserError(f"eval result {p} is not valid JSON") from None


def measure_latency(
    recipe: Recipe,
    backend: str = "torch",
    batch: int = 1,
    *,
    warmup: int = 3,
    iters: Optional[int] = 10,
    duration: Optional[float] = None,
    threads: Optional[int] = None,
    weights: Optional[str | Path] = None,
    random_weights: bool = True,
    isolate: bool = True,
    onnx: Optional[str | Path] = None,
) -> LatencyStats:
    """Latency of one configuration (for `tomectl calibrate`'s latency budgets).

    Random weights by default: the time does not depend on the values. `isolate=False` times in
    this process (faster to call many times, but disturbed by whatever else ran here). The ort
    backends export the recipe to ONNX first unless `onnx` names an export of it at this batch.
    """
    from .build import build
    from .models import preprocessing

    threads = threads or _default_threads()
    _check_counts(warmup, iters, duration, [batch], threads, 1)
    check_backends([backend])
    built = build(recipe, weights=weights, random_weights=random_weights)
    input_size = preprocessing(built.model)["input_size"]
    spec = {"backend": backend, "batch": batch, "input_size": list(input_size), "threads": threads,
            "warmup": warmup, "iters": iters, "duration": duration, "recipe": recipe.to_dict(),
            "random_weights": random_weights, "weights": str(weights) if weights else None}
    workdir = Path(tempfile.mkdtemp(prefix="tomectl-lat-"))
    try:
        kw = dict(weights=weights, random_weights=random_weights, simplify=True)
        if backend.startswith("ort"):
            if onnx is None:
                onnx = workdir / "model.onnx"
                _export(recipe, batch, onnx_out=Path(onnx), **kw)
            spec["onnx"] = str(onnx)
        elif backend == "trt":
            spec["engine"] = str(workdir / "model.engine")
            _export(recipe, batch, onnx_out=workdir / "model.onnx", engine_out=Path(spec["engine"]), **kw)
        res = run_isolated(spec, workdir) if isolate else run_worker(spec)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if "error" in res:
        raise UserError(f"could not time {recipe.model} {recipe.schedule.describe()} on {backend}: {res['error']}")
    return LatencyStats.of(res["samples_ms"])


def with_evals(report: BenchReport, evals: Sequence[dict]) -> BenchReport:
    return replace(report, evals=[*report.evals, *evals])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m tomectl.bench --worker SPEC.json OUT.json (internal; use `tomectl bench`)")
