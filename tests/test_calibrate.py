"""`tomectl calibrate`: budgets, infeasible budgets, determinism, the chosen schedule fits."""

import json
from types import SimpleNamespace

import pytest

from tomectl import calibrate as cal
from tomectl.cli import main
from tomectl.errors import UserError
from tomectl.models import create


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one budget"),
    ({"flops": 0.6, "gmacs": 1.0}, "exactly one budget"),
    ({"flops": -0.5}, "fraction"),
    ({"latency_ms": 0}, "positive"),
    ({"speedup": 2.0, "backend": "tpu"}, "--backend"),
    ({"speedup": 2.0, "batch": 0}, "--batch"),
])
def test_bad_budgets(kwargs, match):
    with pytest.raises(UserError, match=match):
        cal.Budget.parse(**kwargs)


def _space(method="tome"):
    model = create("deit_tiny_patch16_224", random_weights=True).model
    return cal._space_for(model, [method], {})


def test_family_candidates_fit_and_sit_at_the_budget():
    space = _space()
    target = 0.6 * space.base_gmacs
    cands = cal.search_flops(space, None, target)
    assert {c.family for c in cands} >= {"constant", "late 1"}
    for c in cands:
        assert c.gmacs <= target
        # relaxed: giving back one more removal anywhere would break the budget
        for i, r in enumerate(c.removed):
            if r:
                trial = list(c.removed)
                trial[i] -= 1
                assert space.gmacs("tome", space.clamp("tome", trial)) > target


@pytest.mark.parametrize("flops,match", [
    (0.05, "tighter than the strongest.*nearest feasible budget: --flops 0.139"),
    (1.2, "looser than the unreduced"),
])
def test_infeasible_flops_budgets_name_the_nearest_feasible(flops, match):
    space = _space()
    with pytest.raises(UserError, match=match):
        cal._check_flops_feasible(space, flops * space.base_gmacs, cal.Budget("flops", flops))


def test_latency_search_hits_the_budget_with_few_measurements():
    space = _space()
    calls = []

    def fake_measure(recipe):  # latency linear in GMACs plus a fixed cost, as on a real backend
        removed = list(recipe.schedule.per_layer)
        g = space.gmacs("tome", removed)
        calls.append(removed)
        ms = 2.0 + 10.0 * g
        return SimpleNamespace(p50=ms, spread=0.02)

    base = 2.0 + 10.0 * space.base_gmacs
    for speedup in (1.3, 1.7, 2.2):
        calls.clear()
        budget = cal.Budget("speedup", speedup)
        measured, idx, base_ms, n = cal.search_latency(space, "deit_tiny_patch16_224", "tome", budget,
                                                      measure=fake_measure)
        target = base / speedup
        chosen = measured[idx]
        assert n == len(calls) <= cal.MAX_LATENCY_MEASUREMENTS
        assert chosen.latency_ms <= target
        assert chosen.latency_ms >= 0.95 * target  # within 5 % of the budget
    with pytest.raises(UserError, match="tighter than the strongest.*--speedup"):
        cal.search_latency(space, "deit_tiny_patch16_224", "tome", cal.Budget("speedup", 20.0),
                           measure=fake_measure)
    with pytest.raises(UserError, match="looser than the unreduced"):
        cal.search_latency(space, "deit_tiny_patch16_224", "tome", cal.Budget("latency_ms", base + 1),
                           measure=fake_measure)


@pytest.mark.slow
def test_flops_calibration_is_deterministic_and_fits(tiny_weights, train_dir, tmp_path, capsys):
    outs = []
    for k in range(2):
        out = tmp_path / f"c{k}"
        code = main(["calibrate", "deit_tiny_patch16_224", "--flops", "0.6", "--images", str(train_dir),
                     "--n-images", "24", "--method", "tome", "--search-evals", "4",
                     "--weights", str(tiny_weights), "--out", str(out), "--json"])
        assert code == 0
        outs.append(json.loads(capsys.readouterr().out))
        for f in ("recipe.yaml", "summary.json", "calibration.json", "calibration.md", "frontier.png"):
            assert (out / f).is_file()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["gmacs"] <= 0.6 * summary["gmacs_base"] + 1e-9
    a, b = outs
    assert a["chosen"]["removed"] == b["chosen"]["removed"]
    assert a["chosen"]["kl"] == b["chosen"]["kl"]
    constant = [c for c in a["candidates"] if c["family"] == "constant" and c["n_scored"] == 24][0]
    assert a["chosen"]["kl"] <= constant["kl"]  # never worse than constant r on its own images


def test_cli_refusals_are_one_line(tmp_path, capsys):
    cases = [
        (["calibrate", "deit_tiny_patch16_224", "--flops", "0.6", "--random-weights",
          "--out", str(tmp_path / "a")], "pass --images"),
        (["calibrate", "deit_tiny_patch16_224", "--speedup", "2", "--backend", "trt",
          "--out", str(tmp_path / "b")], "GPU"),
        (["calibrate", "deit_tiny_patch16_224", "--flops", "0.01", "--random-weights", "--images", "x",
          "--out", str(tmp_path / "c")], ""),
        (["calibrate", "deit_tiny_patch16_224", "--out", str(tmp_path / "d")], "exactly one budget"),
    ]
    for args, match in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_trt_precision_reaches_the_latency_measurement(monkeypatch):
    """--precision is part of a trt latency budget and is what the engine is built and timed at."""
    import inspect

    import tomectl.bench
    from tomectl.recipe import Recipe
    from tomectl.schedule import Schedule

    with pytest.raises(UserError, match="--precision must be one or more of fp32, fp16, int8"):
        cal.Budget.parse(latency_ms=5.0, backend="trt", precision="bf16")
    with pytest.raises(UserError, match="--precision int8 applies to latency budgets on --backend trt, ort"):
        cal.Budget.parse(latency_ms=5.0, backend="torch", precision="int8")
    assert cal.Budget.parse(speedup=1.5, backend="ort", precision="int8").precision == "int8"
    with pytest.raises(UserError, match="--precision fp16 applies to latency budgets on --backend trt"):
        cal.Budget.parse(latency_ms=5.0, backend="ort", precision="fp16")
    budget = cal.Budget.parse(latency_ms=5.0, backend="trt", batch=4, precision="fp16")
    assert budget.describe() == "5 ms at batch 4 on trt fp16"
    seen = {}

    def fake_measure_latency(recipe, backend, batch, **kw):
        seen.update(kw, backend=backend, batch=batch)
        return SimpleNamespace(p50=1.0, spread=0.0)

    assert "precision" in inspect.signature(tomectl.bench.measure_latency).parameters
    monkeypatch.setattr(tomectl.bench, "measure_latency", fake_measure_latency)
    cal._measure(Recipe("deit_tiny_patch16_224", Schedule.make(r=4)), budget, None)
    assert (seen["backend"], seen["batch"], seen["precision"]) == ("trt", 4, "fp16")


def test_ort_latency_budgets_with_images_search_int8_by_default(monkeypatch, tmp_path, capsys):
    """Without --precision: fp32 and int8 for an ort latency budget with --images, fp32 otherwise;
    an explicit --precision wins."""
    seen = []

    def stop(model, budget, **kw):
        seen.append(budget.precisions)
        raise UserError("stopped before the search")

    monkeypatch.setattr(cal, "calibrate", stop)
    base = ["calibrate", "deit_tiny_patch16_224", "--out", str(tmp_path / "o"), "--random-weights"]
    cases = [
        (["--speedup", "1.5", "--backend", "ort", "--images", str(tmp_path)], ("fp32", "int8")),
        (["--speedup", "1.5", "--backend", "ort"], ("fp32",)),
        (["--speedup", "1.5", "--backend", "torch", "--images", str(tmp_path)], ("fp32",)),
        (["--flops", "0.6", "--images", str(tmp_path)], ("fp32",)),
        (["--speedup", "1.5", "--backend", "ort", "--images", str(tmp_path), "--precision", "fp32"],
         ("fp32",)),
    ]
    for args, want in cases:
        assert main(base + args) == 2
        assert "stopped before the search" in capsys.readouterr().err
        assert seen[-1] == want, args


def test_int8_candidates_without_images_to_validate_on_are_refused(monkeypatch, tiny_weights):
    """A machine without the shared images and no --images: one line naming --images (not export's
    --calib-images, which calibrate does not have), before anything is measured."""
    import tomectl.export.onnx

    monkeypatch.setattr(tomectl.export.onnx, "shared_calibration_dir", lambda: None)
    budget = cal.Budget.parse(speedup=1.5, backend="ort", precision="fp32,int8")
    with pytest.raises(UserError, match="int8 candidates are validated .* pass --images DIR"):
        cal.calibrate("deit_tiny_patch16_224", budget, weights=tiny_weights)
