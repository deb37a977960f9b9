"""Reduced precision x token reduction: int8 (dynamic, static QDQ) and fp32 graphs, speed and agreement.

DeiT-Tiny with the shared real weights (agreement on all 1,300 shared val images, squash resize,
against the fp32 unreduced model in PyTorch) and DeiT-S with random weights (speed only),
onnxruntime CPU, batch 1 and 8, 1 and 2 threads:

    {fp32, int8 dynamic, int8 static (QDQ, per-channel, calibrated on 64 shared *train* images)}
  x {r = 0, 4, 8, 13, calibrated schedules (`tomectl calibrate` artifacts given with --calibrated,
       labelled by their budget, e.g. "cal 2x"; default one made with `--flops 0.7`)}
  (+ r = 2, 6, 10 for DeiT-Tiny at batch 1, to trace the frontier)

Every graph is what `tomectl export --onnx F --precision int8 [--int8-mode static]` writes: the
fp32 graph from `Reduced.export_onnx` (parity-checked against PyTorch), converted by
`tomectl.export.precision.convert`, which quantizes only the backbone's linear layers and keeps
the reduction's decision nodes float. Beside them, the thing users must not do: onnxruntime's
generic `quantize_static` (QDQ, per-channel, same 64 calibration images, its default MinMax
calibration, every op type it supports) run over the whole fp32 graph.

Latency: each round, the graphs of one (model, batch, threads) are timed side by side in one fresh
process, in a shuffled order (`tomectl.bench.measure_side_by_side`: onnxruntime sessions with the
options of `tomectl.runtime.ort_session`, the warm-up bench and calibrate use); a speedup is the
fp32 unreduced graph's median latency (same model, batch, threads and round) over the
configuration's, and the table gives the median over rounds with the min-max over rounds.
Accuracy is measured on the batch-1 graphs (the ones the goal is about).

    .venv/bin/python benchmarks/precision.py [--rounds 5] [--calibrated DIR [DIR ...]] [--workdir /tmp/x]

Results: benchmarks/results/precision.{md,json,png}; the table is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
VAL = SHARED / "data" / "imagenet-val-1300"
TRAIN = SHARED / "data" / "imagenet-train-1000"
TINY, SMALL = "deit_tiny_patch16_224", "deit_small_patch16_224"
PRECISIONS = ("fp32", "int8-dyn", "int8-static")
N_CALIB, N_CHECK = 64, 256  # as `tomectl export --precision int8 --int8-mode static` picks them


# --- parent: graphs ----------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    from tomectl.models import sha256_of

    return sha256_of(path)


def is_calibrated(label: str) -> bool:
    return label.startswith("cal ")


def calibration_doc(cal_dir: Path) -> dict:
    """The artifact's calibration.json ({} where it has none)."""
    cal_json = Path(cal_dir) / "calibration.json"
    return json.loads(cal_json.read_text()) if cal_json.is_file() else {}


def calibrated_label(cal_dir: Path, doc: dict) -> str:
    """"cal 2x", "cal 0.7F", ...: a calibrated schedule named by its artifact's budget (`doc`: its
    calibration.json)."""
    b = doc.get("budget", {})
    unit = {"speedup": "x", "flops": "F", "gmacs": "G", "latency_ms": "ms"}.get(b.get("kind"), "?")
    return f"cal {b.get('value', '?'):g}{unit}" if "value" in b else f"cal {Path(cal_dir).name}"


def schedules(cal_dirs: list[Path], args) -> tuple[dict, dict]:
    """(label -> recipe per model, label -> the calibrated artifacts' {dir, recipe, doc, per_layer}). A
    calibrated schedule: its artifact's method and per-layer removals (for DeiT-S the same removals,
    method and options on the DeiT-S model)."""
    import dataclasses

    from tomectl.artifact import read
    from tomectl.recipe import Recipe
    from tomectl.schedule import Schedule

    cals = {}
    for cal_dir in cal_dirs:
        cal, _ = read(cal_dir)
        doc = calibration_doc(cal_dir)
        cals[calibrated_label(cal_dir, doc)] = {"dir": cal_dir, "recipe": cal, "doc": doc,
                                                "per_layer": list(cal.resolved["removed_per_layer"])}
    out = {}
    for model in (TINY, SMALL):
        rs = [0, 4, 8, 13] if model == TINY else [r for r in args.small_r if r >= 0]
        d = {f"r={r}": Recipe(model, Schedule.make(r=r)) for r in rs}
        if model == TINY:
            for r in args.extra_r:
                d[f"r={r}"] = Recipe(model, Schedule.make(r=r))
        if model == SMALL and -1 not in args.small_r:
            out[model] = d
            continue
        for label, c in cals.items():
            d[label] = dataclasses.replace(c["recipe"], model=model,
                                           schedule=Schedule.make(per_layer=c["per_layer"]),
                                           weights=None, resolved={}, learned=None)
        out[model] = d
    return out, cals


def export_graphs(recipes: dict, workdir: Path, args) -> dict:
    """Every graph: {(model, label, precision, batch): {path, sha256, gmacs, gmacs_base, removed}}."""
    import onnx  # noqa: F401

    from tomectl import data, models
    from tomectl.bench import RANDOM_WEIGHTS_ATOL
    from tomectl.build import build
    from tomectl.export.precision import PrecisionOptions, convert
    from tomectl.reduced import Target

    index_path = workdir / "graphs.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    calib = {}
    for model, recs in recipes.items():
        real = model == TINY
        for label, recipe in recs.items():
            extra = label not in ("r=0", "r=4", "r=8", "r=13") and not is_calibrated(label)
            batches = args.tiny_batch if model == TINY else args.small_batch
            for batch in ([1] if extra else batches):
                keys = {p: f"{model}|{label}|{p}|{batch}" for p in PRECISIONS}
                if all(k in index and Path(index[k]["path"]).is_file() for k in keys.values()):
                    continue
                t0 = time.perf_counter()
                reduced = build(recipe, weights=WEIGHTS if real else None, random_weights=not real,
                                target=Target("ort", batch=batch))
                if model not in calib:  # the 64 images `tomectl export --int8-mode static` calibrates on
                    pre = models.preprocessing(reduced.model)
                    calib[model] = data.load_images(TRAIN, pre, N_CALIB + N_CHECK, resize="timm")[:N_CALIB]
                stem = workdir / f"{model.split('_')[1]}_{label.replace('=', '').replace(' ', '')}_b{batch}"
                fp32 = Path(f"{stem}_fp32.onnx")
                res = reduced.export_onnx(fp32, atol=None if real else RANDOM_WEIGHTS_ATOL)
                common = {"gmacs": reduced.macs_for(Target("ort")).gmacs, "gmacs_base": reduced.base_macs().gmacs,
                          "removed": reduced.removed, "method": reduced.plan.method}
                index[keys["fp32"]] = {"path": str(fp32), "sha256": res.sha256, "parity": res.max_abs_diff,
                                       **common}
                for p, mode in (("int8-dyn", "dynamic"), ("int8-static", "static")):
                    out = Path(f"{stem}_{p}.onnx")
                    info = convert(fp32, out, PrecisionOptions("int8", int8_mode=mode),
                                   calib[model] if mode == "static" else None)
                    index[keys[p]] = {"path": str(out), "sha256": sha256(out), "conversion": info, **common}
                index_path.write_text(json.dumps(index, indent=1))
                log(f"exported {model} {label} batch {batch} (fp32 + 2 int8) in {time.perf_counter() - t0:.0f} s")
                del reduced
    # the generic quantizer, as a user would run it, over the whole fp32 batch-1 DeiT-Tiny graphs
    from onnxruntime import quantization as q

    from tomectl.export.precision import _Reader

    for label in args.generic_r:
        key = f"{TINY}|{label}|generic-static|1"
        if key in index and Path(index[key]["path"]).is_file():
            continue
        src = Path(index[f"{TINY}|{label}|fp32|1"]["path"])
        out = src.with_name(src.name.replace("_fp32", "_generic"))
        if TINY not in calib:
            from tomectl import models as m

            pre = m.preprocessing(m.create(TINY, random_weights=True).model)
            calib[TINY] = data.load_images(TRAIN, pre, N_CALIB + N_CHECK, resize="timm")[:N_CALIB]
        q.quantize_static(str(src), str(out), _Reader(calib[TINY], _input_name(src), 1),
                          quant_format=q.QuantFormat.QDQ, per_channel=True)
        index[key] = {**index[f"{TINY}|{label}|fp32|1"], "path": str(out), "sha256": sha256(out),
                      "conversion": {"tool": "onnxruntime.quantization.quantize_static", "quant_format": "QDQ",
                                     "per_channel": True, "calibrate_method": "MinMax (default)",
                                     "op_types": "all (default)", "calib_images": N_CALIB}}
        index_path.write_text(json.dumps(index, indent=1))
        log(f"generic quantize_static over {label}")
    return index


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


# --- parent: accuracy --------------------------------------------------------------------------


def evaluate(index: dict, workdir: Path, args) -> dict:
    """Agreement etc. of every DeiT-Tiny batch-1 graph on the 1,300 val images."""
    import numpy as np
    import torch

    from tomectl import data, models
    from tomectl.build import build
    from tomectl.export.precision import check_precision
    from tomectl.metrics import compare
    from tomectl.recipe import Recipe
    from tomectl.runtime import ort_session, predict, run_session
    from tomectl.schedule import Schedule

    cache_path = workdir / "eval.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    todo = [k for k in index if k.startswith(TINY) and k.endswith("|1")
            and cache.get(k, {}).get("sha256") != index[k]["sha256"]]
    logits_dir = workdir / "logits"
    logits_dir.mkdir(exist_ok=True)
    if not todo and (logits_dir / "ref.npy").is_file():
        return cache
    base = build(Recipe(TINY, Schedule.make(r=0)), weights=WEIGHTS)
    pre = models.preprocessing(base.model)
    samples = data.scan(VAL, limit=args.limit)
    xs, ys = [], []
    for b in data.loader(samples, pre, "squash", batch_size=100):
        xs.append(b.images)
        ys.append(b.labels)
    x, y = torch.cat(xs), torch.cat(ys)
    ref_path = logits_dir / "ref.npy"
    if ref_path.is_file() and np.load(ref_path).shape[0] == len(x):
        ref = torch.from_numpy(np.load(ref_path))
    else:
        with base.off():
            ref = predict(base.model, x, batch_size=50)
        np.save(ref_path, ref.numpy())
    log(f"val images: {len(x)}; reference top-1 {(ref.argmax(-1) == y).float().mean():.1%}")
    logits = {}
    for k in sorted(index, key=lambda k: ("fp32" not in k, k)):
        if not (k.startswith(TINY) and k.endswith("|1")):
            continue
        lp = logits_dir / (index[k]["sha256"][:16] + ".npy")
        if lp.is_file():
            logits[k] = np.load(lp)
            if k not in todo:
                continue
        else:
            t0 = time.perf_counter()
            logits[k] = run_session(ort_session(index[k]["path"], threads=2), x, 1)
            np.save(lp, logits[k])
            log(f"evaluated {k} in {time.perf_counter() - t0:.0f} s")
        c = compare(ref, torch.from_numpy(logits[k]), y)
        _, label, prec, _ = k.split("|")
        fp32k = f"{TINY}|{label}|fp32|1"
        row = {"sha256": index[k]["sha256"], **c.to_dict()}
        if prec != "fp32":
            if fp32k not in logits:
                logits[fp32k] = np.load(logits_dir / (index[fp32k]["sha256"][:16] + ".npy"))
            pc = check_precision(ref.numpy(), logits[fp32k], logits[k], "int8")
            row["vs_fp32_graph"] = pc.to_dict()
        cache[k] = row
        cache_path.write_text(json.dumps(cache, indent=1))
    return cache


# --- parent: timing ----------------------------------------------------------------------------


def timing_configs(index: dict, args) -> list[tuple]:
    out = []
    for k in index:
        model, label, prec, batch = k.split("|")
        if prec == "generic-static" and label != "r=13":
            continue
        for t in args.threads:
            out.append((k, int(batch), t))
    return out


def time_all(index: dict, workdir: Path, args) -> dict:
    """Each round: per (model, batch, threads), every graph of that group timed in one fresh process,
    side by side in a shuffled order (`tomectl.bench.measure_side_by_side`: the warm-up until the
    latency settles that bench and calibrate use, then `duration` seconds of calls per graph), so a
    round's ratios compare graphs timed seconds apart and process-level effects vary across rounds."""
    from tomectl.bench import measure_side_by_side
    from tomectl.recipe import Recipe
    from tomectl.schedule import Schedule

    groups: dict = {}
    for k, batch, t in timing_configs(index, args):
        groups.setdefault((k.split("|")[0], batch, t), []).append(k)
    rng = random.Random(0)
    runs: dict = {f"{k}|t{t}": [] for (_, _, t), keys in groups.items() for k in keys}
    t_start = time.perf_counter()
    loads = [os.getloadavg()[0]]
    # a recipe per model only tells the worker the model's input size: onnxruntime runs the given graph
    shapes = {model: Recipe(model, Schedule.make(r=0)) for model, _, _ in groups}
    for rnd in range(args.rounds):
        for (model, batch, t), keys in groups.items():
            order = keys[:]
            rng.shuffle(order)
            shape = shapes[model]
            stats = measure_side_by_side([(shape, Path(index[k]["path"])) for k in order], "ort", batch,
                                         threads=t, rounds=1, duration=args.duration * (2 if batch > 1 else 1))
            for k, st in zip(order, stats, strict=True):
                runs[f"{k}|t{t}"].append({"median_ms": st.p50, "p10_ms": st.p10, "p90_ms": st.p90, "n": st.n})
        loads.append(os.getloadavg()[0])
        log(f"round {rnd + 1}/{args.rounds} done ({len(runs)} configurations, "
            f"{time.perf_counter() - t_start:.0f} s so far, load {loads[-1]:.1f})")
    (workdir / "timing.json").write_text(json.dumps({"runs": runs, "loads": loads}, indent=1))
    return {"runs": runs, "loads": loads, "seconds": time.perf_counter() - t_start}


def speedups(runs: dict, rounds: int) -> dict:
    """key|tT -> {ms (median over rounds of each run's median), speedup (median over rounds of the
    per-round ratio to the fp32 unreduced graph of the same model, batch and threads), lo, hi}."""
    out = {}
    for key, rs in runs.items():
        model, label, prec, batch, t = key.split("|")
        base = runs[f"{model}|r=0|fp32|{batch}|{t}"]
        ratios = [b["median_ms"] / r["median_ms"] for b, r in zip(base, rs, strict=False)]
        out[key] = {"ms": statistics.median(r["median_ms"] for r in rs),
                    "ms_rounds": [round(r["median_ms"], 3) for r in rs],
                    "speedup": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios),
                    "ratios": [round(v, 4) for v in ratios]}
    return out


# --- report ------------------------------------------------------------------------------------


PREC_NAME = {"fp32": "fp32", "int8-dyn": "int8 dynamic", "int8-static": "int8 static QDQ",
             "generic-static": "generic quantize_static (whole graph)"}


def order_labels(labels) -> list[str]:
    def key(lab):
        return (1, lab) if is_calibrated(lab) else (0, int(lab.split("=")[1]))

    return sorted(set(labels), key=key)


def fmt_sp(s: dict | None) -> str:
    if s is None:
        return "-"
    return f"{s['speedup']:.2f}x [{s['lo']:.2f}-{s['hi']:.2f}]"


def frontier_points(index, evals, sp) -> list[dict]:
    pts = []
    for k, e in evals.items():
        sk = f"{k}|t1"
        if sk not in sp:
            continue
        _, label, prec, _ = k.split("|")
        pts.append({"label": label, "precision": prec, "agreement": e["agreement"],
                    "ci": e["agreement_ci95"], "speedup": sp[sk]["speedup"], "lo": sp[sk]["lo"],
                    "hi": sp[sk]["hi"], "gmacs": index[k]["gmacs"]})
    return pts


def pareto(pts: list[dict]) -> list[dict]:
    pts = sorted(pts, key=lambda p: (-p["speedup"], -p["agreement"]))
    out, best = [], -1.0
    for p in pts:
        if p["agreement"] > best:
            out.append(p)
            best = p["agreement"]
    return sorted(out, key=lambda p: p["speedup"])


def plot(pts: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    style = {"fp32": ("o", "tab:blue", "fp32 + reduction (reduction alone)"),
             "int8-dyn": ("s", "tab:green", "int8 dynamic + reduction (tomectl)"),
             "int8-static": ("^", "tab:orange", "int8 static QDQ + reduction (tomectl)"),
             "generic-static": ("X", "tab:red", "generic quantize_static over the whole graph")}
    for prec, (mk, col, name) in style.items():
        ps = sorted([p for p in pts if p["precision"] == prec], key=lambda p: p["speedup"])
        if not ps:
            continue
        ax.errorbar([p["speedup"] for p in ps], [100 * p["agreement"] for p in ps],
                    xerr=[[p["speedup"] - p["lo"] for p in ps], [p["hi"] - p["speedup"] for p in ps]],
                    yerr=[[100 * (p["agreement"] - p["ci"][0]) for p in ps],
                          [100 * (p["ci"][1] - p["agreement"]) for p in ps]],
                    fmt=mk + ("-" if prec != "generic-static" else ""), color=col, label=name, ms=6,
                    capsize=2, lw=1, alpha=0.9)
        for p in ps:
            ax.annotate(p["label"], (p["speedup"], 100 * p["agreement"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=col)
    front = pareto([p for p in pts if p["precision"] != "generic-static"])
    ax.plot([p["speedup"] for p in front], [100 * p["agreement"] for p in front], "k--", lw=0.8,
            label="tomectl frontier")
    for p, name in ((next((p for p in pts if p["precision"] == "int8-dyn" and p["label"] == "r=0"), None),
                     "int8 alone"),
                    (next((p for p in pts if p["precision"] == "fp32" and p["label"] == "r=13"), None),
                     "ToMe r=13 alone")):
        if p:
            ax.scatter([p["speedup"]], [100 * p["agreement"]], s=220, facecolors="none", edgecolors="k", lw=1.5)
            ax.annotate(name, (p["speedup"], 100 * p["agreement"]), textcoords="offset points",
                        xytext=(-10, -16), fontsize=8, weight="bold")
    for sx, ay in ((2.0, 97.0), (2.5, 93.0)):
        ax.plot([sx, sx, 4.0], [101, ay, ay], ":", color="gray", lw=1)
        ax.annotate(f"goal >= {sx}x at >= {ay:.0f} %", (sx, ay), textcoords="offset points", xytext=(3, -10),
                    fontsize=7, color="gray")
    good = [p for p in pts if p["precision"] != "generic-static"]
    ax.set_xlim(0.9, max(2.7, max(p["hi"] for p in good) + 0.1))
    ax.set_ylim(min(88, min(100 * p["agreement"] for p in good) - 1), 100.5)
    ax.set_xlabel("speedup vs fp32 unreduced (median over rounds; bars: min-max)")
    ax.set_ylabel("top-1 agreement with fp32 unreduced, % (bars: Wilson 95 %)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    generic = [p for p in pts if p["precision"] == "generic-static"]
    if generic:
        ax.annotate(f"generic quantize_static r=13: {100 * generic[0]['agreement']:.1f} % (off the chart)",
                    (0.99, 0.02), xycoords="axes fraction", ha="right", fontsize=7, color="tab:red")
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=1.0, help="seconds of calls per graph and round (x2 at batch 8)")
    ap.add_argument("--tiny-batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--small-batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--small-r", type=int, nargs="+", default=[0, 4, 8, 13, -1],
                    help="DeiT-S schedules (-1: the calibrated ones)")
    ap.add_argument("--generic-r", nargs="+", default=["r=13"], help="graphs the generic quantizer is run on")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--extra-r", type=int, nargs="*", default=[2, 6, 10],
                    help="more constant r for DeiT-Tiny at batch 1 (frontier tracing)")
    ap.add_argument("--calibrated", type=Path, nargs="+",
                    help="`tomectl calibrate` artifacts (default: one made here with --flops)")
    ap.add_argument("--flops", type=float, default=0.7, help="budget of the calibrated schedule")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tomectl-precision"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision")
    ap.add_argument("--limit", type=int, default=None, help="val images (default all)")
    ap.add_argument("--skip-timing", action="store_true", help="reuse WORKDIR/timing.json")
    args = ap.parse_args()
    if not (WEIGHTS.is_file() and VAL.is_dir() and TRAIN.is_dir()):
        print(f"skipped: needs {WEIGHTS}, {VAL} and {TRAIN}", file=sys.stderr)
        return 0
    t_all = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cal_dir = args.workdir / f"calibrated_{args.flops}"
    cal_seconds = None
    if not args.calibrated and not (cal_dir / "recipe.yaml").is_file():
        log(f"tomectl calibrate {TINY} --flops {args.flops} (train images) ...")
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("tomectl")), "calibrate", TINY, "--flops",
                        str(args.flops), "--images", str(TRAIN), "--weights", str(WEIGHTS), "--out", str(cal_dir)],
                       check=True)
        cal_seconds = time.perf_counter() - t0
    recipes, cals = schedules(args.calibrated or [cal_dir], args)
    index = export_graphs(recipes, args.workdir, args)
    evals = evaluate(index, args.workdir, args)
    if args.skip_timing and (args.workdir / "timing.json").is_file():
        timing = json.loads((args.workdir / "timing.json").read_text())
        timing["seconds"] = None
        args.rounds = len(next(iter(timing["runs"].values())))
    else:
        timing = time_all(index, args.workdir, args)
    sp = speedups(timing["runs"], args.rounds)
    report(index, evals, sp, timing, cals, cal_seconds, args, time.perf_counter() - t_all)
    return 0


def report(index, evals, sp, timing, cals, cal_seconds, args, total_s) -> None:
    from tomectl.export.precision import DEFAULT_MARGIN
    from tomectl.provenance import machine, now, versions

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    say = lines.append
    tiny_labels = order_labels(k.split("|")[1] for k in index if k.startswith(TINY))
    small_labels = order_labels(k.split("|")[1] for k in index if k.startswith(SMALL))
    def cols_of(model):
        return sorted({(int(k.split("|")[3]), int(k.split("|")[4][1:])) for k in sp if k.startswith(model)})

    cols = cols_of(TINY)
    n_val = next(iter(evals.values()))["n"]

    def g(k):
        return sp.get(k)

    say("# Reduced precision x token reduction (`benchmarks/precision.py`)")
    say("")
    say(f"onnxruntime {versions().get('onnxruntime', '')} CPU, {machine().get('cpu_count')} cores shared with "
        f"other work (1-minute load average {min(timing['loads']):.1f}-{max(timing['loads']):.1f} during "
        f"timing), {args.rounds} rounds; each round times the graphs of one model, batch and thread count "
        f"side by side in one fresh process, in a shuffled order (~{args.duration:g} s of calls per graph "
        f"at batch 1, {2 * args.duration:g} s at batch 8, after a warm-up until the latency settles). "
        f"Speedup = fp32 unreduced median / configuration median, same model, batch, threads and round; "
        f"median over rounds [min-max over rounds]. Date {now()}.")
    say("")
    say("Calibrated schedules (DeiT-S runs the same method and per-layer removals; the precision columns "
        "convert each schedule's fp32 graph whatever precision its artifact records):")
    say("")
    for label, c in cals.items():
        budget = c["doc"].get("budget", {}).get("description", "?")
        chosen = c["doc"].get("chosen") or {}
        made = (f"the artifact `{c['dir']}` (budget: {budget}; chosen in {chosen.get('precision', 'fp32')})"
                if args.calibrated else
                f"`tomectl calibrate {TINY} --flops {args.flops} --images ../shared/data/imagenet-train-1000 "
                f"--weights ...`" + (f" ({cal_seconds:.0f} s)" if cal_seconds else ""))
        say(f"- {label}: {made} -> method {c['recipe'].method}, per layer {' '.join(map(str, c['per_layer']))}")
    say("")
    say(f"## DeiT-Tiny, shared real weights: agreement on all {n_val} shared val images (squash), speed")
    say("")
    head = ("| schedule | precision | GMACs | agreement [Wilson 95 %] | KL | top-1 | vs own fp32 graph "
            "(agreement / paired diff [95 %] / default check) | " +
            " | ".join(f"b{b} t{t}" for b, t in cols) + " |")
    say(head)
    say("|" + "---|" * (6 + len(cols)) + "")
    for lab in tiny_labels:
        for prec in (*PRECISIONS, "generic-static"):
            k = f"{TINY}|{lab}|{prec}|1"
            if k not in index:
                continue
            e = evals[k]
            lo, hi = e["agreement_ci95"]
            vs = "-"
            if "vs_fp32_graph" in e:
                v = e["vs_fp32_graph"]
                vs = (f"{v['agreement_with_fp32_graph']:.1%} / {100 * v['difference']:+.1f} "
                      f"[{100 * v['difference_ci95'][0]:+.1f}, {100 * v['difference_ci95'][1]:+.1f}] / "
                      f"{'pass' if v['passed'] else '**refused**'}")
            spd = " | ".join(fmt_sp(g(f"{TINY}|{lab}|{prec}|{b}|t{t}")) for b, t in cols)
            say(f"| {lab} | {PREC_NAME[prec]} | {index[k]['gmacs']:.3f} | {e['agreement']:.1%} "
                f"[{lo:.1%}, {hi:.1%}] | {e['kl']:.3f} | {e['top1']:.1%} | {vs} | {spd} |")
    base = {f"b{b} t{t}": g(f"{TINY}|r=0|fp32|{b}|t{t}")["ms"] for b, t in cols}
    say("")
    say("fp32 unreduced latency (ms per batch, median): " +
        ", ".join(f"{c} {v:.2f}" for c, v in base.items()) + ". Columns bN tT: batch N, T threads. "
        "'default check': what `tomectl export --precision int8`'s check (`check_precision`, default margin) "
        f"decides, here on the val images: refused when the whole 95 % interval of the paired difference "
        f"lies more than {100 * DEFAULT_MARGIN['int8']:g} points below the fp32 graph's agreement.")
    say("")
    say("## DeiT-S, random weights: speed only")
    say("")
    cols = cols_of(SMALL)
    say("| schedule | precision | GMACs | " + " | ".join(f"b{b} t{t}" for b, t in cols) + " |")
    say("|" + "---|" * (3 + len(cols)))
    for lab in small_labels:
        for prec in PRECISIONS:
            k = next((kk for kk in index if kk.startswith(f"{SMALL}|{lab}|{prec}|")), None)
            if k is None:
                continue
            spd = " | ".join(fmt_sp(g(f"{SMALL}|{lab}|{prec}|{b}|t{t}")) for b, t in cols)
            say(f"| {lab} | {PREC_NAME[prec]} | {index[k]['gmacs']:.3f} | {spd} |")
    base_s = {f"b{b} t{t}": g(f"{SMALL}|r=0|fp32|{b}|t{t}")["ms"] for b, t in cols}
    say("")
    say("fp32 unreduced latency (ms per batch, median): " + ", ".join(f"{c} {v:.2f}" for c, v in base_s.items()))
    say("")

    # goals
    pts = frontier_points(index, evals, {k: v for k, v in sp.items() if k.endswith("|1|t1")})
    tom = [p for p in pts if p["precision"] != "generic-static"]
    front = pareto(tom)
    say("## Goals (DeiT-Tiny, ORT CPU, batch 1, 1 thread; DeiT-S batch 8)")
    say("")
    goals = {}
    for sx, ay in ((2.0, 0.97), (2.5, 0.93)):
        hits = [p for p in tom if p["speedup"] >= sx and p["agreement"] >= ay]
        best_at = max((p for p in tom if p["agreement"] >= ay), key=lambda p: p["speedup"], default=None)
        name = f">= {sx}x at >= {ay:.0%}"
        goals[name] = {"met": bool(hits), "points": hits, "fastest_at_agreement": best_at}
        if hits:
            hp = max(hits, key=lambda p: p["speedup"])
            say(f"- {name}: **met** by {len(hits)} point(s); e.g. {hp['label']} {PREC_NAME[hp['precision']]}: "
                f"{hp['speedup']:.2f}x [{hp['lo']:.2f}-{hp['hi']:.2f}] at {hp['agreement']:.1%} "
                f"[{hp['ci'][0]:.1%}, {hp['ci'][1]:.1%}]; the round minimum is {'also' if hp['lo'] >= sx else 'not'} "
                f"above {sx}x.")
        else:
            say(f"- {name}: **not met**; the fastest point at >= {ay:.0%} is " +
                (f"{best_at['label']} {PREC_NAME[best_at['precision']]}: {best_at['speedup']:.2f}x "
                 f"[{best_at['lo']:.2f}-{best_at['hi']:.2f}] at {best_at['agreement']:.1%}" if best_at else "none"))
    alone = {"int8 alone (int8 dynamic, r=0)": next((p for p in tom if p["precision"] == "int8-dyn"
                                                     and p["label"] == "r=0"), None),
             "ToMe r=13 alone (fp32)": next((p for p in tom if p["precision"] == "fp32" and p["label"] == "r=13"),
                                            None)}
    for name, p in alone.items():
        if p:
            say(f"- reference, {name}: {p['speedup']:.2f}x [{p['lo']:.2f}-{p['hi']:.2f}] at {p['agreement']:.1%}")
    for t in args.threads:
        for prec in ("int8-dyn", "int8-static"):
            a = timing["runs"].get(f"{SMALL}|r=0|{prec}|8|t{t}")
            b = timing["runs"].get(f"{SMALL}|r=13|{prec}|8|t{t}")
            if not (a and b):
                continue
            ratios = [x["median_ms"] / y["median_ms"] for x, y in zip(a, b, strict=False)]
            m = statistics.median(ratios)
            s_a, s_b = sp[f"{SMALL}|r=0|{prec}|8|t{t}"], sp[f"{SMALL}|r=13|{prec}|8|t{t}"]
            name = f"DeiT-S b8 t{t} {PREC_NAME[prec]}: (int8 + r=13) / (int8 alone) speedup >= 1.5"
            goals[name] = {"met": m >= 1.5, "ratio": m, "lo": min(ratios), "hi": max(ratios),
                           "int8_alone": s_a["speedup"], "int8_r13": s_b["speedup"]}
            say(f"- {name}: **{'met' if m >= 1.5 else 'not met'}**: {s_b['speedup']:.2f}x / "
                f"{s_a['speedup']:.2f}x = {m:.2f} [{min(ratios):.2f}-{max(ratios):.2f}] (per-round ratio)")
    say("")
    say("Frontier (batch 1, 1 thread, tomectl's graphs; `precision.png`): " +
        "; ".join(f"{p['label']} {PREC_NAME[p['precision']]} {p['speedup']:.2f}x / {p['agreement']:.1%}"
                  for p in front))
    say("")
    gen = evals.get(f"{TINY}|r=13|generic-static|1")
    gen0 = evals.get(f"{TINY}|r=0|generic-static|1")
    if gen:
        gsp = g(f"{TINY}|r=13|generic-static|1|t1")
        say("## The generic static quantizer over a whole reduced graph")
        say("")
        say(f"`onnxruntime.quantization.quantize_static(fp32.onnx, out.onnx, reader, quant_format=QDQ, "
            f"per_channel=True)` (its defaults otherwise: MinMax, every op type), 64 train images, over "
            f"tomectl's fp32 DeiT-Tiny graph: r=13 agrees with the unreduced model on **{gen['agreement']:.1%}** "
            f"[{gen['agreement_ci95'][0]:.1%}, {gen['agreement_ci95'][1]:.1%}] of the {gen['n']} val images "
            f"(top-1 {gen['top1']:.1%}, KL {gen['kl']:.2f})" + (f", at {fmt_sp(gsp)} batch 1 / 1 thread" if gsp else "") +
            "; the same call over the *unreduced* graph keeps " +
            (f"{gen0['agreement']:.1%}" if gen0 else "-") +
            ". tomectl's static int8 of the same r=13 graph (decision nodes float): "
            f"{evals[f'{TINY}|r=13|int8-static|1']['agreement']:.1%}.")
        say("")
    say(f"Scope of this run: DeiT-Tiny batch {args.tiny_batch}, DeiT-S batch {args.small_batch} with "
        f"r in {args.small_r} (-1: calibrated), threads {args.threads}, extra DeiT-Tiny r {args.extra_r or 'none'}, "
        f"{args.rounds} rounds. The script's defaults run the whole grid (batch 1 and 8 for both models, "
        "DeiT-S every schedule, r = 2, 6, 10 for the frontier).")
    say("")
    say("Report regenerated from the cached graphs, evaluations and timings of the run." if not timing.get("seconds")
        else f"Whole run {total_s / 60:.1f} min" + (f", timing {timing['seconds'] / 60:.1f} min" if timing.get("seconds")
                                                 else "") + ".")
    say("")
    lines.append(readme_section(index, evals, sp, args, gen, goals))
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    doc = {"config": {"rounds": args.rounds, "duration_s": args.duration, "batches": {"tiny": args.tiny_batch, "small": args.small_batch},
                      "threads": args.threads, "extra_r": args.extra_r, "flops_budget": args.flops,
                      "calibrated": {label: {"artifact": str(c["dir"]), "method": c["recipe"].method,
                                             "removed_per_layer": c["per_layer"],
                                             "options": c["recipe"].method_options}
                                     for label, c in cals.items()},
                      "n_calib": N_CALIB, "val_images": n_val},
           "graphs": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in index.items()},
           "evals": evals, "speedups": sp, "timing": timing, "goals": goals,
           "frontier": front, "provenance": {"versions": versions(), "machine": machine(), "date": now()}}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    plot(pts, out.with_suffix(".png"),
         f"DeiT-Tiny (shared weights), onnxruntime CPU, batch 1, 1 thread; agreement on {n_val} val images")
    print("\n".join(line for line in lines if not line.startswith("## README")))



def readme_section(index, evals, sp, args, gen, goals) -> str:
    """The draft of README's "Deploying in reduced precision" section, filled with this run's figures."""
    rows = []
    cal_labels = order_labels(k.split("|")[1] for k in evals if is_calibrated(k.split("|")[1]))
    for lab in ("r=0", "r=4", "r=8", "r=13", *cal_labels):
        for prec in PRECISIONS:
            k = f"{TINY}|{lab}|{prec}|1"
            if k not in evals:
                continue
            s1 = sp.get(f"{k}|t1")
            s8 = sp.get(f"{SMALL}|{lab}|{prec}|8|t2")
            rows.append(f"| {lab} | {PREC_NAME[prec]} | {s1['speedup']:.2f}x | {evals[k]['agreement']:.1%} | "
                        f"{abs(evals[k]['kl']):.3f} | " + (f"{s8['speedup']:.2f}x |" if s8 else "- |"))
    from tomectl.export.precision import DEFAULT_MARGIN as m

    gtxt = gen["agreement"] if gen else float("nan")
    return "\n".join([
        "## README: Deploying in reduced precision",
        "",
        "(draft for README.md, figures from this run)",
        "",
        "On a CPU, deploy int8 *and* a reduction: they compose. `tomectl export --precision int8` converts",
        "only the backbone's linear layers (qkv, proj, MLP, patch embedding, head) and keeps the",
        "reduction's decision nodes (similarity and score matrices, TopK/ArgMax, class-attention rows,",
        "the one-hot assignment, the size bookkeeping) in float; the graph is validated against the",
        "unreduced fp32 model before it is written. Measured (`benchmarks/precision.py`, onnxruntime CPU;",
        f"DeiT-Tiny with the shared weights, agreement with the unreduced fp32 model on {evals[f'{TINY}|r=0|fp32|1']['n']}",
        "val images, batch 1, 1 thread; DeiT-S random weights, batch 8, 2 threads; speedup against the fp32",
        "unreduced graph of the same run):",
        "",
        "| schedule | graph | DeiT-T speedup | DeiT-T agreement | KL | DeiT-S b8 speedup |",
        "|---|---|---|---|---|---|",
        *[r for r in rows if r],
        "",
        "```bash",
        "tomectl export runs/deit_t_r8 --onnx deit_t_r8_int8.onnx --precision int8        # int8 dynamic (default)",
        "tomectl export runs/deit_t_r8 --onnx deit_t_r8_qdq.onnx --precision int8 --int8-mode static \\",
        "    --calib-images ../shared/data/imagenet-train-1000     # QDQ, per-channel, 64 images (--calib-method)",
        "tomectl export runs/deit_t_r8 --onnx deit_t_r8_fp16.onnx --precision fp16        # GPU onnxruntime / TensorRT",
        "tomectl eval deit_t_r8_int8.onnx --data ../shared/data/imagenet-val-1300 --resize squash",
        "tomectl bench deit_tiny_patch16_224 --r 0,8,13 --backend ort --precision fp32,int8",
        "```",
        "",
        "- **dynamic** int8 (the default) needs no calibration and was the fastest on CPU;",
        "  **static** QDQ (`--int8-mode static`) is calibrated on `--calib-images` (64 by default, disjoint",
        "  from the 256 it is validated on) and is the format TensorRT 11 builds int8 engines from.",
        "- The export refuses (exit code non-zero, nothing written) a graph whose agreement with the",
        f"  unreduced model is shown (the whole 95 % interval) to fall more than {100 * m['int8']:g} points "
        f"(int8; {100 * m['fp16']:g} for fp16) below the fp32 reduced graph's,",
        "  paired on the same images; `--max-agreement-drop` changes the margin. The sidecar JSON records",
        "  both agreements, the 95 % interval of their difference and which nodes were converted.",
        "- fp16: inputs, outputs and decision nodes stay fp32. Near-tied merges may flip to equally good",
        "  ones, so an fp16 graph is judged against the unreduced model, not by parity with fp32.",
        "",
        "**Do not** run a generic static quantizer over a reduced graph (for example",
        "`onnxruntime.quantization.quantize_static` on the ONNX file `tomectl export` writes): it quantizes",
        "the similarity and assignment nodes of the merge step, and every merge decision goes wrong",
        f"silently. Measured: DeiT-Tiny ToMe r=13, QDQ per-channel, 64 calibration images: {gtxt:.1%}",
        "agreement with the unreduced model (tomectl's static int8 of the same graph: "
        f"{evals[f'{TINY}|r=13|int8-static|1']['agreement']:.1%}). Quantize",
        "with `tomectl export --precision int8`, or, if you must use your own tool, pass it",
        "`nodes_to_quantize` = the backbone's linear nodes (`tomectl.export.precision.quantizable_nodes`).",
        "Likewise do not convert a reduced graph to fp16 with a generic converter without keeping the",
        "decision nodes in fp32 (`tomectl.export.trt_graph.decision_nodes`).",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
