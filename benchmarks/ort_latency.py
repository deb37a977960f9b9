"""ONNX Runtime (CPU) latency of ToMe-reduced vs unreduced ViT graphs exported by `tomectl export`.

Random weights (speed only). Every graph passes the export's parity check first. Each latency is
measured in its own fresh subprocess holding a single session, and the configurations are run
interleaved, round after round, so slow drift of a shared machine hits all of them alike; the
figure reported per configuration is the median over rounds of each run's median latency.

    .venv/bin/python benchmarks/ort_latency.py                       # DeiT-S, r = 8 13 16, batch 1 and 8
    .venv/bin/python benchmarks/ort_latency.py --r 13 --batch 1 --rounds 5 --formulations

Columns: speedup = unreduced latency / reduced latency; GMACs x = unreduced / reduced GMACs (the
speedup the FLOPs count promises); speedup / GMACs x >= 1 means the graph delivers at least what
the FLOPs promise. `--formulations` also times the onehot merge graph against the scatter one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def time_session(path: str, batch: int, threads: int, iters: int, warmup: int) -> dict:
    """Child process: one session, `warmup` runs, then `iters` timed runs."""
    import numpy as np

    from tomectl.export.onnx import ort_session

    session = ort_session(path, threads)
    inp = session.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else batch for d in inp.shape], dtype=np.float32
    )
    for _ in range(warmup):
        session.run(None, {inp.name: x})
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        session.run(None, {inp.name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[len(times) // 10],
        "p90_ms": times[(9 * len(times)) // 10],
    }


def export_all(
    model: str, rs: list[int], batches: list[int], formulations: bool, workdir: Path
) -> list[dict]:
    import torch

    from tomectl.adapters import vit
    from tomectl.build import build
    from tomectl.export.onnx import export_onnx
    from tomectl.models import preprocessing
    from tomectl.recipe import Recipe
    from tomectl.schedule import Schedule

    configs = [(0, "scatter")] + [(r, "scatter") for r in rs]
    if formulations:
        configs += [(r, "onehot") for r in rs]
    items = []
    for r, form in configs:
        built = build(Recipe(model, Schedule(r=r)), random_weights=True)
        m = built.model
        vit.install(m, dataclasses.replace(m.tomectl_plan, formulation=form))
        size = preprocessing(m)["input_size"]
        gmacs = built.macs().gmacs
        for b in batches:
            path = workdir / f"r{r}-{form}-b{b}.onnx"
            check = torch.randn(max(b, 4), *size, generator=torch.Generator().manual_seed(0))
            t0 = time.perf_counter()
            res = export_onnx(m, path, batch=b, input_size=size, check_inputs=check)
            print(
                f"  exported r={r:<2} {form:<7} batch {b}: "
                f"{res.nodes_simplified if res.simplified else res.nodes} nodes, "
                f"parity {res.max_abs_diff:.1e}, {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            items.append({"r": r, "formulation": form, "batch": b, "gmacs": gmacs, "path": str(path)})
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--r", type=int, nargs="+", default=[8, 13, 16])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formulations", action="store_true", help="also time the onehot merge graphs")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--time", help=argparse.SUPPRESS)  # child mode: time one graph
    args = ap.parse_args()

    if args.time:
        print(json.dumps(time_session(args.time, args.batch[0], args.threads, args.iters, args.warmup)))
        return

    with tempfile.TemporaryDirectory(prefix="ort-latency-") as td:
        print(f"exporting {args.model} (random weights)...", file=sys.stderr, flush=True)
        items = export_all(args.model, args.r, args.batch, args.formulations, Path(td))
        runs: dict[int, list[float]] = {i: [] for i in range(len(items))}
        for rnd in range(args.rounds):
            for i, it in enumerate(items):
                cmd = [
                    sys.executable,
                    __file__,
                    "--time",
                    it["path"],
                    "--batch",
                    str(it["batch"]),
                    "--threads",
                    str(args.threads),
                    "--iters",
                    str(args.iters),
                    "--warmup",
                    str(args.warmup),
                ]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[i].append(json.loads(out.strip().splitlines()[-1])["median_ms"])
            print(f"  round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    for i, it in enumerate(items):
        it["ms"] = statistics.median(runs[i])
        it["ms_rounds"] = [round(v, 2) for v in runs[i]]
        del it["path"]
    base = {(it["batch"]): it for it in items if it["r"] == 0}
    scatter = {(it["r"], it["batch"]): it for it in items if it["formulation"] == "scatter"}
    print(
        f"\n{args.model}, onnxruntime CPU, {args.threads} thread(s), median of {args.rounds} rounds x "
        f"{args.iters} runs, each in its own process"
    )
    print(
        f"{'config':<16}{'batch':>6}{'ms':>10}{'img/s':>9}{'speedup':>9}{'GMACs x':>9}{'speedup/GMACs x':>17}"
    )
    for it in items:
        b = base[it["batch"]]
        it["speedup"] = b["ms"] / it["ms"]
        it["gmacs_x"] = b["gmacs"] / it["gmacs"]
        it["speedup_over_gmacs_x"] = it["speedup"] / it["gmacs_x"]
        name = "unreduced" if it["r"] == 0 else f"r={it['r']} {it['formulation']}"
        print(
            f"{name:<16}{it['batch']:>6}{it['ms']:>10.2f}{1e3 * it['batch'] / it['ms']:>9.1f}"
            f"{it['speedup']:>8.2f}x{it['gmacs_x']:>8.2f}x{it['speedup_over_gmacs_x']:>17.2f}"
        )
    if args.formulations:
        print("\nonehot / scatter time (same r, same batch):")
        for it in items:
            if it["formulation"] == "onehot":
                ref = scatter[(it["r"], it["batch"])]
                print(f"  r={it['r']:<3} batch {it['batch']}: {it['ms'] / ref['ms']:.2f}x")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "threads": args.threads,
                    "rounds": args.rounds,
                    "iters": args.iters,
                    "results": items,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
