"""Latency-budget calibration against its goal (issues #14 and #16).

For each (backend, budget): `tomectl calibrate --speedup S` on DeiT-Tiny with the shared weights
(256 training images for scoring; the latency model from the cache, or measured once), then,
independently of the calibration:
- the chosen schedule, its constant-r ToMe twin and the unreduced model timed side by side in a
  7 rounds over 3 fresh processes (`bench.measure_side_by_side`): the measured speedup;
- top-1 agreement with the unreduced fp32 model on all 1,300 shared val images (95 % Wilson
  interval), of the graph that is deployed: the exported ONNX graph (in the chosen precision) for
  onnxruntime, the PyTorch model for torch.

    python benchmarks/calibrate_latency.py [--backends ort,torch] [--speedups 1.5,1.8]
        [--precision fp32 | fp32,int8] [--out benchmarks/results/calibrate_latency]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from tomectl import data, models  # noqa: E402
from tomectl.artifact import read  # noqa: E402
from tomectl.bench import export_for_bench, measure_side_by_side  # noqa: E402
from tomectl.build import build  # noqa: E402
from tomectl.metrics import compare  # noqa: E402
from tomectl.recipe import Recipe  # noqa: E402
from tomectl.runtime import ort_session, run_session  # noqa: E402
from tomectl.schedule import Schedule  # noqa: E402

MODEL = "deit_tiny_patch16_224"


def val_images(n: int):
    root = SHARED / "data" / "imagenet-val-1300"
    loaded = models.create(MODEL)
    pre = models.preprocessing(loaded.model)
    x = data.load_images(root, pre, n)
    with torch.no_grad():
        ref = torch.cat([loaded.model(x[i:i + 100]) for i in range(0, len(x), 100)])
    return x, ref


def logits_of(recipe: Recipe, backend: str, x: torch.Tensor, workdir: Path, tag: str) -> torch.Tensor:
    if backend.startswith("ort"):
        path = workdir / f"{tag}.onnx"
        prec = (recipe.precision or {}).get("precision", "fp32")
        export_for_bench(recipe, 1, onnx_out=path, precision=prec)
        return torch.from_numpy(run_session(ort_session(path, threads=2), x, batch=1))
    model = build(recipe).model
    with torch.no_grad():
        return torch.cat([model(x[i:i + 100]) for i in range(0, len(x), 100)])


def timing_configs(recipes, backend, workdir: Path):
    out = []
    for k, rec in enumerate(recipes):
        path = None
        if backend.startswith("ort"):
            path = workdir / f"t{k}.onnx"
            prec = (rec.precision or {}).get("precision", "fp32")
            export_for_bench(rec, 1, onnx_out=path, precision=prec)
        out.append((rec, path))
    return out


def run_one(backend: str, speedup: float, precision: str, x, ref, out_dir: Path, threads: int, n_images: int):
    art = out_dir / f"cal_{backend}_{precision.replace(',', '+')}_{speedup:g}"
    cmd = [sys.executable, "-m", "tomectl", "calibrate", MODEL, "--speedup", str(speedup),
           "--backend", backend,
           "--threads", str(threads), "--images", str(SHARED / "data" / "imagenet-train-1000"),
           "--n-images", str(n_images), "--precision", precision, "--out", str(art), "--force", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"backend": backend, "speedup": speedup, "precision": precision,
                "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    cal = json.loads((art / "calibration.json").read_text())
    recipe, _ = read(art)
    twin_d = cal["tome_twin"]
    if twin_d is None:
        return {"backend": backend, "speedup": speedup, "precision": precision,
                "error": "the calibration named no ToMe twin"}
    twin = Recipe(model=MODEL, schedule=Schedule(per_layer=tuple(twin_d["removed"])), method="tome",
                  weights=recipe.weights)
    base = Recipe(model=MODEL, schedule=Schedule.make(r=0), method="tome", weights=recipe.weights)
    with tempfile.TemporaryDirectory() as td:
        stats = measure_side_by_side(timing_configs([base, recipe, twin], backend, Path(td)), backend, 1,
                                     threads=threads, rounds=7, random_weights=False)
        chosen_cmp = compare(ref, logits_of(recipe, backend, x, Path(td), "chosen"))
        twin_cmp = compare(ref, logits_of(twin, backend, x, Path(td), "twin"))
    ch = cal["chosen"]
    return {
        "backend": backend, "speedup": speedup, "precision_searched": precision, "seconds": round(seconds, 1),
        "chosen": {"method": ch["method"], "family": ch["family"], "precision": ch["precision"],
                   "removed": ch["removed"], "predicted_ms": ch["predicted_ms"],
                   "calibration_ms": ch["latency_ms"]},
        "independent": {"base_ms": stats[0].p50, "chosen_ms": stats[1].p50, "twin_ms": stats[2].p50,
                        "chosen_speedup": stats[0].p50 / stats[1].p50,
                        "twin_speedup": stats[0].p50 / stats[2].p50,
                        "spread": [s.spread for s in stats]},
        "agreement": chosen_cmp.agreement, "agreement_ci95": list(chosen_cmp.agreement_ci95),
        "twin": {"removed": twin_d["removed"], "agreement": twin_cmp.agreement,
                 "agreement_ci95": list(twin_cmp.agreement_ci95)},
        "n_val": len(x), "model_errors": cal.get("model_errors"), "notes": cal.get("notes"),
        "latency_measurements": cal.get("latency_measurements"),
    }


def table(rows) -> list[str]:
    out = ["| backend | budget | searched | chosen | precision | predicted ms | measured ms (indep.) | "
           "measured speedup | agreement (95% CI) | ToMe twin: speedup, agreement |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['backend']} | {r['speedup']}x | {r['precision']} | error: {r['error']} |||||||")
            continue
        c, ind = r["chosen"], r["independent"]
        lo, hi = r["agreement_ci95"]
        tlo, thi = r["twin"]["agreement_ci95"]
        out.append(
            f"| {r['backend']} | {r['speedup']}x | {r['precision_searched']} | {c['method']} {c['family']} "
            f"({' '.join(map(str, c['removed']))}) | {c['precision']} | {c['predicted_ms']:.2f} | "
            f"{ind['chosen_ms']:.2f} (base {ind['base_ms']:.2f}) | {ind['chosen_speedup']:.2f}x | "
            f"{r['agreement']:.1%} ({lo:.1%}-{hi:.1%}) | {ind['twin_speedup']:.2f}x, "
            f"{r['twin']['agreement']:.1%} "
            f"({tlo:.1%}-{thi:.1%}) |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="ort,torch")
    ap.add_argument("--speedups", default="1.5,1.8")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--n-val", type=int, default=1300)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibrate_latency"))
    a = ap.parse_args()
    out = Path(a.out)
    runs = out.parent / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    x, ref = val_images(a.n_val)
    rows = []
    for backend in a.backends.split(","):
        for s in a.speedups.split(","):
            prec = a.precision if backend.startswith("ort") else "fp32"
            rows.append(run_one(backend, float(s), prec, x, ref, runs, a.threads, a.n_images))
            print("\n".join(table(rows[-1:])), flush=True)
    md = [f"# Latency-budget calibration, {MODEL}, batch 1, {a.threads} thread(s)", "",
          f"Agreement with the unreduced fp32 model on {len(x)} shared val images; speedups measured "
          "independently of the calibration, side by side with the unreduced model (7 rounds).", "",
          *table(rows), ""]
    prev = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else []
    out.with_suffix(".json").write_text(json.dumps(prev + rows, indent=1))
    with out.with_suffix(".md").open("a") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
