"""`tomectl bench`: latency, throughput and memory of reduced models beside the unreduced one.

Every (backend, batch, schedule) configuration is timed in its own fresh process
(`tomectl.bench_worker`): onnxruntime's spinning thread pool, torch's OpenMP pool, the allocator's
state and a compiled graph would otherwise disturb whatever runs next in the same process. The
parent builds the models, counts GMACs analytically and exports the ONNX graphs (not timed), then
runs the workers one after another. All configurations run round-robin ``rounds`` times (3 by
default) so drift of a shared machine hits every row alike; each row's samples are pooled for its
latency, and kept per round for its speedup's spread: the per-round ratio (baseline p50 of round k
/ row p50 of round k), a 95 % interval, and a flag where the rounds disagree beyond their spread
(`speedup_spread`). Before round 1 the first configuration of each backend runs once untimed
(``prime``), and every process warms up until its latency settles (`bench_worker.warm_up`).

Backends: ``torch`` (eager CPU), ``torch-compile`` (``torch.compile``), ``torch-cuda``, ``ort``
(onnxruntime CPU), ``ort-cuda`` / ``ort-trt`` (onnxruntime's CUDA / TensorRT providers) and ``trt``
(a TensorRT engine built from the ONNX export).

report.json (`BenchReport.to_dict`), schema_version 1:

    schema_version  1
    kind            "bench"
    model           timm model name
    config          {warmup (calls at least), warmup_s (seconds at least, until the running median
                    settles; 0: exactly `warmup` calls), warmup_max_s (the bound), prime (bool), iters,
                    duration_s, threads, rounds, random_weights, weights (source, path, sha256),
                    backends, batches, input_size, simplify_onnx}
    rows            one per (backend, batch, schedule), the baseline (r=0) first in each group:
        backend, batch, label ("r=13" or the artifact's name), schedule, method, baseline (bool),
        removed_per_layer, params, gmacs (analytic, per image), gmacs_base, flops_ratio
        (gmacs_base / gmacs), latency_ms {mean, p10, p50, p90, p95, p99, min, std, n} of one
        batch (n timed iterations, all rounds pooled), img_per_s (batch / mean latency),
        peak_mem_mb, mem_kind ("rss": the worker's peak resident set while timing, model and
        runtime included; "cuda": torch.cuda.max_memory_allocated; "cuda-trt": the engine's device
        memory plus the I/O buffers), threads, speedup (the
        baseline's p50 / this p50, same backend and batch, same run), efficiency (speedup /
        flops_ratio: 1.0 means every multiply-accumulate saved became time saved), error (null,
        or why this configuration could not run), precision (fp32, or the fp16/int8 graph or
        engine: `--precision`, label "r=13 int8"; its speedup is against the fp32 baseline),
        formulation (the merge formulation this backend ran: the recipe's in torch, onehot in the
        ONNX/TensorRT graphs, which `gmacs` is priced on), graph_sha256 (the exported graph or
        engine that was timed: byte for byte what `tomectl export` writes for the same artifact,
        backend, batch and precision; null for torch), speedup_rounds (the per-round ratios),
        speedup_round_ci ([lo, hi] per round: 95 % bootstrap over that round's samples),
        speedup_ci ([lo, hi]: 95 % interval of `speedup`, bootstrap over rounds, then over samples
        within them), speedup_stable (false: the rounds disagree beyond their spread, i.e. their
        intervals share no point and the ratios differ by over 5 %, or speedup_ci spans more than a
        factor 2; the tables then print "~1.4x ?", not a result; null with one round and a narrower
        interval; all four null where speedup is), rounds (per round:
        p50_ms, n, warmup {calls, s, settled}, speedup)
    evals           accuracy from `tomectl eval --out` files given with --eval: target, model,
                    schedule, gmacs, gmacs_base, top1, top5, agreement, ref_top1, n
    provenance      {versions, machine (cpu, cpu_count, torch_threads, platform, gpu, bench_threads),
                    date, load_average {start, end}: the 1-minute load average}
    notes           free-text caveats (export parity, a busy machine, noisy rows, unstable speedups,
                    warm-ups stopped at their bound)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .bench_worker import WARMUP_MAX_S, WARMUP_MIN_CALLS, WARMUP_MIN_S, run_worker
from .errors import UserError
from .recipe import Recipe
from .reduced import BACKENDS, GPU_BACKENDS, Target, check_backends
from .runtime import Progress

__all__ = ["BACKENDS", "GPU_BACKENDS", "BenchReport", "BenchRow", "LatencyStats", "SpeedupSpread",
           "check_backends", "export_for_bench", "measure_latency", "run_bench", "speedup_spread"]

SCHEMA_VERSION = 1
WORKER_TIMEOUT_S = 1800
NOISY_SPREAD = 0.25
DEFAULT_ROUNDS = 3
# A speedup's rounds "disagree" when their per-round 95 % intervals (bootstrap over the round's
# samples) share no common point AND the per-round ratios differ by more than this (relative):
# differences this small are not worth a flag even where the intervals are very narrow.
STABLE_TOL = 0.05
# A speedup whose 95 % interval spans more than this factor (hi / lo) is no result either (seen on
# the 2-core shared machine: torch r=13 rounds 1.76x, 21.3x, 1.04x, each round's own interval as wide).
WIDE_CI = 2.0
CI_LEVEL = 0.95
N_BOOT = 1000
SIDE_BY_SIDE_PROCESSES = 3  # fresh processes side-by-side timings are split over (`time_side_by_side`)
# ToMe's matching is a discrete choice: with random weights near-ties are common, and rounding that
# differs between PyTorch and onnxruntime flips one now and then (measured on DeiT-T r=13: 2 of 16
# images off by 2e-3 and 5e-3, the other 14 within 1e-6). The graph's cost does not depend on which
# tokens merge, so a random-weights export is accepted at this tolerance; its parity goes in the notes.
# Near-ties are still told apart at the strict tolerance (`graph_parity`), so the note's max |diff|
# is the graph's rounding unless a near-tie could not be matched.
RANDOM_WEIGHTS_ATOL = 5e-2

BENCH_PRECISION_CHECK = 128  # images an fp16/int8 graph is validated on before it is timed (real weights)


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
    graph_sha256: Optional[str] = None  # the exported graph or engine that was timed (ort, trt)

    @property
    def spread(self) -> float:
        """(p90 - p10) / p50: the relative width of the middle 80 % (noise of the measurement)."""
        return (self.p90 - self.p10) / self.p50 if self.p50 else float("inf")

    @staticmethod
    def of(samples_ms: Sequence[float]) -> LatencyStats:
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
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()
                if k != "graph_sha256"}


@dataclass(frozen=True)
class SpeedupSpread:
    """A speedup (baseline p50 / row p50, all rounds pooled) with its spread over rounds.

    rounds: the per-round ratio (baseline p50 of round k / row p50 of round k); round_ci: each
    round's 95 % interval (bootstrap over that round's samples); ci: the 95 % interval of the pooled
    ratio (bootstrap over rounds, then over samples within them: drift between rounds and noise
    within them); stable: False where the rounds disagree beyond their spread (`STABLE_TOL`) or the
    interval spans more than a factor `WIDE_CI`, None with one round and a narrower interval (drift
    between rounds not measured); why: what made it unstable."""

    ratio: float
    ci: tuple[float, float]
    rounds: tuple[float, ...]
    round_ci: tuple[tuple[float, float], ...]
    stable: Optional[bool]
    why: Optional[str] = None


def speedup_spread(base_rounds: Sequence[Sequence[float]], row_rounds: Sequence[Sequence[float]], *,
                   level: float = CI_LEVEL, n_boot: int = N_BOOT, tol: float = STABLE_TOL,
                   wide: float = WIDE_CI, seed: int = 0) -> SpeedupSpread:
    """The speedup of `row` over `base` from their latency samples (ms), one list per round, paired
    by round (round k of both ran back to back); see `SpeedupSpread`. Deterministic (`seed`)."""
    import numpy as np

    pairs = [(np.asarray(b, dtype=float), np.asarray(r, dtype=float))
             for b, r in zip(base_rounds, row_rounds, strict=True) if len(b) and len(r)]
    if not pairs:
        raise ValueError("no rounds with samples on both sides")
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2

    def resample(x: np.ndarray, n: int) -> np.ndarray:  # n bootstrap resamples of x, one per row
        return x[rng.integers(0, len(x), size=(n, len(x)))]

    rounds = tuple(float(np.median(b) / np.median(r)) for b, r in pairs)
    round_ci = []
    for b, r in pairs:
        reps = np.median(resample(b, n_boot), axis=1) / np.median(resample(r, n_boot), axis=1)
        round_ci.append((float(np.quantile(reps, lo_q)), float(np.quantile(reps, hi_q))))
    # the pooled ratio: rounds drawn with replacement (a round's baseline and row together), then
    # samples within each drawn round
    k = len(pairs)
    boot_b = [resample(b, n_boot) for b, _ in pairs]
    boot_r = [resample(r, n_boot) for _, r in pairs]
    picks = rng.integers(0, k, size=(n_boot, k))
    reps = np.empty(n_boot)
    for i in range(n_boot):
        bb = np.concatenate([boot_b[j][i] for j in picks[i]])
        rr = np.concatenate([boot_r[j][i] for j in picks[i]])
        reps[i] = np.median(bb) / np.median(rr)
    pooled_b, pooled_r = np.concatenate([b for b, _ in pairs]), np.concatenate([r for _, r in pairs])
    ratio = float(np.median(pooled_b) / np.median(pooled_r))
    ci = (min(float(np.quantile(reps, lo_q)), ratio), max(float(np.quantile(reps, hi_q)), ratio))
    stable, why = None, None
    if k >= 2:
        overlap = max(lo for lo, _ in round_ci) <= min(hi for _, hi in round_ci)
        stable = bool(overlap or max(rounds) / min(rounds) - 1 <= tol)
        why = None if stable else "its rounds disagree beyond their spread"
    if ci[1] > wide * ci[0]:
        stable, why = False, why or f"its 95 % interval spans more than a factor {wide:g}"
    return SpeedupSpread(ratio, ci, rounds, tuple(round_ci), stable, why)


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
    precision: str = "fp32"
    formulation: Optional[str] = None  # the merge formulation this backend ran
    graph_sha256: Optional[str] = None  # the exported graph (or engine) that was timed
    spread: Optional[SpeedupSpread] = None  # the speedup's spread over rounds
    rounds: list[dict] = field(default_factory=list)  # per round: p50_ms, n, warmup {calls, s, settled}

    @property
    def flops_ratio(self) -> float:
        return self.gmacs_base / self.gmacs

    @property
    def img_per_s(self) -> Optional[float]:
        return self.batch * 1000.0 / self.latency.mean if self.latency else None

    def to_dict(self) -> dict:
        def r4(v):
            return None if v is None else round(v, 4)

        return {
            "backend": self.backend, "batch": self.batch, "label": self.label, "schedule": self.schedule,
            "method": self.method, "baseline": self.baseline, "removed_per_layer": self.removed_per_layer,
            "params": self.params, "gmacs": r4(self.gmacs), "gmacs_base": r4(self.gmacs_base),
            "flops_ratio": r4(self.flops_ratio),
            "latency_ms": self.latency.to_dict() if self.latency else None,
            "img_per_s": None if self.img_per_s is None else round(self.img_per_s, 2),
            "peak_mem_mb": None if self.peak_mem_mb is None else round(self.peak_mem_mb, 1),
            "mem_kind": self.mem_kind, "threads": self.threads,
            "speedup": r4(self.speedup), "efficiency": r4(self.efficiency), "error": self.error,
            "precision": self.precision, "formulation": self.formulation, "graph_sha256": self.graph_sha256,
            "speedup_ci": None if self.spread is None else [r4(v) for v in self.spread.ci],
            "speedup_rounds": None if self.spread is None else [r4(v) for v in self.spread.rounds],
            "speedup_round_ci": None if self.spread is None else [[r4(v) for v in c]
                                                                  for c in self.spread.round_ci],
            "speedup_stable": None if self.spread is None else self.spread.stable,
            "rounds": [{k: r4(v) if isinstance(v, float) else v for k, v in d.items()} for d in self.rounds],
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
    precision: str = "fp32"  # of the graph (ort) or engine (trt); torch backends run fp32 only
    base: str = ""  # the fp32 entry this one is a precision of ("" for fp32 entries)


def entries_for(target: str | Sequence[str], schedules: Optional[Sequence[int]] = None, method: str = "tome",
                prop_attn: bool = True, formulation: str = "scatter") -> tuple[str, list[Entry]]:
    """(model name, entries) for a model name + constant-r schedules, or artifact directories.

    The unreduced baseline (r=0) is always the first entry; with artifacts, `schedules` add more
    constant schedules of the same model.
    """
    from .artifact import is_artifact, read
    from .schedule import Schedule

    targets = [str(target)] if isinstance(target, (str, Path)) else [str(t) for t in target]
    if not targets:
        raise UserError("name a model (e.g. deit_small_patch16_224) or one or more artifact directories")
    entries: list[Entry] = []
    base_weights = None
    if any(is_artifact(t) for t in targets):
        for t in targets:
            if not is_artifact(t):
                raise UserError(f"{t} is not an artifact directory (no recipe.yaml); "
                                "give artifacts or one model")
            entries.append(Entry(Path(t).name or t, read(t)[0]))
        names = sorted({e.recipe.model for e in entries})
        if len(names) > 1:
            raise UserError(f"artifacts of different models ({', '.join(names)}); bench one model at a time")
        model, base_weights = names[0], entries[0].recipe.weights
    elif len(targets) > 1:
        raise UserError("give one model name (or several artifact directories)")
    else:
        model = targets[0]
        if Path(model).is_dir():
            raise UserError(f"{model} is a directory but not an artifact (no recipe.yaml)")
    for r in schedules or []:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise UserError(f"--r values must be whole numbers >= 0, got {r!r}")
    extra = [
        Entry(f"r={r}", Recipe(model=model, schedule=Schedule.make(r=r), method=method, prop_attn=prop_attn,
                               formulation=formulation, weights=base_weights))
        for r in dict.fromkeys(schedules or []) if r != 0
    ]
    base = Entry("r=0", Recipe(model=model, schedule=Schedule.make(r=0), method=method, weights=base_weights))
    return model, [base, *entries, *extra]


def tome_twins(target: str | Sequence[str], entries: list[Entry]) -> list[Entry]:
    """The constant-r ToMe twin of each calibrated artifact in `target` (from its calibration.json),
    as entries labelled "NAME ToMe twin"; a one-line UserError for an artifact that has none."""
    from .artifact import is_artifact, read_json
    from .schedule import Schedule

    targets = [str(target)] if isinstance(target, (str, Path)) else [str(t) for t in target]
    arts = [t for t in targets if is_artifact(t)]
    if not arts:
        raise UserError("--compare-tome compares calibrated artifacts with their ToMe twin: give the "
                        "directories `tomectl calibrate --latency-ms/--speedup` wrote")
    out = []
    for t in arts:
        path = Path(t) / "calibration.json"
        twin = read_json(path, "calibration report").get("tome_twin") if path.is_file() else None
        if not isinstance(twin, dict) or not isinstance(twin.get("removed"), list):
            raise UserError(f"{t} has no ToMe twin in calibration.json (it was not calibrated on a latency "
                            "budget by this version); --compare-tome needs one")
        base = next(e for e in entries if e.label == (Path(t).name or t))
        rec = dataclasses.replace(base.recipe, method="tome", method_options={}, precision=None,
                                  schedule=Schedule(per_layer=tuple(twin["removed"])))
        out.append(Entry(f"{Path(t).name or t} ToMe twin", rec))
    return out


def _default_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _load_average() -> Optional[float]:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _check_counts(warmup: int, iters: Optional[int], duration: Optional[float], batches: Sequence[int],
                  threads: int, rounds: int, warmup_s: float = 0.0,
                  warmup_max_s: float = WARMUP_MAX_S) -> None:
    if warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {warmup}")
    if not warmup_s >= 0:  # NaN too
        raise UserError(f"--warmup-s must be >= 0, got {warmup_s}")
    if not warmup_max_s >= 0:
        raise UserError(f"--warmup-max-s must be >= 0, got {warmup_max_s}")
    if duration is None and (iters is None or iters < 1):
        raise UserError(f"--iters must be >= 1, got {iters}")
    if duration is not None and duration <= 0:
        raise UserError(f"--duration must be positive, got {duration}")
    if not batches or any(b < 1 for b in batches):
        raise UserError(f"--batch values must be >= 1, got {list(batches)}")
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {rounds}")


# --------------------------------------------------------------------------------------------
# Exporting and running the workers


def export_for_bench(recipe: Recipe, batch: int, *, onnx_out: Path, engine_out: Optional[Path] = None,
                     weights=None, random_weights: bool = False, simplify: bool = True,
                     formulation: Optional[str] = None, precision: str = "fp32",
                     exports: Optional[dict] = None, check_images=None) -> tuple[str, str]:
    """Export `recipe` at `batch` to `onnx_out` (and a TensorRT engine) through the one export
    pipeline (`Reduced.export_onnx`, what `tomectl export` writes for the same target), checked
    against PyTorch; returns (a one-line parity note, the sha256 of the timed file). UserError when
    the export fails.

    exports: a dict kept across calls (one bench run): the fp32 ONNX exports made so far, so that a
    configuration's int8/fp16 graph is converted from its fp32 row's file instead of exported again.
    check_images: the folder a reduced-precision graph is validated on (default: the shared train
    images, where present)."""
    from .build import build
    from .export.precision import PrecisionOptions

    target = Target("trt" if engine_out is not None else "ort", precision, batch, formulation)
    reduced = build(recipe, weights=weights, random_weights=random_weights, target=target)
    # ONNX in `precision` (validated against the unreduced model where the weights are real); an
    # engine is built from the fp32 graph in its own precision
    popts = PrecisionOptions(precision if engine_out is None else "fp32",
                             validate=not reduced.loaded.random_weights, n_check=BENCH_PRECISION_CHECK,
                             calib_images=check_images)
    key = json.dumps([recipe.to_dict(), target.backend, batch, reduced.formulation, simplify, str(weights),
                      random_weights],
                     sort_keys=True, default=str)
    res = reduced.export_onnx(onnx_out, simplify=simplify, precision=popts,
                              atol=RANDOM_WEIGHTS_ATOL if random_weights else None,
                              fp32_export=(exports or {}).get(key))
    if exports is not None and res.precision == "fp32":
        exports[key] = res
    note = f"max |diff| {res.max_abs_diff:.1e} vs PyTorch on {res.n_check} inputs"
    if res.near_ties:
        note += f" ({res.near_ties} on a merge near-tie, matched on a rounding-sized perturbation)"
    if res.precision != "fp32":
        note += f"; {res.notes[-1]}"
    if engine_out is None:
        return note, res.sha256
    from .export.tensorrt import build_engine
    from .models import sha256_of

    eng = build_engine(onnx_out, engine_out, batch=batch, precision=precision)
    note += f"; engine vs onnxruntime top-1 agreement {eng.top1_agreement:.1%}"
    return note, sha256_of(engine_out)


def _worker_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_isolated(spec: dict, workdir: Path, timeout: float = WORKER_TIMEOUT_S) -> dict:
    """`bench_worker.run_worker(spec)` in a fresh Python process; its result dict, or {error}."""
    fd, spec_path = tempfile.mkstemp(suffix=".json", prefix="spec-", dir=workdir)
    os.close(fd)
    out_path = spec_path.replace("spec-", "out-")
    Path(spec_path).write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "tomectl.bench_worker", spec_path, out_path]
    try:
        proc = subprocess.run(cmd, env=_worker_env(spec["threads"]), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if not Path(out_path).is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        return {"error": f"worker exited with code {proc.returncode}: {tail[0][:300]}"}
    return json.loads(Path(out_path).read_text())


@dataclass
class _Graphs:
    """Exported files per (label, batch), or why the export failed, with parity notes."""

    files: dict = field(default_factory=dict)  # (kind, label, batch) -> path, kind "onnx" | "trt"
    errors: dict = field(default_factory=dict)  # (kind, label, batch) -> message
    sha256: dict = field(default_factory=dict)  # (kind, label, batch) -> sha256 of the file
    notes: list = field(default_factory=list)


def _export_all(entries, backends, batches, workdir: Path, tick, **kw) -> _Graphs:
    g = _Graphs()
    exports: dict = {}  # fp32 exports, which the same configuration's int8/fp16 rows start from
    kinds = ["onnx"] if any(b.startswith("ort") for b in backends) else []
    kinds += ["trt"] if "trt" in backends else []
    for bs in batches:
        for i, e in enumerate(entries):
            for kind in kinds:
                tick(f"{'export ONNX' if kind == 'onnx' else 'build TensorRT engine'} {e.label} batch {bs}")
                onnx_path = workdir / f"{kind}{i}_b{bs}.onnx"
                engine = workdir / f"trt{i}_b{bs}.engine" if kind == "trt" else None
                try:
                    note, sha = export_for_bench(e.recipe, bs, onnx_out=onnx_path, engine_out=engine,
                                                 precision=e.precision, exports=exports, **kw)
                except UserError as err:
                    g.errors[(kind, e.label, bs)] = str(err)
                    continue
                g.files[(kind, e.label, bs)] = engine or onnx_path
                g.sha256[(kind, e.label, bs)] = sha
                what = "ONNX" if kind == "onnx" else "TensorRT"
                g.notes.append(f"{what} export {e.label} batch {bs}: {note}")
    return g


def _time_all(entries, backends, batches, rounds: int, graphs: _Graphs, base_spec: dict, workdir: Path,
              tick, prime: bool = False) -> tuple[dict, dict]:
    """Run every configuration `rounds` times round-robin: (samples per round, last result) per key.

    samples[key] is one list of samples per round (a round whose run failed stops the row). With
    `prime`, the first configuration of each backend runs once more before round 1, untimed."""
    samples: dict[tuple, list[list[float]]] = {}
    results: dict[tuple, dict] = {}
    primed: set[str] = set()
    for rnd in range(rounds):
        for backend in backends:
            kind = "trt" if backend == "trt" else "onnx" if backend.startswith("ort") else None
            for bs in batches:
                for e in entries:
                    key = (backend, bs, e.label)
                    if kind is None and e.precision != "fp32":
                        continue  # torch backends run fp32
                    suffix = f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""
                    tick(f"{backend} batch {bs} {e.label}{suffix}")
                    if "error" in results.get(key, {}):
                        continue
                    spec = dict(base_spec, backend=backend, batch=bs, recipe=e.recipe.to_dict())
                    if kind is not None:
                        path = graphs.files.get((kind, e.label, bs))
                        if path is None:
                            results[key] = {"error": graphs.errors.get((kind, e.label, bs), "export failed")}
                            continue
                        spec["onnx" if kind == "onnx" else "engine"] = str(path)
                    if prime and backend not in primed:
                        # thrown away: the first process right after the exports. In 3 traced runs on
                        # the shared 2-core machine, the one whose exports had just run saw its first
                        # process 5x slower than the same configuration in later rounds; one process
                        # per backend is cheap insurance (the rounds and their flag catch the rest).
                        primed.add(backend)
                        run_isolated(spec, workdir)
                    res = run_isolated(spec, workdir)
                    if "error" not in res:
                        samples.setdefault(key, []).append(list(res["samples_ms"]))
                        prev = results.get(key, {}).get("peak_mem_mb", 0.0)
                        res["peak_mem_mb"] = max(res["peak_mem_mb"], prev)
                        res["rounds"] = [*results.get(key, {}).get("rounds", []),
                                         {"warmup": res.get("warmup")}]
                    results[key] = res
    return samples, results


def _rows(entries, built: dict, backends, batches, samples: dict, results: dict,
          threads: int, graphs: "_Graphs", formulation: Optional[str] = None) -> list[BenchRow]:
    base_gmacs = built[entries[0].label].base_macs().gmacs
    rows: list[BenchRow] = []
    for backend in backends:
        for bs in batches:
            base_row = None
            for e in entries:
                b = built[e.base or e.label]
                key = (backend, bs, e.label)
                res = results.get(key, {"error": "not run"})
                target = Target(backend, batch=bs, formulation=formulation)
                kind = "trt" if backend == "trt" else "onnx" if target.graph else None
                if kind is None and e.precision != "fp32":
                    continue
                row = BenchRow(
                    backend=backend, batch=bs, label=e.label, schedule=e.recipe.schedule.describe(),
                    method=e.recipe.method, removed_per_layer=list(b.removed),
                    params=sum(p.numel() for p in b.model.parameters()), gmacs=b.macs_for(target).gmacs,
                    gmacs_base=base_gmacs, threads=threads, baseline=e is entries[0], error=res.get("error"),
                    formulation=target.formulation_for(e.recipe.formulation)[0],
                    graph_sha256=graphs.sha256.get((kind, e.label, bs)), precision=e.precision,
                )
                if row.error is None:
                    per_round = samples[key]
                    row.latency = LatencyStats.of([v for rnd in per_round for v in rnd])
                    row.peak_mem_mb, row.mem_kind = res["peak_mem_mb"], res["mem_kind"]
                    row.rounds = [{"p50_ms": LatencyStats.of(rnd).p50, "n": len(rnd), **info}
                                  for rnd, info in zip(per_round, res.get("rounds", [{}] * len(per_round)),
                                                       strict=True)]
                if row.baseline:
                    base_row = row
                if base_row is not None and base_row.latency and row.latency:
                    base_rounds = samples[(backend, bs, base_row.label)]
                    n = min(len(base_rounds), len(per_round))
                    if row is base_row:  # exactly 1 (independent resamples of one list would blur it)
                        row.spread = SpeedupSpread(1.0, (1.0, 1.0), (1.0,) * n, ((1.0, 1.0),) * n,
                                                   True if n >= 2 else None)
                    else:
                        row.spread = speedup_spread(base_rounds[:n], per_round[:n])
                    row.speedup = row.spread.ratio
                    row.efficiency = row.speedup / row.flops_ratio
                    for d, ratio in zip(row.rounds, row.spread.rounds, strict=False):
                        d["speedup"] = ratio
                rows.append(row)
    return rows


def _with_precisions(entries: list[Entry], precisions: Sequence[str], backends: Sequence[str]) -> list[Entry]:
    """Every entry in fp32 (the baseline and the reference of each ratio), then in each other
    precision asked for ("r=13 int8"), which only graph backends run."""
    from .export.precision import precision_names

    extra = [p for p in precision_names(precisions) if p != "fp32"]
    if extra and not any(Target(b).graph for b in backends):
        raise UserError(f"--precision {extra[0]} is for the ort and trt backends; torch runs fp32 here")
    return entries + [Entry(f"{e.label} {p}", e.recipe, p, e.label) for p in extra for e in entries]


def _caveats(rows: list[BenchRow], loads: tuple[Optional[float], Optional[float]]) -> list[str]:
    notes = []
    cores = _default_threads()
    if cores <= 4:
        notes.append(f"small CPU ({cores} cores): compare rows of the same run, not across runs")
    busy = [v for v in loads if v is not None and v > cores]
    if busy:
        notes.append(f"the machine was busy (load average {max(busy):.1f} on {cores} cores): other processes "
                     "competed for the CPU; timings are noisy, multi-threaded ones most")
    noisy = [r for r in rows if r.latency and r.latency.spread > NOISY_SPREAD]
    if noisy:
        notes.append(f"{len(noisy)} row(s) with a latency spread (p90-p10)/p50 over {NOISY_SPREAD:.0%}: "
                     "treat their speedup with care, or run again with more --rounds")
    for r in rows:
        if r.spread is not None and r.spread.stable is False:
            per = ", ".join(f"{v:.2f}x" for v in r.spread.rounds)
            lo, hi = r.spread.ci
            notes.append(f"{r.backend} batch {r.batch} {r.label}: speedup unstable, {r.spread.why} (per "
                         f"round {per}; 95 % interval {lo:.2f}-{hi:.2f}); not a result: run again with more "
                         "--rounds, --threads 1 or on a quieter machine")
    unwarm = sum(1 for r in rows for d in r.rounds if (d.get("warmup") or {}).get("settled") is False)
    if unwarm:
        notes.append(f"{unwarm} process(es) stopped warming up at the --warmup-max-s bound before their "
                     "latency settled")
    return notes


# --------------------------------------------------------------------------------------------


def run_bench(
    target: str | Sequence[str],
    schedules: Optional[Sequence[int]] = (0, 8, 13, 16),
    backends: Sequence[str] = ("torch",),
    batches: Sequence[int] = (1,),
    *,
    warmup: int = WARMUP_MIN_CALLS,
    iters: Optional[int] = 20,
    duration: Optional[float] = None,
    threads: Optional[int] = None,
    warmup_s: float = WARMUP_MIN_S,
    warmup_max_s: float = WARMUP_MAX_S,
    prime: bool = True,
    compile: bool = False,
    random_weights: bool = False,
    weights: Optional[str | Path] = None,
    method: str = "tome",
    prop_attn: bool = True,
    formulation: Optional[str] = None,
    rounds: int = DEFAULT_ROUNDS,
    simplify: bool = True,
    evals: Sequence[dict] = (),
    progress: Progress = None,
    precisions: Sequence[str] = ("fp32",),
    compare_tome: bool = False,
) -> BenchReport:
    """Time every (backend, batch, schedule) in its own process; see the module docstring.

    `compare_tome`: beside each calibrated artifact, its constant-r ToMe twin (the schedule
    `tomectl calibrate` found at the same latency budget), so the table shows what the search bought.

    target: a timm model name (with `schedules`, constant r values; r=0 is always added) or one
    or more artifact directories of one model. `compile` adds the torch-compile backend beside
    torch. `progress(description, done, total)` is called before each step and once at the end.
    Each process warms up (`bench_worker.warm_up`: at least `warmup` calls and `warmup_s` seconds,
    until its median settles, at most `warmup_max_s`); `prime` runs the first configuration of
    each backend once more, untimed, before round 1.
    """
    from .build import build
    from .models import preprocessing
    from .provenance import machine, now, versions

    load_start = _load_average()
    threads = threads or _default_threads()
    _check_counts(warmup, iters, duration, batches, threads, rounds, warmup_s, warmup_max_s)
    backends = check_backends(list(backends) + (["torch-compile"] if compile and "torch" in backends else []))
    model, entries = entries_for(target, schedules, method, prop_attn, formulation or "scatter")
    if compare_tome:
        entries = entries + tome_twins(target, entries)
    if formulation is not None:  # asked for: every backend runs it, artifacts' torch rows too
        entries = [Entry(e.label, dataclasses.replace(e.recipe, formulation=formulation)) for e in entries]
    entries = _with_precisions(entries, precisions, backends)
    batches = list(dict.fromkeys(int(b) for b in batches))

    # Build each configuration once here: validates schedules and weights, gives params and GMACs.
    built = {e.label: build(e.recipe, weights=weights, random_weights=random_weights)
             for e in entries if not e.base}
    first = built[entries[0].label]
    input_size = list(preprocessing(first.model)["input_size"])

    n_exports = any(b.startswith("ort") for b in backends) + ("trt" in backends)
    steps = len(entries) * len(batches) * (n_exports + len(backends) * rounds)
    done = 0

    def tick(desc: str) -> None:
        nonlocal done
        if progress is not None:
            progress(desc, done, steps)
        done += 1

    base_spec = {"input_size": input_size, "threads": threads, "warmup": warmup, "warmup_s": warmup_s,
                 "warmup_max_s": warmup_max_s, "iters": iters, "duration": duration,
                 "random_weights": random_weights, "weights": str(weights) if weights else None}
    workdir = Path(tempfile.mkdtemp(prefix="tomectl-bench-"))
    try:
        graphs = _export_all(entries, backends, batches, workdir, tick, weights=weights,
                             random_weights=random_weights, simplify=simplify, formulation=formulation)
        samples, results = _time_all(entries, backends, batches, rounds, graphs, base_spec, workdir, tick,
                                     prime=prime)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if progress is not None:
        progress("done", steps, steps)

    rows = _rows(entries, built, backends, batches, samples, results, threads, graphs, formulation)
    load_end = _load_average()
    config = {
        "warmup": warmup, "warmup_s": warmup_s, "warmup_max_s": warmup_max_s, "prime": prime,
        "iters": iters, "duration_s": duration, "threads": threads, "rounds": rounds,
        "random_weights": random_weights, "weights": first.loaded.weights.to_dict(), "backends": backends,
        "batches": batches, "input_size": input_size, "simplify_onnx": simplify,
    }
    notes = ["each configuration timed in its own process; speedup uses median (p50) latencies, all rounds "
             "pooled; (a-b): its 95 % interval (bootstrap over rounds and samples)",
             *graphs.notes, *_caveats(rows, (load_start, load_end))]
    provenance = {"versions": versions(), "machine": machine() | {"bench_threads": threads}, "date": now(),
                  "load_average": {"start": load_start, "end": load_end}}
    return BenchReport(model=model, config=config, rows=rows, provenance=provenance,
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
        "n": (doc.get("data") or {}).get("evaluated"),
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
    warmup: int = WARMUP_MIN_CALLS,
    iters: Optional[int] = 10,
    duration: Optional[float] = None,
    threads: Optional[int] = None,
    warmup_s: float = WARMUP_MIN_S,
    warmup_max_s: float = WARMUP_MAX_S,
    weights: Optional[str | Path] = None,
    random_weights: bool = True,
    isolate: bool = True,
    onnx: Optional[str | Path] = None,
    precision: str = "fp32",
) -> LatencyStats:
    """Latency of one configuration (for `tomectl calibrate`'s latency budgets).

    Random weights by default: the time does not depend on the values. `isolate=False` times in
    this process (quicker to call many times, but disturbed by whatever else ran here). The ort
    backends export the recipe first unless `onnx` names an export of it at this batch; trt
    builds an engine first. The warm-up is bench's (`bench_worker.warm_up`, same defaults).
    """
    from .build import build
    from .models import preprocessing

    threads = threads or _default_threads()
    _check_counts(warmup, iters, duration, [batch], threads, 1, warmup_s, warmup_max_s)
    check_backends([backend])
    built = build(recipe, weights=weights, random_weights=random_weights)
    spec = {"backend": backend, "batch": batch, "input_size": list(preprocessing(built.model)["input_size"]),
            "threads": threads, "warmup": warmup, "warmup_s": warmup_s, "warmup_max_s": warmup_max_s,
            "iters": iters, "duration": duration, "recipe": recipe.to_dict(),
            "random_weights": random_weights, "weights": str(weights) if weights else None}
    workdir = Path(tempfile.mkdtemp(prefix="tomectl-lat-"))
    try:
        kw = dict(weights=weights, random_weights=random_weights, precision=precision)
        sha = None
        if backend.startswith("ort"):
            if onnx is None:
                onnx = workdir / "model.onnx"
                _, sha = export_for_bench(recipe, batch, onnx_out=Path(onnx), **kw)
            else:
                from .models import sha256_of

                sha = sha256_of(onnx)
            spec["onnx"] = str(onnx)
        elif backend == "trt":
            spec["engine"] = str(workdir / "model.engine")
            _, sha = export_for_bench(recipe, batch, onnx_out=workdir / "model.onnx",
                                      engine_out=Path(spec["engine"]), **kw)
        res = run_isolated(spec, workdir) if isolate else run_worker(spec)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if "error" in res:
        what = f"{recipe.model} {recipe.schedule.describe()} on {backend}"
        raise UserError(f"could not time {what}: {res['error']}")
    return dataclasses.replace(LatencyStats.of(res["samples_ms"]), graph_sha256=sha)


@dataclass(frozen=True)
class SideBySide:
    """Configurations timed side by side: `stats` pooled over every round of every process (in the
    configurations' order), `rounds` each round's median per configuration (rows of all processes)."""

    stats: list[LatencyStats]
    rounds: list[list[float]]
    processes: int

    def ratio(self, k: int, base: int = 0) -> float:
        """Configuration k's time over `base`'s: the median over rounds of the two timed in one round
        (a process whose state slows some graphs more than others is one or two rounds of many)."""
        import statistics

        return statistics.median(row[k] / row[base] for row in self.rounds)


def measure_side_by_side(configs: Sequence[tuple[Recipe, Optional[str | Path]]], backend: str = "torch",
                         batch: int = 1, **kw) -> list[LatencyStats]:
    """`time_side_by_side`'s pooled stats, in the order given."""
    return time_side_by_side(configs, backend, batch, **kw).stats


def time_side_by_side(configs: Sequence[tuple[Recipe, Optional[str | Path]]], backend: str = "torch",
                      batch: int = 1, *, threads: Optional[int] = None, rounds: int = 6,
                      duration: float = 0.4, processes: int = SIDE_BY_SIDE_PROCESSES,
                      weights: Optional[str | Path] = None, random_weights: bool = True) -> SideBySide:
    """Latency of several configurations (recipe, its ONNX graph for the ort backends) timed
    round-robin, `rounds` rounds in all, split over `processes` fresh processes one after the other
    (for calibration's finalists beside the unreduced model: their ratio is what a speedup budget
    judges). Stats in the order given, each with the sha256 of its graph.

    Several processes, because the ratio of two graphs timed in one process moves with that process:
    onnxruntime CPU, DeiT-Tiny int8 batch 1, the same six graphs timed in one process after another
    gave one BAT schedule 0.78x and 0.83x of the unreduced model, and a run during a busy spell of
    the machine 0.92-1.03x for schedules that measured 0.85-0.95x in the others."""
    from .build import build
    from .models import preprocessing, sha256_of

    threads = threads or _default_threads()
    check_backends([backend])
    if not configs:
        return SideBySide([], [], 0)
    if rounds < 1 or processes < 1:
        raise ValueError("side-by-side timing needs at least one round in one process")
    processes = min(processes, rounds)
    built = build(configs[0][0], weights=weights, random_weights=random_weights)
    spec = {"backend": backend, "batch": batch, "input_size": list(preprocessing(built.model)["input_size"]),
            "threads": threads, "warmup": WARMUP_MIN_CALLS, "warmup_s": WARMUP_MIN_S / 2,
            "warmup_max_s": WARMUP_MAX_S, "iters": None, "duration": duration, "rounds": rounds,
            "random_weights": random_weights, "weights": str(weights) if weights else None,
            "configs": []}
    for recipe, onnx in configs:
        c = {"recipe": recipe.to_dict()}
        if backend.startswith("ort"):
            if onnx is None:
                raise ValueError("the ort backends time a given ONNX graph")
            c["onnx"] = str(onnx)
        spec["configs"].append(c)
    samples: list[list[float]] = [[] for _ in configs]
    per_round: list[list[float]] = []
    for p in range(processes):
        # rounds spread as evenly as they go: 7 over 3 processes is 3, 2, 2
        spec["rounds"], spec["seed"] = rounds // processes + (p < rounds % processes), p
        workdir = Path(tempfile.mkdtemp(prefix="tomectl-lat-"))
        try:
            res = run_isolated(spec, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if "error" in res:
            raise UserError(f"could not time {configs[0][0].model} on {backend}: {res['error']}")
        for k, got in enumerate(res["samples_ms"]):
            samples[k] += got
        per_round += res["rounds"]
    stats = [dataclasses.replace(LatencyStats.of(s), graph_sha256=None if onnx is None else sha256_of(onnx))
             for s, (_, onnx) in zip(samples, configs, strict=True)]
    return SideBySide(stats, per_round, processes)
