"""tomectl.report: markdown, plot and atomic writing from a report document (no models run)."""

from __future__ import annotations

import json

import pytest

from tomectl import bench, report
from tomectl.errors import UserError


def _row(backend, batch, label, gmacs, p50, baseline=False, error=None):
    r = bench.BenchRow(backend=backend, batch=batch, label=label, schedule=label, method="tome",
                       removed_per_layer=[0] * 12, params=22_050_664, gmacs=gmacs, gmacs_base=4.6, threads=2,
                       baseline=baseline, error=error)
    if error is None:
        r.latency = bench.LatencyStats.of([p50 * 0.9, p50, p50 * 1.2])
        r.peak_mem_mb, r.mem_kind = 400.0, "rss"
    return r


def _doc(evals=()):
    rows = [_row("torch", 8, "r=0", 4.6, 100.0, baseline=True), _row("torch", 8, "r=13", 2.7, 62.0),
            _row("ort", 8, "r=0", 4.6, 80.0, baseline=True), _row("ort", 8, "r=13", 2.7, 50.0, error="boom")]
    for base, r in ((rows[0], rows[1]),):
        r.speedup = base.latency.p50 / r.latency.p50
        r.efficiency = r.speedup / r.flops_ratio
    rows[0].speedup = rows[0].efficiency = rows[2].speedup = rows[2].efficiency = 1.0
    rep = bench.BenchReport(model="deit_small_patch16_224",
                            config={"warmup": 1, "iters": 3, "duration_s": None, "threads": 2, "rounds": 1,
                                    "weights": {"source": "random"}},
                            rows=rows, provenance={"versions": {"tomectl": "0.1.0"}, "machine": {"cpu": "x"},
                                                   "date": "2026-01-01T00:00:00+00:00"},
                            evals=list(evals), notes=["a note"])
    return rep.to_dict()


def test_markdown_table():
    md = report.markdown(_doc())
    assert md.startswith("# tomectl bench: deit_small_patch16_224")
    lines = [line for line in md.splitlines() if line.startswith("| torch | 8 | r=13")]
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    # speedup 100/62 = 1.61x, efficiency 1.613 / (4.6/2.7) = 0.95
    assert cells[report.TABLE_COLUMNS.index("speedup")] == "1.61x"
    assert cells[report.TABLE_COLUMNS.index("efficiency")] == "0.95"
    assert cells[report.TABLE_COLUMNS.index("p50 ms")] == "62.00"
    assert "error: boom" in md
    assert "Note: a note" in md


def test_write_all_three_atomically(tmp_path):
    ev = bench.eval_summary({"kind": "eval", "target": "runs/t13", "schedule": "r=13", "gmacs": 2.7,
                             "gmacs_base": 4.6, "top1": 0.79, "top5": 0.94,
                             "comparison": {"agreement": 0.93, "ref_top1": 0.80},
                             "data": {"evaluated": 1300}})
    doc = _doc([ev])
    w = report.write(doc, tmp_path / "r")
    assert json.loads(w.json.read_text()) == doc
    assert "## Accuracy" in w.markdown.read_text() and "93.00%" in w.markdown.read_text()
    assert w.plot.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(
        [report.JSON_NAME, report.MD_NAME, report.PLOT_NAME])


def test_report_path_that_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        report.write(_doc(), f)


def test_eval_summary_rejects_other_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"kind": "bench"}))
    with pytest.raises(UserError, match="tomectl eval --out"):
        bench.load_eval(p)
    with pytest.raises(UserError, match="does not exist"):
        bench.load_eval(tmp_path / "nope.json")


def test_schema_documented():
    """Every top-level and row key the report writes is named in bench's docstring."""
    doc = _doc()
    for key in doc:
        assert key in bench.__doc__, key
    for key in doc["rows"][0]:
        assert key in bench.__doc__, key
