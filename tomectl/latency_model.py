"""A latency model of one target: what each part of a reduced ViT costs on one backend, measured
once and cached, so calibration prices thousands of schedules by time without timing them.

FLOPs are a poor price of time at small batches: the merge step is a few dozen small operators per
block, and the backbone's matrix products get less efficient as tokens shrink. So the parts are
timed on the real backend, in a process of their own (`python -m tomectl.latency_model SPEC OUT`),
every probe round-robin with the others so that drift of a shared machine hits them alike:

- ``fixed``: patch and position embedding, final norm and head (paid once by every schedule);
- ``block(n)``: one plain block at n tokens, on a grid of token counts, as blocks run before any
  reduction (every token of size 1: no attention bias);
- ``sblock(n)``: the same block with token sizes, as blocks run after the first reduction
  (proportional attention adds the log-size bias to the scores);
- ``mlp(n)``: the MLP half of a block at n tokens (what removing tokens before it saves);
- ``reduce[method][regime](n, r)``: one block at n tokens that removes r tokens with the method
  (its decision and merge sit between the attention and the MLP), on a grid of (n, r); a method
  whose decision differs by block (ToFu prunes early and merges late) has one regime per kind;
- ``call``: one call of the backend on a trivial graph (subtracted from every probe: the whole
  model is one call, not thirteen);
- ``whole``: the unreduced model, one call.

A schedule's predicted latency (`LatencyModel.predict_raw`) is ``fixed`` plus, per block,
``b(n)`` where it removes nothing and ``b(n) - mlp(n) + mlp(n - r) + merge(n, r)`` where it removes
r, ``b`` being ``block`` up to the first block that removes tokens and ``sblock`` after it, and
``merge(n, r) = reduce(n, r) - sblock(n) + mlp(n) - mlp(n - r)`` the decision and merge's own time
at the grid points (the reduce probes run with sizes, at token counts of the grid), interpolated
linearly in r (as a fraction of what the method can remove there), then in n.

`predict` adds what the whole graph costs beyond its parts, ``gap = whole - predict_raw(unreduced)``
(both measured in the same rounds), as milliseconds, not as a share. Each probe runs its one block's
weights over and over, so they stay in the cache; the whole model streams twelve blocks' weights per
call, and that cost does not shrink with the token count. Measured (onnxruntime CPU, DeiT-Tiny,
batch 1, 1 thread: each block of an exported whole graph cut out and timed alone, beside the whole):
the cut blocks matched the table's blocks within 0.02 ms each, and the whole graph took 1.0-1.5 ms
more than the sum of its cut parts for the unreduced model (26.8 ms), ToMe r=13 (18.6 ms), EViT
and BAT schedules that keep 25 % of the tokens after block 3 (13.6 and 11.5 ms) alike, in fp32 and
int8. A share of the whole (the earlier anchoring) put that gap at 0.4 ms for the strongest of
them: every strong schedule was under-predicted, BAT most. `anchored(ms)` then scales everything
by the drift of the machine (``ms / table_whole``: a fresh measurement of the unreduced model over
the table's own, which `replace` carries over).

Graph backends (onnxruntime) time the graph tomectl exports: every probe is one chain in a single
ONNX export (one exporter run instead of dozens), each probe's subgraph is cut out by its boundary
tensors and converted to the target's precision with the export pipeline's own converters, then
timed as a session of its own. Torch backends time the probe modules themselves (torch.compile'd
for ``torch-compile``). TensorRT engines are not modelled: `tomectl calibrate --backend trt` brackets
constant r by measuring engines instead.

The table is cached as JSON under ``--cache-dir`` (default ``$TOMECTL_CACHE_DIR`` or
``~/.cache/tomectl/latency``), keyed by model, input size, backend, precision, batch, threads, the
CPU/GPU, and the torch/onnxruntime/tomectl versions.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import UserError

SCHEMA = 2  # 2: the reduce probes sit on the token grid; blocks with sizes timed apart (sblock)
MODEL_BACKENDS = ("torch", "torch-compile", "torch-cuda", "ort", "ort-cuda", "ort-trt")
TOKEN_FRACTIONS = (1.0, 0.82, 0.64, 0.48, 0.34, 0.22, 0.11, 0.0)  # of the free tokens
# token counts of the reduce grid: points of the token grid, so that a merge's own cost is the
# difference of two probes timed at the same count (`LatencyModel.merge_ms`)
REDUCE_FRACTIONS = (1.0, 0.48, 0.22)
REMOVE_FRACTIONS = (0.0, 0.5, 1.0)  # of the method's capacity at that count (0.0: one token)
WORKER_TIMEOUT_S = 3600
# Rounds of the probes, each in its own shuffled order: a merge's time is the difference of two
# probes timed apart, and drift of a shared machine comes in bursts of seconds (eager torch, DeiT-Tiny
# batch 1: blocks moved by 10-15 % between rounds). With 5 rounds in a fixed order, torch tables put
# some merges at -0.5 ms; ten shuffled rounds spread each burst over every probe.
ROUNDS = 10
STACK = 10  # probes per ONNX export
# A table whose probes spread more than this ((p90 - p10) / p50, the median probe) is measured again
# once, the quieter kept: eager torch, DeiT-Tiny batch 1, a table measured through a busy spell of
# the VM (spread 47 %) priced 20 random schedules per method with a worst error of 13 %, one
# measured an hour later (spread 8 %) within 5.7 %, against the same kind of measurement.
NOISY_TABLE = 0.25


# --- the table and its arithmetic (pure: no torch) ------------------------------------------------


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear interpolation through (xs, ys) (xs increasing), extended linearly past the
    ends."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y0


@dataclass
class LatencyModel:
    """Measured parts of one target (milliseconds per call of a whole batch); see the module doc."""

    key: dict  # what was measured: model, input_size, backend, precision, batch, threads, machine...
    n_tokens: int
    protected: int
    n_layers: int
    fixed: float
    call: float
    whole: float
    block: dict[int, float]  # tokens -> ms (no token sizes yet: no attention bias)
    sized_block: dict[int, float]  # tokens -> ms, with sizes (after a reduction: the attention bias)
    mlp: dict[int, float]  # tokens -> ms
    reduce: dict[str, dict[str, dict[tuple[int, int], float]]]  # method -> regime -> (n, r) -> ms
    capacity: dict[str, dict[int, int]] = field(default_factory=dict)  # method -> n -> most removable
    regimes: dict[str, list[str]] = field(default_factory=dict)  # method -> regime of each block
    spread: float = 0.0  # median (p90 - p10) / p50 of the probes
    seconds: float = 0.0  # how long the measurement took
    created: str = ""
    table_whole: float = 0.0  # `whole` as the table measured it (`anchored` moves `whole`); 0: `whole`

    def __post_init__(self) -> None:
        self.table_whole = self.table_whole or self.whole

    # -- interpolation --
    def _curve(self, table: dict[int, float], n: float) -> float:
        xs = sorted(table)
        return _interp(xs, [table[k] for k in xs], n)

    def block_ms(self, n: float, sized: bool = False) -> float:
        """One block at n tokens that removes nothing; `sized`: after a reduction (attention bias)."""
        return self._curve(self.sized_block if sized else self.block, n)

    def mlp_ms(self, n: float) -> float:
        return self._curve(self.mlp, n)

    def _cap(self, method: str, n: float) -> float:
        caps = self.capacity[method]
        if n in caps:
            return max(1.0, float(caps[n]))
        return max(1.0, self._curve({k: float(v) for k, v in caps.items()}, n))

    def merge_ms(self, method: str, regime: str, n: int, r: int) -> float:
        """The decision + merge's own time at (n, r): interpolated in r / capacity, then in n."""
        grid = self.reduce[method][regime]
        rows: dict[int, list[tuple[float, float]]] = {}
        for (gn, gr), ms in grid.items():
            own = ms - self.block_ms(gn, sized=True) + self.mlp_ms(gn) - self.mlp_ms(gn - gr)
            rows.setdefault(gn, []).append((gr / self._cap(method, gn), own))
        u = r / self._cap(method, n)
        ns = sorted(rows)
        at = []
        for gn in ns:
            pts = sorted(rows[gn])
            at.append(_interp([p[0] for p in pts], [p[1] for p in pts], u))
        return _interp(ns, at, n)

    def block_with(self, method: str, regime: str, n: int, r: int, sized: bool = False) -> float:
        """One block at n tokens that removes r (0: a plain block); `sized`: a reduction came before."""
        block = self.block_ms(n, sized)
        if r <= 0:
            return block
        return block - self.mlp_ms(n) + self.mlp_ms(n - r) + self.merge_ms(method, regime, n, r)

    # -- prediction --
    def predict_raw(self, method: str, removed: Sequence[int]) -> float:
        """fixed + the blocks' sum, in ms (see the module doc)."""
        if len(removed) != self.n_layers:
            raise ValueError(f"schedule of {len(removed)} layers for a {self.n_layers}-block model")
        if method not in self.reduce and any(removed):
            raise KeyError(f"the latency model has no measurements of method {method!r}")
        regimes = self.regimes.get(method) or ["all"] * self.n_layers
        n, total, sized = self.n_tokens, self.fixed, False
        for i, r in enumerate(removed):
            total += self.block_with(method, regimes[i], n, r, sized)
            n -= r
            sized = sized or r > 0
        return total

    @cached_property
    def base_raw(self) -> float:
        """The unreduced schedule's parts (every prediction reads it: computed once per table)."""
        return self.predict_raw(next(iter(self.reduce), "tome"), [0] * self.n_layers)

    @property
    def gap(self) -> float:
        """What the whole unreduced graph took beyond the sum of its parts, in the table's ms (see the
        module doc: a constant of the model, not a share of the schedule)."""
        return self.table_whole - self.base_raw

    def predict(self, method: str, removed: Sequence[int]) -> float:
        """Predicted whole-model latency (ms) of a schedule: its parts plus the whole graph's gap,
        scaled by the drift since the table (`anchored`)."""
        return (self.predict_raw(method, removed) + self.gap) * self.whole / self.table_whole

    def anchored(self, whole_ms: float) -> "LatencyModel":
        """The same model, anchored on a fresh measurement of the unreduced model (the machine drifts
        between the table's measurement and now; the parts' ratios hold)."""
        from dataclasses import replace

        return replace(self, whole=whole_ms)

    # -- (de)serialisation --
    def to_dict(self) -> dict:
        d = asdict(self)
        d["block"] = {str(k): v for k, v in self.block.items()}
        d["sized_block"] = {str(k): v for k, v in self.sized_block.items()}
        d["mlp"] = {str(k): v for k, v in self.mlp.items()}
        d["reduce"] = {m: {g: [[n, r, ms] for (n, r), ms in sorted(t.items())] for g, t in regs.items()}
                       for m, regs in self.reduce.items()}
        d["capacity"] = {m: {str(n): c for n, c in caps.items()} for m, caps in self.capacity.items()}
        return {"schema": SCHEMA, "kind": "latency-model", **d}

    @staticmethod
    def from_dict(d: dict) -> "LatencyModel":
        if not isinstance(d, dict) or d.get("kind") != "latency-model" or d.get("schema") != SCHEMA:
            raise ValueError("not a tomectl latency model of this version")
        return LatencyModel(
            key=d["key"], n_tokens=int(d["n_tokens"]), protected=int(d["protected"]),
            n_layers=int(d["n_layers"]), fixed=float(d["fixed"]), call=float(d["call"]),
            whole=float(d["whole"]),
            block={int(k): float(v) for k, v in d["block"].items()},
            sized_block={int(k): float(v) for k, v in d["sized_block"].items()},
            mlp={int(k): float(v) for k, v in d["mlp"].items()},
            reduce={m: {g: {(int(n), int(r)): float(ms) for n, r, ms in rows} for g, rows in regs.items()}
                    for m, regs in d["reduce"].items()},
            capacity={m: {int(n): int(c) for n, c in caps.items()} for m, caps in d["capacity"].items()},
            regimes={m: list(v) for m, v in d.get("regimes", {}).items()},
            spread=float(d.get("spread", 0.0)), seconds=float(d.get("seconds", 0.0)),
            created=str(d.get("created", "")), table_whole=float(d.get("table_whole", 0.0)),
        )


# --- the grid -----------------------------------------------------------------------------------


def _grid_count(n_tokens: int, protected: int, f: float) -> int:
    """The token count at fraction `f` of the free tokens (at least one free token)."""
    return max(protected + 1, round(protected + 1 + (n_tokens - protected - 1) * f))


def token_grid(n_tokens: int, protected: int) -> list[int]:
    """Token counts block(n) and mlp(n) are measured at (n_tokens down to protected + 1)."""
    return sorted({_grid_count(n_tokens, protected, f) for f in TOKEN_FRACTIONS})


def reduce_grid(n_tokens: int, protected: int,
                capacity: Callable[[int, int], int]) -> list[tuple[int, int]]:
    """(n, r) points a method's reduce probes are measured at: n on the token grid.

    A merge's own time is a small difference of two block-sized probes (`LatencyModel.merge_ms`);
    where block(n) had to be interpolated between grid points, its interpolation error (a block's
    time is not linear in n between grid points: measured up to 0.3 ms on onnxruntime, DeiT-Tiny)
    was as large as the merge itself (0.3-0.4 ms at batch 1), and the int8 table under-predicted
    schedules with many small merges by up to 18 %."""
    out = []
    for f in REDUCE_FRACTIONS:
        n = _grid_count(n_tokens, protected, f)
        if n < protected + 3:  # nothing to match
            continue
        cap = capacity(n, protected)
        if cap < 1:
            continue
        for g in REMOVE_FRACTIONS:
            out.append((n, max(1, round(cap * g))))
    return sorted(set(out))


@dataclass(frozen=True)
class Probe:
    """One thing timed: kind "fixed" | "call" | "block" | "sblock" | "mlp" | "reduce" | "whole"."""

    kind: str
    n: int = 0
    r: int = 0
    method: str = ""
    regime: str = ""
    layer: int = 0  # the block index the reduce probe decides as (ToFu's regime depends on it)

    @property
    def name(self) -> str:
        if self.kind == "reduce":
            return f"reduce-{self.method}-{self.regime}-{self.n}-{self.r}"
        return f"{self.kind}-{self.n}" if self.kind in ("block", "sblock", "mlp") else self.kind


def plan_probes(n_tokens: int, protected: int, n_layers: int,
                methods: dict) -> tuple[list[Probe], dict, dict]:
    """(probes, capacity per method and grid count, regime of each block per method).

    `methods`: name -> ReductionMethod (for capacity, acting layers and cost regimes)."""
    probes = [Probe("call", n_tokens), Probe("fixed"), Probe("whole")]
    grid = token_grid(n_tokens, protected)
    probes += [Probe(kind, n) for kind in ("block", "sblock", "mlp") for n in grid]
    caps: dict = {}
    regimes: dict = {}
    for name, m in methods.items():
        acting = m.layers(n_layers)
        acting = tuple(range(n_layers)) if acting is None else tuple(acting)
        regimes[name] = [m.cost_regime(i, n_layers) for i in range(n_layers)]
        first = {}
        for i in acting:
            first.setdefault(regimes[name][i], i)
        points = reduce_grid(n_tokens, protected, m.capacity)
        caps[name] = {n: m.capacity(n, protected) for n in range(protected + 1, n_tokens + 1)}
        for regime, layer in first.items():
            probes += [Probe("reduce", n, r, name, regime, layer) for n, r in points]
    return probes, caps, regimes


# --- the cache ----------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("TOMECTL_CACHE_DIR")
    return Path(env) / "latency" if env else Path.home() / ".cache" / "tomectl" / "latency"


def target_key(model_name: str, input_size: Sequence[int], backend: str, precision: str, batch: int,
               threads: int, int8_mode: Optional[str] = None) -> dict:
    """What a table is valid for: the model, the target, this machine and the software."""
    import platform

    from . import __version__
    from .provenance import machine, versions

    m = machine()
    v = versions()
    key = {"model": model_name, "input_size": list(input_size), "backend": backend, "precision": precision,
           "batch": batch, "threads": threads, "cpu": m.get("cpu"), "gpu": m.get("gpu"),
           "platform": platform.machine(), "tomectl": __version__,
           "torch": v.get("torch"), "onnxruntime": v.get("onnxruntime"), "schema": SCHEMA}
    if backend.startswith("ort"):  # the graphs the exporter writes
        from .export.onnx import GRAPH_REVISION

        key["graph"] = GRAPH_REVISION
    if precision == "int8":
        from .export.precision import INT8_GRAPH_REVISION

        key["int8_mode"] = int8_mode or "dynamic"
        key["int8_graph"] = INT8_GRAPH_REVISION
    return key


def cache_path(key: dict, cache_dir: Optional[str | Path] = None) -> Path:
    """Where the table of `key` is cached."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key["model"])
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    return folder / (f"{safe}-{key['backend']}-{key['precision']}-b{key['batch']}-t{key['threads']}"
                     f"-{digest}.json")


def load_cached(key: dict, cache_dir=None, methods: Sequence[str] = ()) -> Optional[LatencyModel]:
    """The cached table for `key` holding every method in `methods`, or None (absent, stale, corrupt)."""
    path = cache_path(key, cache_dir)
    try:
        model = LatencyModel.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if model.key != key or any(m not in model.reduce for m in methods):
        return None
    return model


def save(model: LatencyModel, cache_dir=None) -> Path:
    """Write the table atomically (temporary file, then rename)."""
    path = cache_path(model.key, cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".latency-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(model.to_dict(), f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write the latency model cache in {path.parent}: {e.strerror or e}; "
                        "pass a writable --cache-dir") from None
    return path


# --- measuring (parent side) ----------------------------------------------------------------------


def check_backend(backend: str) -> None:
    if backend not in MODEL_BACKENDS:
        raise UserError(f"the latency model measures the {', '.join(MODEL_BACKENDS)} backends, not "
                        f"{backend!r}")


def latency_model(model_name: str, backend: str = "ort", *, precision: str = "fp32", batch: int = 1,
                  threads: Optional[int] = None, methods: Optional[Sequence[str]] = None,
                  cache_dir: Optional[str | Path] = None, rounds: int = ROUNDS, refresh: bool = False,
                  int8_mode: Optional[str] = None, progress=None, worker=None) -> tuple[LatencyModel, bool]:
    """The latency model of a target: (model, whether it came from the cache).

    Measured in a process of its own unless cached. `methods`: the training-free methods by default.
    `worker(spec) -> dict` replaces the subprocess (tests)."""
    from . import models
    from .bench import _default_threads
    from .calibrate.space import training_free_methods

    check_backend(backend)
    threads = threads or _default_threads()
    methods = list(methods or training_free_methods())
    loaded = models.create(model_name, random_weights=True)
    input_size = list(models.preprocessing(loaded.model)["input_size"])
    key = target_key(model_name, input_size, backend, precision, batch, threads, int8_mode)
    if not refresh:
        cached = load_cached(key, cache_dir, methods)
        if cached is not None:
            return cached, True
    spec = {"key": key, "model": model_name, "backend": backend, "precision": precision, "batch": batch,
            "threads": threads, "methods": methods, "rounds": rounds, "int8_mode": int8_mode}
    if progress:
        progress("latency model", 0, 1)
    t0 = time.perf_counter()
    run = worker or _run_worker
    res = run(spec)
    if "error" not in res and res.get("spread", 0.0) > NOISY_TABLE:
        # measured through a busy spell: once more, and the quieter of the two is kept
        again = run(spec)
        if "error" not in again and again.get("spread", 0.0) < res["spread"]:
            res = again
    if "error" in res:
        raise UserError(f"could not measure the latency model of {model_name} on {backend}: {res['error']}")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    model = LatencyModel.from_dict(res)
    save(model, cache_dir)
    if progress:
        progress("latency model", 1, 1)
    return model, False


def _run_worker(spec: dict) -> dict:
    from .bench import _worker_env

    with tempfile.TemporaryDirectory(prefix="tomectl-latmodel-") as td:
        spec_path, out_path = Path(td) / "spec.json", Path(td) / "out.json"
        spec_path.write_text(json.dumps(dict(spec, workdir=td)))
        cmd = [sys.executable, "-m", "tomectl.latency_model", str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, env=_worker_env(spec["threads"]), capture_output=True, text=True,
                                  timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
        if not out_path.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            return {"error": f"worker exited with code {proc.returncode}: {tail[0][:300]}"}
        return json.loads(out_path.read_text())


# --- measuring (worker side) ----------------------------------------------------------------------


def _probe_modules(model, probes: list[Probe], methods: dict):
    """torch modules, one per probe, over the model's own parts (block 0's weights stand for every
    block's: shapes, not values, set the time)."""
    from torch import nn

    from .adapters import vit
    from .reduce import TokenState

    p = model.num_prefix_tokens

    class Part(nn.Module):
        # the model is a registered submodule, so that the exporter records its layers' module
        # hierarchy: int8 conversion finds the linear layers by it (`quantizable_nodes`)
        def __init__(self):
            super().__init__()
            self.model = model

    class Fixed(Part):
        def forward(self, img):
            m = self.model
            t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(img))))
            return m.forward_head(m.norm(t))

    class Call(nn.Module):
        def forward(self, x):
            return x + 1.0

    class Mlp(Part):
        def forward(self, x):
            blk = self.model.blocks[0]
            return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    class Block(Part):
        def __init__(self, method=None, amount=0, layer=0, sized=True):
            super().__init__()
            self.method, self.amount, self.layer, self.sized = method, amount, layer, sized

        def forward(self, x):
            # sized: sizes as after a merge (so proportional attention's bias is paid), from x so that
            # no exporter folds them away; else as before any reduction (no sizes, no bias)
            state = TokenState(protected=p, size=x[..., :1] * 0.0 + 1.0 if self.sized else None)
            return vit.run_block(self.model, 0, x, state, self.amount, self.method, self.layer)

    out = {}
    for pr in probes:
        if pr.kind == "fixed":
            out[pr.name] = Fixed()
        elif pr.kind == "call":
            out[pr.name] = Call()
        elif pr.kind == "mlp":
            out[pr.name] = Mlp()
        elif pr.kind in ("block", "sblock"):
            out[pr.name] = Block(sized=pr.kind == "sblock")
        elif pr.kind == "reduce":
            out[pr.name] = Block(methods[pr.method], pr.r, pr.layer)
        elif pr.kind == "whole":
            out[pr.name] = model
    return {k: v.eval() for k, v in out.items()}


def _input_for(pr: Probe, batch: int, input_size, dim: int, n_tokens: int):
    import torch

    g = torch.Generator().manual_seed(0)
    if pr.kind in ("fixed", "whole"):
        return torch.randn(batch, *input_size, generator=g)
    return torch.randn(batch, pr.n or n_tokens, dim, generator=g)


def _chain(mods: dict, probes: list[Probe]):
    """Every token probe chained in one module (one ONNX export for all of them): probe k reads
    ``in{k}`` (the previous probe's output cut or tiled to its token count) and writes ``out{k}``."""
    import torch
    from torch import nn

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.mods = nn.ModuleList([mods[p.name] for p in probes])
            self.sizes = [p.n for p in probes]

        def forward(self, x):
            outs = []
            prev = x
            for m, n in zip(self.mods, self.sizes, strict=True):
                reps = -(-n // prev.shape[1])
                # a real operator at every boundary (the exporter removes identities, which would
                # join two probes' tensors into one)
                xin = torch.relu((torch.cat([prev] * reps, dim=1) if reps > 1 else prev)[:, :n])
                y = m(xin)
                outs += [xin, y]
                prev = y
            return tuple(outs)

    return Chain().eval()


def _export_many(module, example, out_names: list[str], path: Path) -> None:
    import onnx

    from .export.onnx import export_graph

    onnx.save(export_graph(module, example, output_names=out_names), str(path))


def _fold_weight_transposes(proto):
    """Transposes of initializers folded into the initializers: in a chain the probes share block 0's
    weights, and the exporter leaves a shared weight's transpose as a node, where the whole model's
    graph has a transposed initializer (int8 conversion quantizes only constant weights)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    keep = []
    for node in proto.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            arr = numpy_helper.to_array(inits[node.input[0]]).transpose(perm)
            proto.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    live = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(live)
    return proto


def _int8_ops(path: Path) -> int:
    """How many int8 nodes a graph has (dynamic: MatMulInteger/ConvInteger; static QDQ: its
    DequantizeLinear nodes, two or more per converted product)."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    return sum(n.op_type in ("MatMulInteger", "ConvInteger", "DequantizeLinear") for n in nodes)


def _graph_probes(spec: dict, model, probes: list[Probe], mods: dict, workdir: Path) -> dict:
    """probe name -> path of its ONNX graph in the target's precision."""
    import onnx
    import torch

    from .export.onnx import export_graph
    from .export.precision import to_fp16_graph, to_int8

    b, dim = spec["batch"], model.embed_dim
    input_size = spec["input_size"]
    paths: dict[str, Path] = {}
    g = torch.Generator().manual_seed(0)
    img = torch.randn(b, *input_size, generator=g)
    for name in [n for n in ("fixed", "whole") if n in mods]:
        proto = export_graph(mods[name], img)
        paths[name] = workdir / f"{name}.onnx"
        onnx.save(proto, str(paths[name]))
    chain = [p for p in probes if p.kind not in ("fixed", "whole")]
    for c0 in range(0, len(chain), STACK):  # the exporter's optimiser slows down on big graphs
        part = chain[c0:c0 + STACK]
        outs = [f"{io}{k}" for k in range(len(part)) for io in ("in", "out")]
        stack_path = workdir / f"stack{c0}.onnx"
        _export_many(_chain(mods, part), torch.randn(b, spec["n_tokens"], dim, generator=g), outs, stack_path)
        ext = onnx.utils.Extractor(onnx.load(str(stack_path)))
        for k, pr in enumerate(part):
            paths[pr.name] = workdir / f"p{c0 + k}.onnx"
            probe = _fold_weight_transposes(ext.extract_model([f"in{k}"], [f"out{k}"]))
            onnx.save(probe, str(paths[pr.name]))
    precision = spec["precision"]
    if precision == "fp32":
        return paths
    conv = {}
    for name, path in paths.items():
        dst = path.with_suffix(f".{precision}.onnx")
        if name == "call":  # no linear layer: it stays as it is
            conv[name] = path
            continue
        if precision == "int8":
            mode = spec.get("int8_mode") or "dynamic"
            calib = None
            if mode == "static":
                shape = onnx.load(str(path)).graph.input[0].type.tensor_type.shape
                calib = torch.randn(8 * b, *[d.dim_value for d in shape.dim][1:], generator=g)
            to_int8(path, dst, mode, calib)  # refuses a probe with no linear layer found
            if name != "fixed" and _int8_ops(dst) < 2:  # every block has at least fc1 and fc2
                raise RuntimeError(f"int8 probe {name}: its linear layers were not converted")
        else:
            to_fp16_graph(path, dst)
        conv[name] = dst
    return conv


def _timers(spec: dict, model, probes: list[Probe], methods: dict, workdir: Path) -> dict:
    """probe name -> a function running it once (inputs prepared), plus the sync of the device."""
    import torch

    mods = _probe_modules(model, probes, methods)
    backend, b = spec["backend"], spec["batch"]
    fns = {}
    if backend.startswith("ort"):
        import numpy as np

        from .runtime import ort_session

        paths = _graph_probes(spec, model, probes, mods, workdir)
        for pr in probes:
            sess = ort_session(paths[pr.name], threads=spec["threads"], backend=backend)
            inp = sess.get_inputs()[0]
            x = np.random.default_rng(0).standard_normal([int(d) for d in inp.shape]).astype(np.float32)
            fns[pr.name] = (lambda s=sess, n=inp.name, x=x: s.run(None, {n: x}))
        return fns
    cuda = backend == "torch-cuda"
    device = torch.device("cuda" if cuda else "cpu")
    model.to(device)
    for pr in probes:
        m = mods[pr.name]
        if backend == "torch-compile":
            m = torch.compile(m)
        x = _input_for(pr, b, spec["input_size"], model.embed_dim, spec["n_tokens"]).to(device)

        def fn(m=m, x=x):
            with torch.inference_mode():
                m(x)

        fns[pr.name] = fn
    return fns


def measure_worker(spec: dict) -> dict:
    """Build the probes of `spec`'s model and time them round-robin in this process."""
    import torch

    from . import models
    from .bench import LatencyStats
    from .bench_worker import time_loop
    from .build import build
    from .provenance import now
    from .recipe import Recipe
    from .reduce import get_method
    from .schedule import Schedule

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    reduced = build(Recipe(model=spec["model"], schedule=Schedule.make(r=0), method="tome",
                           formulation="onehot" if spec["backend"].startswith("ort") else "scatter"),
                    random_weights=True)
    model = reduced.model
    n_tokens, protected, n_layers = reduced.tokens[0], model.num_prefix_tokens, len(model.blocks)
    methods = {m: get_method(m) for m in spec["methods"]}
    probes, caps, regimes = plan_probes(n_tokens, protected, n_layers, methods)
    spec = dict(spec, input_size=list(models.preprocessing(model)["input_size"]), n_tokens=n_tokens)
    workdir = Path(spec.get("workdir") or tempfile.mkdtemp(prefix="tomectl-latmodel-"))
    fns = _timers(spec, model, probes, methods, workdir)
    samples: dict[str, list[float]] = {p.name: [] for p in probes}
    for fn in fns.values():  # first calls (allocation, compilation) before any timing
        fn()
    order = list(probes)
    shuffle = random.Random(0).shuffle
    for _ in range(spec.get("rounds", ROUNDS)):
        shuffle(order)
        for pr in order:
            samples[pr.name] += time_loop(fns[pr.name], 3, None, 0.05, lambda: None)
    stats = {k: LatencyStats.of(v) for k, v in samples.items()}
    ms = {k: s.p50 for k, s in stats.items()}
    call = ms["call"]

    def own(name: str) -> float:
        return max(ms[name] - call, 0.0)

    spreads = sorted(s.spread for s in stats.values())
    reduce: dict = {}
    for pr in probes:
        if pr.kind == "reduce":
            reduce.setdefault(pr.method, {}).setdefault(pr.regime, {})[(pr.n, pr.r)] = own(pr.name)
    table = LatencyModel(
        key=spec["key"], n_tokens=n_tokens, protected=protected, n_layers=n_layers, fixed=own("fixed"),
        call=call, whole=ms["whole"],
        block={p.n: own(p.name) for p in probes if p.kind == "block"},
        sized_block={p.n: own(p.name) for p in probes if p.kind == "sblock"},
        mlp={p.n: own(p.name) for p in probes if p.kind == "mlp"},
        reduce=reduce, capacity=caps, regimes=regimes, spread=spreads[len(spreads) // 2],
        seconds=time.perf_counter() - t0, created=now(),
    )
    return table.to_dict()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tomectl.latency_model SPEC.json OUT.json (internal; see tomectl calibrate)",
              file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    try:
        result = measure_worker(spec)
    except UserError as e:
        result = {"error": str(e)}
    except Exception as e:  # reported as one line by the parent
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result = {"error": f"{type(e).__name__}: {first}"[:300]}
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
