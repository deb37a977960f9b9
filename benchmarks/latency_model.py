"""How well the latency model predicts whole-model latency (issue #14, item 1).

For each backend: the target's latency model (`tomectl.latency_model`, measured or cached), then
N random schedules of every training-free method, each timed as a whole model side by side with the
unreduced model (`bench.time_side_by_side`, as calibration times its finalists, but 9 rounds of 0.5 s
per graph over 3 fresh processes instead of 6 of 0.4 s: what is judged here is the model, so the
measurement it is judged against must be the tighter of the two). Measured = the unreduced model's
time times the median over rounds of the schedule's ratio to it within the round. Predicted = the
model anchored on the unreduced model's time (what calibration does); "raw" = the table alone,
anchored on its own measurement of the whole model; "gap as a share" = the earlier anchoring (the
whole graph's gap over its parts scaled with the schedule instead of added in ms), on the same
measurements.

    python benchmarks/latency_model.py [--backends ort,torch] [--schedules 20] [--threads 1]
    python benchmarks/latency_model.py --backends ort --precision int8 --out .../latency_model_int8

`--precision int8` (onnxruntime only): the int8 table, and every schedule's graph converted by
export's own quantizer (dynamic, the default mode), as calibrate --precision fp32,int8 prices them.

Writes benchmarks/results/latency_model.{md,json}. Random weights: time does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import torch  # noqa: E402

from tomectl.bench import time_side_by_side  # noqa: E402
from tomectl.build import build  # noqa: E402
from tomectl.calibrate.space import _space_for, training_free_methods  # noqa: E402
from tomectl.export.onnx import export_graph  # noqa: E402
from tomectl.export.precision import to_int8  # noqa: E402
from tomectl.latency_model import latency_model  # noqa: E402
from tomectl.models import create  # noqa: E402
from tomectl.recipe import Recipe  # noqa: E402
from tomectl.reduced import Target  # noqa: E402
from tomectl.schedule import Schedule  # noqa: E402

GROUP = 5  # schedules timed beside the unreduced model per process


def random_schedule(space, method: str, rng: random.Random) -> tuple[int, ...]:
    """A random schedule of `method`: a random share of its acting blocks, random amounts."""
    acting = list(space.acting_layers(method))
    k = rng.randint(1, len(acting))
    at = sorted(rng.sample(acting, k))
    keep = rng.uniform(0.08, 0.9)  # final share of the free tokens
    free = space.n_tokens - space.protected
    total = int(free * (1 - keep))
    weights = [rng.random() + 0.05 for _ in at]
    removed = [0] * space.n_layers
    for i, w in zip(at, weights, strict=True):
        removed[i] = int(total * w / sum(weights))
    return space.clamp(method, removed)


def run_backend(model_name: str, backend: str, n_sched: int, threads: int, seed: int, cache_dir,
                precision: str = "fp32", rounds: int = 9, duration: float = 0.5, processes: int = 3) -> dict:
    loaded = create(model_name, random_weights=True)
    methods = training_free_methods()
    formulation = "onehot" if backend.startswith("ort") else "scatter"
    space = _space_for(loaded.model, methods, {}, formulation)
    t0 = time.perf_counter()
    if precision != "fp32" and not backend.startswith("ort"):
        raise SystemExit(f"--precision {precision}: onnxruntime only")
    lm, cached = latency_model(model_name, backend, precision=precision, threads=threads, methods=methods,
                               cache_dir=cache_dir)
    lm_s = time.perf_counter() - t0
    rng = random.Random(seed)
    scheds = [(m, random_schedule(space, m, rng)) for m in methods for _ in range(n_sched)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="latbench-") as td:
        def graph(i, m, removed):
            rec = Recipe(model=model_name, schedule=Schedule(per_layer=removed), method=m,
                         weights={"source": "random"})
            if not backend.startswith("ort"):
                return rec, None
            path = Path(td) / f"s{i}.onnx"
            # the graph tomectl exports (onehot formulation), without export's parity checks: only
            # its time matters here
            model = build(rec, random_weights=True, target=Target("ort", batch=1)).model
            onnx.save(export_graph(model, torch.randn(1, 3, 224, 224)), str(path))
            if precision == "int8":
                to_int8(path, path.with_suffix(".int8.onnx"))
                path = path.with_suffix(".int8.onnx")
            return rec, path

        base = graph("base", "tome", tuple([0] * space.n_layers))
        for g0 in range(0, len(scheds), GROUP):
            part = scheds[g0:g0 + GROUP]
            configs = [base] + [graph(g0 + k, m, r) for k, (m, r) in enumerate(part)]
            timed = time_side_by_side(configs, backend, 1, threads=threads, random_weights=True,
                                      rounds=rounds, duration=duration, processes=processes)
            stats = timed.stats
            base_ms = stats[0].p50
            now = lm.anchored(base_ms)
            for k, ((m, r), st) in enumerate(zip(part, stats[1:], strict=True), start=1):
                # measured: the unreduced model's time times the median over rounds of the schedule's
                # ratio to it in the same round (pooled p50 alongside)
                measured = base_ms * timed.ratio(k)
                pred, raw = now.predict(m, r), lm.predict(m, r)
                parts = lm.predict_raw(m, r)
                share = parts * base_ms / lm.base_raw  # the earlier anchoring: the gap as a share
                rows.append({"method": m, "removed": list(r), "measured_ms": measured, "pooled_ms": st.p50,
                             "spread": st.spread, "predicted_ms": pred, "error": pred / measured - 1,
                             "raw_ms": raw, "raw_error": raw / measured - 1, "parts_ms": parts,
                             "share_predicted_ms": share, "share_error": share / measured - 1,
                             "base_ms": base_ms})
            print(f"{backend}: {len(rows)}/{len(scheds)} schedules timed", flush=True)
    return {"backend": backend, "precision": precision, "threads": threads, "model_cached": cached,
            "rounds": rounds, "duration_s": duration,
            "model_seconds": round(lm_s, 1),
            "processes": processes, "table_whole_ms": lm.whole, "table_parts_ms": lm.base_raw,
            "probe_spread": lm.spread, "rows": rows}


def summarise(res: dict) -> list[str]:
    how = "from the cache" if res["model_cached"] else "measured in {:.0f} s".format(res["model_seconds"])
    lines = [f"### {res['backend']} {res.get('precision', 'fp32')} (threads {res['threads']}; "
             f"latency model {how}, "
             f"probe spread {res['probe_spread']:.1%})", "",
             "| method | schedules | median abs error | worst abs error | mean error | median raw error | "
             "gap as a share: median / worst / mean | median spread |",
             "|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in res["rows"]:
        by.setdefault(r["method"], []).append(r)
    by["all"] = res["rows"]
    for m, rows in by.items():
        errs = sorted(abs(r["error"]) for r in rows)
        raw = statistics.median(abs(r["raw_error"]) for r in rows)
        share = sorted(abs(r["share_error"]) for r in rows)
        lines.append(f"| {m} | {len(rows)} | {statistics.median(errs):.1%} | {errs[-1]:.1%} | "
                     f"{statistics.mean(r['error'] for r in rows):+.1%} | {raw:.1%} | "
                     f"{statistics.median(share):.1%} / {share[-1]:.1%} / "
                     f"{statistics.mean(r['share_error'] for r in rows):+.1%} | "
                     f"{statistics.median(r['spread'] for r in rows):.1%} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--backends", default="ort,torch")
    ap.add_argument("--schedules", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--rounds", type=int, default=9, help="rounds of the side-by-side timing of each group")
    ap.add_argument("--duration", type=float, default=0.5, help="seconds of calls per graph and round")
    ap.add_argument("--processes", type=int, default=3, help="fresh processes the rounds are split over")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency_model"))
    a = ap.parse_args()
    results = [run_backend(a.model, b, a.schedules, a.threads, a.seed, a.cache_dir, a.precision, a.rounds,
                           a.duration, a.processes) for b in a.backends.split(",")]
    md = [f"# Latency model: predicted vs measured whole-model latency, {a.model}, batch 1", "",
          f"Each schedule timed side by side with the unreduced model (round-robin, {a.rounds} "
          f"rounds of {a.duration:g} s per graph over {a.processes} fresh processes; measured: the median "
          "over rounds of the ratio to the unreduced model in the round); predicted = the latency model "
          "anchored on that unreduced time. Random weights.", ""]
    for res in results:
        md += summarise(res)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
