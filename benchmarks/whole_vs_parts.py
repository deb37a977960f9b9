"""Where the latency model's error comes from: a whole exported graph against its own blocks.

Exports one schedule as tomectl exports it (onnxruntime CPU), cuts the graph at every block's
first LayerNorm (the cut pieces take the tensors that cross each cut, fed with the values the whole
graph computes), and times the whole graph, every piece and a trivial call round-robin, in one
process, each round in a shuffled order. Prints each block's own time beside the latency model's
price of it, and the whole graph beside the sum of its pieces: the gap `LatencyModel.predict` adds
in ms.

    python benchmarks/whole_vs_parts.py --method bat --schedule 0,0,0,169,0,0,0,0,0,0,0,0 \\
        [--precision int8] [--cache-dir DIR] [--rounds 8]

Random weights (time does not depend on them). 2026-12-05, onnxruntime 1.32, DeiT-Tiny, batch 1,
1 thread, fp32: the pieces matched the table's blocks within 0.02 ms; the whole graph took more
than the sum of its pieces by 1.15 ms unreduced (26.8 ms), 1.33 ms ToMe r=13 (18.6 ms), 1.52 ms
EViT 147 at block 3 (13.6 ms), 0.98 ms BAT 169 at block 3 (11.5 ms); int8: 0.98 ms unreduced
(13.6 ms), 1.26 ms BAT 45/15 at blocks 6/9 (12.9 ms).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import helper  # noqa: E402

from tomectl.build import build  # noqa: E402
from tomectl.export.onnx import export_graph  # noqa: E402
from tomectl.export.precision import _meta, to_int8  # noqa: E402
from tomectl.latency_model import latency_model  # noqa: E402
from tomectl.recipe import Recipe  # noqa: E402
from tomectl.reduced import Target  # noqa: E402
from tomectl.runtime import ort_session  # noqa: E402
from tomectl.schedule import Schedule  # noqa: E402


def pieces(proto, n_layers: int) -> list[tuple[list[str], list[str]]]:
    """(inputs, outputs) of each piece: the front, every block (from its norm1 on), the final norm."""
    nodes = list(proto.graph.node)
    starts: dict = {}
    for idx, n in enumerate(nodes):
        scopes = _meta(n, "pkg.torch.onnx.name_scopes") or ""
        for i in range(n_layers):
            if f"'blocks.{i}.norm1'" in scopes:
                starts.setdefault(i, idx)
        if "'norm'" in scopes and "blocks" not in scopes:
            starts.setdefault("final", idx)
    bounds = [0] + [starts[i] for i in range(n_layers)] + [starts["final"], len(nodes)]
    seg = {idx: s for s in range(len(bounds) - 1) for idx in range(bounds[s], bounds[s + 1])}
    producer = {o: idx for idx, n in enumerate(nodes) for o in n.output}
    inits = {t.name for t in proto.graph.initializer}
    graph_in = proto.graph.input[0].name
    ins: dict = {s: set() for s in range(len(bounds) - 1)}
    outs: dict = {s: set() for s in range(len(bounds) - 1)}
    for idx, n in enumerate(nodes):
        for t in n.input:
            if not t or t in inits:
                continue
            src = -1 if t == graph_in else seg[producer[t]]
            if src != seg[idx]:
                ins[seg[idx]].add(t)
                if src >= 0:
                    outs[src].add(t)
    for o in proto.graph.output:
        outs[seg[producer[o.name]]].add(o.name)
    return [(sorted(ins[s]), sorted(outs[s])) for s in range(len(bounds) - 1)]


def main() -> None:
    td = Path(tempfile.mkdtemp(prefix="wvp-"))
    try:
        run(td)
    finally:
        shutil.rmtree(td, ignore_errors=True)


def run(td: Path) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--method", default="tome")
    ap.add_argument("--schedule", required=True, help="tokens removed per block, comma-separated")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=float, default=0.25)
    a = ap.parse_args()
    removed = tuple(int(x) for x in a.schedule.split(","))
    lm, _ = latency_model(a.model, "ort", precision=a.precision, threads=1, cache_dir=a.cache_dir)
    rec = Recipe(model=a.model, schedule=Schedule(per_layer=removed), method=a.method,
                 weights={"source": "random"})
    model = build(rec, random_weights=True, target=Target("ort", batch=1)).model
    path = td / "whole.onnx"
    onnx.save(export_graph(model, torch.randn(1, *lm.key["input_size"])), str(path))
    if a.precision == "int8":
        to_int8(path, td / "whole.int8.onnx")
        path = td / "whole.int8.onnx"
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    cuts = pieces(proto, lm.n_layers)
    crossing = sorted({t for ins, _ in cuts for t in ins} - {proto.graph.input[0].name})
    shapes = {v.name: v for v in proto.graph.value_info}
    probe = onnx.load(str(path))
    probe.graph.output.extend(shapes[t] for t in crossing)
    onnx.save(probe, str(td / "probe.onnx"))
    x = np.random.default_rng(0).standard_normal([1, *lm.key["input_size"]]).astype(np.float32)
    sess = ort_session(td / "probe.onnx", threads=1)
    got = sess.run(None, {sess.get_inputs()[0].name: x})
    values = dict(zip([o.name for o in sess.get_outputs()], got, strict=True))
    values[proto.graph.input[0].name] = x
    runs = {}
    whole = ort_session(path, threads=1)
    runs["whole"] = lambda: whole.run(None, {whole.get_inputs()[0].name: x})
    extractor = onnx.utils.Extractor(proto)
    for k, (ins, outs) in enumerate(cuts):
        p = td / f"piece{k}.onnx"
        onnx.save(extractor.extract_model(ins, outs), str(p))
        s = ort_session(p, threads=1)
        feed = {t: values[t] for t in ins}
        runs[f"piece{k}"] = lambda s=s, feed=feed: s.run(None, feed)
    trivial = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["a"], ["b"])], "call", [helper.make_tensor_value_info("a", 1, [1, 8])],
        [helper.make_tensor_value_info("b", 1, [1, 8])]), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(trivial, str(td / "call.onnx"))
    call = ort_session(td / "call.onnx", threads=1)
    a8 = np.zeros((1, 8), np.float32)
    runs["call"] = lambda: call.run(None, {"a": a8})
    samples: dict = {k: [] for k in runs}
    for fn in runs.values():
        for _ in range(5):
            fn()
    order = list(runs)
    for r in range(a.rounds):
        random.Random(r).shuffle(order)
        for k in order:
            end = time.perf_counter() + a.duration
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                runs[k]()
                samples[k].append(1e3 * (time.perf_counter() - t0))
    ms = {k: statistics.median(v) for k, v in samples.items()}
    own = {k: ms[k] - ms["call"] for k in ms}
    regimes = lm.regimes.get(a.method) or ["all"] * lm.n_layers
    n, sized = lm.n_tokens, False
    print(f"{a.model} {a.method} {list(removed)} onnxruntime {a.precision}, batch 1, 1 thread")
    print(f"{'piece':8} {'own ms':>8} {'table ms':>9}")
    print(f"{'front':8} {own['piece0']:8.3f}")
    for i, r in enumerate(removed):
        price = lm.block_with(a.method, regimes[i], n, r, sized)
        print(f"{'block' + str(i):8} {own[f'piece{i + 1}']:8.3f} {price:9.3f}")
        n, sized = n - r, sized or r > 0
    print(f"{'final':8} {own[f'piece{len(cuts) - 1}']:8.3f}   (front + final in the table: {lm.fixed:.3f})")
    parts = sum(own[f"piece{k}"] for k in range(len(cuts)))
    print(f"whole {ms['whole']:.3f} ms, its pieces {parts:.3f} ms + one call {ms['call']:.3f} ms: "
          f"the whole takes {ms['whole'] - parts - ms['call']:.3f} ms more; the table's gap "
          f"{lm.gap:.3f} ms (unreduced {lm.whole:.3f} ms), as a share of this schedule "
          f"{lm.gap * lm.predict_raw(a.method, removed) / lm.base_raw:.3f} ms")


if __name__ == "__main__":
    main()
