"""tomectl.bench: latency statistics, configuration checks, a tiny end-to-end run with its report."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tomectl import bench, report
from tomectl.cli import main
from tomectl.errors import UserError
from tomectl.recipe import Recipe
from tomectl.schedule import Schedule

TINY = "deit_tiny_patch16_224"
HAVE_ONNX_EXPORT = importlib.util.find_spec("tomectl.export") is not None and \
    importlib.util.find_spec("tomectl.export.onnx") is not None


def test_latency_stats_percentiles():
    s = bench.LatencyStats.of([float(v) for v in range(1, 102)])  # 1..101 ms
    assert (s.min, s.p10, s.p50, s.p90, s.p99) == (1.0, 11.0, 51.0, 91.0, 100.0)
    assert s.mean == 51.0 and s.n == 101
    assert s.p95 == pytest.approx(96.0)
    assert s.spread == pytest.approx(80 / 51)
    one = bench.LatencyStats.of([3.0])
    assert one.p99 == one.p50 == 3.0 and one.std == 0.0
    with pytest.raises(ValueError):
        bench.LatencyStats.of([])


def test_entries_always_start_with_unreduced():
    model, entries = bench.entries_for(TINY, [13, 0, 8, 13])
    assert model == TINY
    assert [e.label for e in entries] == ["r=0", "r=13", "r=8"]


def test_entries_from_artifacts(tmp_path):
    from tomectl.compress import compress

    a = tmp_path / "t13"
    compress(Recipe(TINY, Schedule.make(r=13)), a, random_weights=True)
    model, entries = bench.entries_for([str(a)], [16])
    assert model == TINY
    assert [e.label for e in entries] == ["r=0", "t13", "r=16"]
    assert entries[0].recipe.weights == {"source": "random"} == entries[1].recipe.weights
    with pytest.raises(UserError, match="not an artifact"):
        bench.entries_for([str(a), str(tmp_path)], [])


@pytest.mark.parametrize("kwargs, match", [
    (dict(backends=["tensorflow"]), "unknown backend"),
    (dict(batches=[0]), "--batch"),
    (dict(iters=0), "--iters"),
    (dict(warmup=-1), "--warmup"),
    (dict(schedules=[-2]), "--r"),
])
def test_bad_configurations_refused(kwargs, match):
    args = dict(schedules=[8], backends=["torch"], batches=[1], iters=1, warmup=0, random_weights=True)
    args.update(kwargs)
    with pytest.raises(UserError, match=match):
        bench.run_bench(TINY, args.pop("schedules"), args.pop("backends"), args.pop("batches"), **args)


def test_cli_bad_backend_one_line(capsys):
    assert main(["bench", TINY, "--random-weights", "--backend", "torch,mxnet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mxnet" in err


def test_gpu_backend_without_gpu_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="GPU"):
        bench.check_backends(["torch-cuda"])


def test_measure_latency_in_process():
    stats = bench.measure_latency(Recipe(TINY, Schedule.make(r=13)), "torch", 1, warmup=0, iters=2, threads=1,
                                  isolate=False)
    assert stats.n == 2 and 0 < stats.min <= stats.p50 <= stats.p99


@pytest.mark.parametrize("backends", [
    "torch",
    pytest.param("torch,ort", marks=[
        pytest.mark.slow,  # two ONNX exports with their parity checks
        pytest.mark.skipif(not HAVE_ONNX_EXPORT, reason="tomectl.export.onnx not available"),
    ]),
])
def test_tiny_bench_end_to_end(backends, tmp_path, capsys):
    """Each configuration in its own process; report.json, report.md and the plot written."""
    out = tmp_path / "out"
    rc = main(["bench", TINY, "--random-weights", "--r", "13", "--backend", backends, "--batch", "1",
               "--warmup", "0", "--iters", "2", "--threads", "1", "--report", str(out), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads((out / report.JSON_NAME).read_text())
    assert doc["schema_version"] == bench.SCHEMA_VERSION and doc["kind"] == "bench"
    assert set(doc) >= {"model", "config", "rows", "evals", "provenance", "notes"}
    assert set(doc["provenance"]) >= {"versions", "machine", "date"}
    assert doc["provenance"]["versions"]["tomectl"] and doc["config"]["threads"] == 1

    rows = doc["rows"]
    assert [(r["backend"], r["label"]) for r in rows] == [(b, lab) for b in backends.split(",")
                                                         for lab in ("r=0", "r=13")]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert set(r["latency_ms"]) == {"mean", "p10", "p50", "p90", "p95", "p99", "min", "std", "n"}
        assert r["latency_ms"]["n"] == 2
        assert r["img_per_s"] == pytest.approx(1000 / r["latency_ms"]["mean"], rel=1e-3)
        assert r["peak_mem_mb"] > 50 and r["mem_kind"] == "rss"
        assert r["params"] == 5_717_416
    base, red = rows[0], rows[1]
    assert base["baseline"] and base["speedup"] == 1.0 and base["efficiency"] == 1.0
    assert base["gmacs"] == pytest.approx(1.254, abs=0.002)
    assert red["gmacs"] == pytest.approx(0.735, abs=0.002)
    assert red["flops_ratio"] == pytest.approx(base["gmacs"] / red["gmacs"], rel=1e-3)
    assert red["speedup"] == pytest.approx(base["latency_ms"]["p50"] / red["latency_ms"]["p50"], rel=1e-3)
    assert red["efficiency"] == pytest.approx(red["speedup"] / red["flops_ratio"], rel=1e-3)

    md = (out / report.MD_NAME).read_text()
    assert "| torch | 1 | r=13 | 0.735 |" in md
    assert (out / report.PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_failure_becomes_row_error(tmp_path):
    spec = {"backend": "ort", "batch": 1, "input_size": [3, 224, 224], "threads": 1, "warmup": 0, "iters": 1,
            "onnx": str(tmp_path / "missing.onnx")}
    res = bench.run_isolated(spec, tmp_path)
    assert "error" in res and res["error"]
