"""Every reduction method at matched GMACs on DeiT-Tiny (shared real weights), 1,300 shared val images.

For each method and each target (90, 75, 60, 50 % of the unreduced GMACs) the schedule is chosen
from the method's own schedule family by the analytic FLOPs count:

- tome, tofu: ``keep`` schedules (the same count, +-1, removed at every block: ToMe's constant r
  at a one-token resolution), and ToMe's decreasing ramp (``r``, inflect -1) that reaches lower;
- evit, bat: the papers' per-stage keep rate rho at blocks 3, 6, 9 (``k = ceil(rho * n)`` tokens
  kept of the n entering a stage, plus the fused / cluster tokens), as a ``per_layer`` list.

ToMe, the baseline, takes the cheapest schedule at or *above* the target; the others the costliest
at or *below* it, so a method that beats ToMe does so at the same or fewer GMACs. Options follow
what was tuned on 256 shared *training* images (never these val images): EViT without
proportional attention (its fused token is not a set of similar tokens), everything else with it.

Reported: GMACs, top-1, agreement with the unreduced model (Wilson 95 % interval), mean KL, and
ONNX Runtime CPU latency at batch 1 of the exported graph (export parity checked by
`tomectl.export.onnx.export_onnx` on 8 val images whose decisions are not on a knife edge), timed
round-robin against the unreduced graph in the same run (ratios are what to compare). Writes
``<out>.md``, ``<out>.json`` and ``<out>.png``.

With ``--calibrated``, each method also gets the schedule `tomectl calibrate` picks for 60 % of the
GMACs on ``--calib-images`` shared *training* images (its own per-layer search), scored here on the
val images; the goal line then compares every other method with every ToMe row (default and
calibrated) at the same or more GMACs.

    .venv/bin/python benchmarks/methods.py [--limit N] [--no-latency] [--calibrated]
        [--out benchmarks/results/methods]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import tomectl
from tomectl import data, models
from tomectl.adapters import vit
from tomectl.artifact import atomic_file
from tomectl.errors import UserError
from tomectl.flops import analytic_macs
from tomectl.metrics import compare
from tomectl.reduce import get_method
from tomectl.schedule import Schedule, resolve

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = "deit_tiny_patch16_224"
TARGETS = (0.90, 0.75, 0.60, 0.50)
METHODS = {  # method -> (options, prop_attn)
    "tome": ({}, True),
    "tofu": ({}, True),
    "evit": ({}, False),
    "bat": ({}, True),
}
GOAL_TARGET = 0.60


def stage_schedule(rho: float, stages, n_layers: int, n_free: int) -> list[int]:
    """EViT / BAT: keep ceil(rho * n) of the n unprotected tokens entering each stage, +1 fused token."""
    out = [0] * n_layers
    for layer in stages:
        if n_free < 3:  # nothing left to fuse
            break
        k = min(max(1, math.ceil(rho * n_free)), n_free - 2)
        out[layer] = n_free - k - 1
        n_free = k + 1
    return out


def candidates(method: str, model) -> list[list[int]]:
    """Every schedule of the method's family on this model (deduplicated)."""
    m = get_method(method, METHODS[method][0])
    n_layers, n_tokens, p = len(model.blocks), vit.num_tokens(model), vit.protected_tokens(model)
    seen, out = set(), []
    if m.layers(n_layers) is None:
        schedules = [Schedule(keep=kept / (n_tokens - p)) for kept in range(1, n_tokens - p + 1)]
        schedules += [Schedule(r=r, inflect=-1.0) for r in range(1, 40)]  # ToMe's decreasing ramp
        for schedule in schedules:
            try:
                removed = resolve(schedule, n_layers, n_tokens, p, m.capacity)
            except UserError:
                continue
            if tuple(removed) not in seen:
                seen.add(tuple(removed))
                out.append(removed)
    else:
        for i in range(1, 1000):
            removed = stage_schedule(i / 1000, m.layers(n_layers), n_layers, n_tokens - p)
            if tuple(removed) not in seen:
                seen.add(tuple(removed))
                out.append(removed)
    return out


def pick(method: str, model, target: float, base: int) -> tuple[list[int], float]:
    m = get_method(method, METHODS[method][0])
    dims = vit.dims(model)
    priced = [(analytic_macs(dims, r, m).total / base, r) for r in candidates(method, model)]
    if method == "tome":  # the baseline: cheapest at or above the target
        ok = [c for c in priced if c[0] >= target]
        ratio, removed = min(ok, key=lambda c: c[0])
    else:  # the others: costliest at or below the target (else their cheapest)
        ok = [c for c in priced if c[0] <= target]
        ratio, removed = max(ok, key=lambda c: c[0]) if ok else min(priced, key=lambda c: c[0])
    return removed, ratio


def load_val(preproc: dict, limit) -> tuple[torch.Tensor, torch.Tensor]:
    samples = data.scan(SHARED / "data" / "imagenet-val-1300", limit=limit)
    xs, ys = [], []
    for batch in data.loader(samples, preproc, resize="squash", batch_size=100, workers=1):
        xs.append(batch.images)
        ys.append(batch.labels)
    return torch.cat(xs), torch.cat(ys)


def logits(model, x: torch.Tensor, batch: int = 50) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def stable_images(model, x: torch.Tensor, n: int = 8, eps: float = 1e-6) -> torch.Tensor:
    """The first `n` images whose output moves by < 1e-4 under tiny input noise (no near-tie in any
    token decision: the only inputs on which a parity check between two runtimes is meaningful)."""
    g = torch.Generator().manual_seed(0)
    keep = []
    with torch.inference_mode():
        for i in range(len(x)):
            xi = x[i:i + 1]
            ref = model(xi)
            if all((model(xi + eps * torch.randn(xi.shape, generator=g)) - ref).abs().max() < 1e-4
                   for _ in range(3)):
                keep.append(i)
            if len(keep) == n:
                break
    return x[keep]


def time_sessions(paths: dict[str, str], rounds: int, iters: int) -> dict[str, float]:
    """Median ms at batch 1 per graph, timed round-robin (every round times every graph)."""
    import numpy as np

    from tomectl.export.onnx import ort_session

    sessions = {k: ort_session(p, 1) for k, p in paths.items()}
    feeds = {}
    for k, s in sessions.items():
        inp = s.get_inputs()[0]
        feeds[k] = {inp.name: np.random.default_rng(0).standard_normal([1, *inp.shape[1:]], dtype=np.float32)}
        for _ in range(3):
            s.run(None, feeds[k])
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(iters):
                t0 = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def render(rows: list[dict], base: dict, latency: bool) -> str:
    lines = [
        f"DeiT-Tiny (shared weights), {base['n']} shared val images, squash resize. Unreduced: "
        f"{base['gmacs']:.3f} GMACs, top-1 {base['top1']:.1%}"
        + (f", ORT CPU batch 1 {base['ms']:.2f} ms" if latency and base.get("ms") else "") + ".",
        "",
        "| target | method | GMACs | % of unreduced | top-1 | agreement [95% CI] | KL "
        "| ORT ms (x unreduced) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = (f"{r['ms']:.2f} ({r['ms'] / base['ms']:.2f}x)" if r.get("ms") else r.get("latency_note", "-"))
        lo, hi = r["agreement_ci95"]
        lines.append(
            f"| {r['target']:.0%} | {r['method']} | {r['gmacs']:.3f} | {r['ratio']:.1%} | {r['top1']:.1%} | "
            f"{r['agreement']:.1%} [{lo:.1%}, {hi:.1%}] | {r['kl']:.4f} | {ms} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["ratio"])
        xs = [r["ratio"] * 100 for r in rs]
        axes[0].plot(xs, [r["agreement"] * 100 for r in rs], marker="o", label=method)
        axes[1].plot(xs, [r["kl"] for r in rs], marker="o", label=method)
    for r in rows:
        if r["method"].endswith("(calibrated)"):
            axes[0].plot([r["ratio"] * 100], [r["agreement"] * 100], marker="*", ms=12, ls="",
                         label=r["method"])
            axes[1].plot([r["ratio"] * 100], [r["kl"]], marker="*", ms=12, ls="", label=r["method"])
    axes[0].set_ylabel("agreement with unreduced (%)")
    axes[1].set_ylabel("mean KL(unreduced || reduced)")
    for ax in axes:
        ax.set_xlabel("GMACs (% of unreduced)")
        ax.grid(alpha=0.3)
        ax.invert_xaxis()
        ax.legend()
    fig.suptitle("DeiT-Tiny, 1,300 shared val images: methods at matched GMACs")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="fewer val images (a quick run)")
    ap.add_argument("--no-latency", action="store_true", help="skip ONNX export and ORT timing")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibrated", action="store_true",
                    help=f"also each method calibrated (tomectl calibrate) to {GOAL_TARGET:.0%} "
                         "on train images")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/methods")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = SHARED / "weights" / f"{MODEL}.safetensors"
    if not weights.is_file():
        print(f"needs the shared weights at {weights}", file=sys.stderr)
        return 2
    latency = not args.no_latency
    try:
        from tomectl.export.onnx import export_onnx
    except ImportError:
        latency, export_onnx = False, None

    model = models.create(MODEL, weights=weights).model
    x, y = load_val(models.preprocessing(model), args.limit)
    print(f"{len(x)} images loaded", flush=True)
    tomectl.apply(model, r=0)
    base_macs = analytic_macs(vit.dims(model), [0] * len(model.blocks)).total
    ref = logits(model, x)
    base = {"n": len(x), "gmacs": base_macs / 1e9, "top1": (ref.argmax(-1) == y).float().mean().item()}

    workdir = Path(tempfile.mkdtemp(prefix="tomectl-methods-"))
    graphs: dict[str, str] = {}
    if latency:
        export_onnx(model, workdir / "base.onnx", batch=1, input_size=tuple(x.shape[1:]), check_inputs=x[:8])
        graphs["base"] = str(workdir / "base.onnx")

    rows = []
    for target in TARGETS:
        for method, (options, prop_attn) in METHODS.items():
            removed, ratio = pick(method, model, target, base_macs)
            tomectl.remove(model)
            tomectl.apply(model, method, per_layer=removed, options=options, prop_attn=prop_attn)
            t0 = time.perf_counter()
            out = logits(model, x)
            c = compare(ref, out, y)
            row = {"target": target, "method": method, "options": options, "prop_attn": prop_attn,
                   "removed_per_layer": removed, "ratio": ratio, "gmacs": ratio * base_macs / 1e9,
                   "top1": c.top1, "agreement": c.agreement, "agreement_ci95": list(c.agreement_ci95),
                   "kl": c.kl, "flips_right_to_wrong": c.flips_right_to_wrong,
                   "flips_wrong_to_right": c.flips_wrong_to_right,
                   "eval_s": round(time.perf_counter() - t0, 1)}
            if latency:
                key = f"{method}@{target}"
                try:
                    check = stable_images(model, x[:64])
                    res = export_onnx(model, workdir / f"{method}_{int(target * 100)}.onnx", batch=1,
                                      input_size=tuple(x.shape[1:]), check_inputs=check)
                    graphs[key] = res.path
                    row["parity_max_abs_diff"] = res.max_abs_diff
                except UserError as e:
                    row["latency_note"] = f"export failed: {str(e)[:80]}"
            rows.append(row)
            print(f"{target:.0%} {method:5s} {ratio:.3f} agree {c.agreement:.3f} kl {c.kl:.4f} "
                  f"top1 {c.top1:.3f} ({row['eval_s']}s)", flush=True)

    if latency and len(graphs) > 1:
        print("timing ORT sessions...", flush=True)
        ms = time_sessions(graphs, args.rounds, args.iters)
        base["ms"] = ms["base"]
        for row in rows:
            key = f"{row['method']}@{row['target']}"
            if key in ms:
                row["ms"] = ms[key]

    if args.calibrated:  # each method's schedule calibrated on *training* images, scored on val
        from tomectl.calibrate import Budget, calibrate

        for method, (options, prop_attn) in METHODS.items():
            if options or not prop_attn:
                continue  # calibrate builds methods with their defaults
            t0 = time.perf_counter()
            cal = calibrate(MODEL, Budget("flops", GOAL_TARGET),
                            images=SHARED / "data" / "imagenet-train-1000",
                            n_images=args.calib_images, methods=[method], weights=weights)
            removed = list(cal.chosen.removed)
            tomectl.remove(model)
            tomectl.apply(model, method, per_layer=removed, options=options, prop_attn=prop_attn)
            c = compare(ref, logits(model, x), y)
            ratio = analytic_macs(vit.dims(model), removed, get_method(method, options)).total / base_macs
            rows.append({"target": GOAL_TARGET, "method": f"{method} (calibrated)", "options": options,
                         "prop_attn": prop_attn, "removed_per_layer": removed, "ratio": ratio,
                         "gmacs": ratio * base_macs / 1e9, "top1": c.top1, "agreement": c.agreement,
                         "agreement_ci95": list(c.agreement_ci95), "kl": c.kl,
                         "flips_right_to_wrong": c.flips_right_to_wrong,
                         "flips_wrong_to_right": c.flips_wrong_to_right,
                         "calibrate_s": round(time.perf_counter() - t0, 1),
                         "latency_note": "not timed"})
            print(f"{GOAL_TARGET:.0%} {method} (calibrated on {args.calib_images} train images) {removed} "
                  f"{ratio:.3f} agree {c.agreement:.3f} kl {c.kl:.4f}", flush=True)

    goal_rows = [r for r in rows if r["target"] == GOAL_TARGET]
    tome_rows = [r for r in goal_rows if r["method"].startswith("tome")]
    others = [r for r in goal_rows if not r["method"].startswith("tome")]

    def beats_tome(r: dict) -> bool:  # better than every ToMe row at the same or more GMACs
        rivals = [t for t in tome_rows if t["gmacs"] >= r["gmacs"]]
        return bool(rivals) and all(r["agreement"] > t["agreement"] for t in rivals)

    winners = [r["method"] for r in others if beats_tome(r)]
    tome_desc = "; ".join(f"{t['method']} {t['agreement']:.1%} at {t['ratio']:.1%}" for t in tome_rows)
    goal = (f"Goal at {GOAL_TARGET:.0%} GMACs: ToMe agrees on {tome_desc}; better than every ToMe row at "
            f"the same or more GMACs: {', '.join(winners) or 'none'}.")

    out = Path(args.out)
    text = render(rows, base, latency) + "\n" + goal + "\n"
    print(text)
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    with atomic_file(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"model": MODEL, "base": base, "rows": rows, "goal": goal,
                                   "versions": _versions()}, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {out}.md, .json, .png")
    return 0


def _versions() -> dict:
    from tomectl.provenance import versions

    return versions()


if __name__ == "__main__":
    sys.exit(main())
