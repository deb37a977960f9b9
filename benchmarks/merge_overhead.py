"""How much of a block's time the merge step itself takes (matching + merging), eager PyTorch CPU.

Goal (issue 4): under 10 % of a block's time at r = 13 (DeiT-S).

The reduced model runs as usual; the adapter's per-block function, the method's `decide`
(matching) and `apply_decision` (merging) are wrapped with timers. Per forward pass:

    share = sum over blocks (decide + apply_decision) / sum over blocks (whole block)

reported per batch size and thread count, with the median over the timed passes, and per layer.
Beside it, in the same run and interleaved pass by pass with the reduced model, the unreduced
model's mean block time, so the reduced block (merge included) can be compared with the block it
replaces. With one thread the wall time of each part is exactly its compute (no asynchronous
work); with more, the merge's small operators gain less from the threads than the block's
matmuls, so the share is larger: both are printed by default.

    .venv/bin/python benchmarks/merge_overhead.py [--model deit_small_patch16_224] [--r 13]
        [--batch 1,8] [--iters 20] [--threads 1,2] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch

from tomectl.adapters import vit
from tomectl.build import build
from tomectl.recipe import Recipe
from tomectl.schedule import Schedule

GOAL = 0.10


class Timers:
    def __init__(self) -> None:
        self.t: dict[str, list[float]] = defaultdict(list)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.t[name].append(time.perf_counter() - t0)
            return out

        return timed


def measure(model_name: str, r: int, batch: int, iters: int, warmup: int) -> dict:
    built = build(Recipe(model_name, Schedule.make(r=r)), random_weights=True)
    model = built.model
    plain = build(Recipe(model_name, Schedule.make(r=0)), random_weights=True).model
    plain_block: list[float] = []
    timers = Timers()
    method = model._tomectl_method
    orig = (vit._block_forward, vit.apply_decision, method.decide)
    vit._block_forward = timers.wrap("block", vit._block_forward)
    vit.apply_decision = timers.wrap("merge", vit.apply_decision)
    method.decide = timers.wrap("match", method.decide)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    per_pass, block_passes, merge_passes = [], [], []
    n_layers = len(model.blocks)
    layer_sum = defaultdict(lambda: [0.0, 0.0])
    try:
        with torch.inference_mode():
            for i in range(warmup + iters):
                timers.t.clear()
                model(x)
                if i < warmup:
                    continue
                reduced = dict(timers.t)
                timers.t.clear()
                plain(x)  # unreduced, same blocks timed by the same wrapper
                plain_block.append(sum(timers.t["block"]) / len(timers.t["block"]))
                timers.t.clear()
                timers.t.update(reduced)
                block, match, merge = (timers.t[k] for k in ("block", "match", "merge"))
                per_pass.append((sum(match) + sum(merge)) / sum(block))
                block_passes.append(list(block))
                merge_passes.append(sum(match) + sum(merge))
                for layer in range(n_layers):
                    layer_sum[layer][0] += match[layer] + merge[layer] if layer < len(match) else 0.0
                    layer_sum[layer][1] += block[layer]
    finally:
        vit._block_forward, vit.apply_decision = orig[0], orig[1]
        del method.decide
    return {
        "share": statistics.median(per_pass),
        "block_ms": 1e3 * statistics.median(sum(b for b in p) / n_layers for p in block_passes),
        "merge_ms": 1e3 * statistics.median(m for m in merge_passes) / n_layers,
        "plain_block_ms": 1e3 * statistics.median(plain_block),
        "share_min": min(per_pass),
        "share_max": max(per_pass),
        "layers": [s[0] / s[1] for s in (layer_sum[i] for i in range(n_layers))],
    }


def profile(model_name: str, r: int, batch: int) -> None:
    """Operator-level breakdown of the merge step (torch.profiler), for when the goal is missed."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as tprofile

    built = build(Recipe(model_name, Schedule.make(r=r)), random_weights=True)
    model = built.model
    method = model._tomectl_method
    orig_apply, orig_decide = vit.apply_decision, method.decide

    def decide(*a, **k):
        with record_function("tomectl.match"):
            return orig_decide(*a, **k)

    def apply(*a, **k):
        with record_function("tomectl.merge"):
            return orig_apply(*a, **k)

    method.decide, vit.apply_decision = decide, apply
    x = torch.randn(batch, 3, 224, 224)
    try:
        with torch.inference_mode():
            model(x)
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    model(x)
    finally:
        vit.apply_decision = orig_apply
        del method.decide
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--r", type=int, default=13)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler operator table")
    args = ap.parse_args()
    ok = True
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f}", flush=True)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in (int(b) for b in args.batch.split(",")):
            res = measure(args.model, args.r, batch, args.iters, args.warmup)
            verdict = "PASS" if res["share"] < GOAL else "FAIL"
            ok &= res["share"] < GOAL
            print(f"{args.model} r={args.r} batch {batch}, {threads} thread(s): merge step = "
                  f"{res['share']:.1%} of block time "
                  f"(min {res['share_min']:.1%}, max {res['share_max']:.1%})  "
                  f"goal < {GOAL:.0%}: {verdict}")
            print(f"  mean block {res['block_ms']:.2f} ms (merge step {res['merge_ms']:.2f} ms of it) "
                  f"vs unreduced block {res['plain_block_ms']:.2f} ms in the same passes")
            print("  per layer: " + " ".join(f"{s:.1%}" for s in res["layers"]), flush=True)
            if args.profile:
                profile(args.model, args.r, batch)
    print(f"load average (1 min) at end: {os.getloadavg()[0]:.2f}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
