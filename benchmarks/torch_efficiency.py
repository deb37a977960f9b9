"""Efficiency of ToMe on CPU: does the FLOPs saving turn into time saved?

Goals (issue 4), DeiT-S, r = 13 against r = 0 in the same run:
- eager PyTorch, batch 8: efficiency >= 0.9;
- onnxruntime CPU, batch 1 and batch 8: efficiency >= 1.0.

efficiency = speedup / (GMACs_r0 / GMACs_r13), speedup from median latencies. Every
configuration runs in its own process (tomectl.bench), and `--rounds` runs them round-robin so
that drift of a shared machine hits both rows alike; the samples of all rounds are pooled.

    .venv/bin/python benchmarks/torch_efficiency.py [--backend torch,ort] [--batch 1,8]
        [--threads 1] [--rounds 3] [--iters 10] [--report out/efficiency]
"""

from __future__ import annotations

import argparse

from tomectl import report
from tomectl.bench import run_bench

MODEL = "deit_small_patch16_224"
R = 13
GOALS = {("torch", 8): 0.9, ("ort", 1): 1.0, ("ort", 8): 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--r", type=int, default=R)
    ap.add_argument("--backend", default="torch,ort")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--report", default=None, help="also write report.json/md/png here")
    args = ap.parse_args()

    def progress(desc: str, done: int, total: int) -> None:
        print(f"[{done}/{total}] {desc}", flush=True)

    rep = run_bench(args.model, [args.r], args.backend.split(","), [int(b) for b in args.batch.split(",")],
                    warmup=args.warmup, iters=args.iters, threads=args.threads, random_weights=True,
                    rounds=args.rounds, progress=progress)
    doc = rep.to_dict()
    if args.report:
        report.write(doc, args.report)
    print(report.markdown(doc))
    ok = True
    for row in rep.rows:
        if row.baseline:
            continue
        goal = GOALS.get((row.backend, row.batch)) if (args.model, args.r) == (MODEL, R) else None
        if row.error:
            print(f"{row.backend} batch {row.batch}: ERROR {row.error}")
            ok = False
            continue
        base = rep.row(row.backend, row.batch, "r=0")
        verdict = ""
        if goal is not None:
            verdict = f"  goal >= {goal}: " + ("PASS" if row.efficiency >= goal else "FAIL")
        ok &= goal is None or row.efficiency >= goal
        print(f"{row.backend:6s} batch {row.batch}, {row.threads} thread(s): "
              f"p50 r=0 {base.latency.p50:.2f} ms, "
              f"r={args.r} {row.latency.p50:.2f} ms -> speedup {row.speedup:.3f}x "
              f"for {row.flops_ratio:.3f}x fewer "
              f"GMACs -> efficiency {row.efficiency:.3f}{verdict}   (spread (p90-p10)/p50: r=0 "
              f"{base.latency.spread:.0%}, r={args.r} {row.latency.spread:.0%})")
    load = doc["provenance"]["load_average"]
    print(f"load average (1 min) at start / end: {load['start']} / {load['end']} on {rep.rows[0].threads} "
          "thread(s); the bench itself adds about its thread count")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
