"""Reduced precision that composes with token reduction (export/precision.py).

- which nodes int8 converts, for every method's graph: the backbone's linear layers only, never a
  decision node nor a learned module's;
- the validation refuses a graph whose decisions were quantized (what a generic static quantizer
  does to a reduced graph) and accepts a correct fp16 and int8 graph of DeiT-Tiny ToMe r=13;
- `tomectl export --onnx --precision int8|fp16` end to end: the file is the validated one, the
  sidecar says how it was made, and a refused graph leaves nothing on disk.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import timm
import torch

import tomectl
from tomectl.errors import UserError
from tomectl.export import precision as prec
from tomectl.export.onnx import export_onnx
from tomectl.export.trt_graph import decision_nodes

# method -> (apply kwargs); a 4-block DeiT-Tiny at 64 px keeps each export to a few seconds
METHODS = {
    "tome": dict(r=2),
    "tofu": dict(r=2),
    "evit": dict(keep=0.5, options={"layers": [1, 2]}),
    "bat": dict(keep=0.5, options={"layers": [1, 2]}),
    "dtem": dict(r=2),
    "patchmerger": dict(per_layer=[0, 0, 4, 0]),
    "ltm": dict(per_layer=[0, 3, 3, 0]),
}


def _small():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=4, img_size=64).eval()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_int8_converts_only_the_backbone_linears(method, tmp_path):
    model = tomectl.apply(_small(), method, **METHODS[method])
    res = export_onnx(model, tmp_path / "m.onnx", input_size=(3, 64, 64),
                      check_inputs=torch.randn(2, 3, 64, 64), simplify=False)
    assert res.max_abs_diff < 1e-3
    proto = onnx.load(tmp_path / "m.onnx")
    quant = prec.quantizable_nodes(proto)
    # patch embedding + (qkv, proj, fc1, fc2) per block + head
    assert len(quant) == 1 + 4 * 4 + 1
    by_name = {n.name: n for n in proto.graph.node}
    assert not set(quant) & set(decision_nodes(proto))
    for name in quant:
        scopes = prec._meta(by_name[name], "pkg.torch.onnx.name_scopes")
        assert "tomectl_modules" not in scopes
    floats = prec.float_nodes(proto)
    assert floats, "the reduction's own matmuls stay float"
    if method in ("dtem", "patchmerger", "ltm"):  # the learned modules' linear layers stay float
        scopes = {n: prec._meta(by_name[n], "pkg.torch.onnx.name_scopes") or "" for n in floats}
        learned = [n for n in floats if "tomectl_modules" in scopes[n]]
        assert learned
    # without the exporter's metadata the constant-weight rule finds the same linear layers
    for node in proto.graph.node:
        del node.metadata_props[:]
    assert sorted(prec.quantizable_nodes(proto)) == sorted(quant) or method in ("dtem", "patchmerger", "ltm")


def test_dynamic_int8_keeps_the_patch_embedding_conv_float(tmp_path):
    """onnxruntime's dynamic int8 Conv is slower than the float one (`dynamic_nodes`): the Conv stays
    float, every backbone MatMul/Gemm is converted; static QDQ converts the Conv too."""
    model = tomectl.apply(_small(), "tome", r=2)
    export_onnx(model, tmp_path / "m.onnx", input_size=(3, 64, 64), check_inputs=torch.randn(2, 3, 64, 64),
                simplify=False)
    info = prec.to_int8(tmp_path / "m.onnx", tmp_path / "d.onnx", "dynamic")
    assert info["quantized_nodes"] == 4 * 4 + 1
    ops = [n.op_type for n in onnx.load(tmp_path / "d.onnx").graph.node]
    assert "ConvInteger" not in ops and ops.count("Conv") == 1
    assert ops.count("MatMulInteger") >= 4 * 4  # each block's four (onnxruntime may leave the head's Gemm)
    info = prec.to_int8(tmp_path / "m.onnx", tmp_path / "s.onnx", "static", torch.randn(4, 3, 64, 64))
    assert info["quantized_nodes"] == 1 + 4 * 4 + 1


def _check_arrays(n=64, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    unreduced = rng.standard_normal((n, classes))
    fp32 = unreduced + 0.3 * rng.standard_normal((n, classes))
    return unreduced, fp32


def test_check_precision_paired_difference():
    unreduced, fp32 = _check_arrays()
    same = prec.check_precision(unreduced, fp32, fp32 + 1e-3, "fp16")
    assert same.passed and same.difference == 0 and same.agreement_with_fp32_graph == 1.0
    wrong = prec.check_precision(unreduced, fp32, -fp32, "int8")  # every decision inverted
    assert not wrong.passed and wrong.agreement < 0.1
    lo, hi = wrong.difference_ci95
    assert lo <= wrong.difference <= hi < 0
    with pytest.raises(UserError):
        prec.check_precision(unreduced, fp32, fp32, "int8", margin=2)


@pytest.fixture(scope="module")
def tome13(tmp_path_factory, tiny_weights):
    """DeiT-Tiny ToMe r=13 (shared weights), its checked fp32 graph, and 96 check images."""
    from tomectl.build import build
    from tomectl.recipe import Recipe
    from tomectl.reduced import Target
    from tomectl.schedule import Schedule

    red = build(Recipe("deit_tiny_patch16_224", Schedule.make(r=13)), weights=tiny_weights,
                target=Target("ort"))
    d = tmp_path_factory.mktemp("tome13")
    red.export_onnx(d / "fp32.onnx", simplify=False)
    return red, d


def _check_images(red, train_dir, n):
    opts = prec.PrecisionOptions("fp16", calib_images=train_dir, n_check=n)
    return prec.images_for(red.model, opts)[1]


def test_generic_static_quantizer_graph_is_refused(tome13, train_dir, tmp_path):
    """What `quantize_static` does to a whole reduced graph, as a user would run it: refused."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    red, d = tome13
    check = _check_images(red, train_dir, 48)
    calib = prec._Reader(check[:16], "input", 1)
    quantize_static(d / "fp32.onnx", tmp_path / "broken.onnx", calib, quant_format=QuantFormat.QDQ,
                    per_channel=True)
    opts = prec.PrecisionOptions("int8", int8_mode="static")
    pc = prec.validate(red, d / "fp32.onnx", tmp_path / "broken.onnx", check, opts, batch=1)
    assert not pc.passed, pc.describe()
    ours = tmp_path / "ours.onnx"
    info = prec.to_int8(d / "fp32.onnx", ours, "static", check[:16])
    assert info["quantized_nodes"] == 1 + 4 * 12 + 1
    good = prec.validate(red, d / "fp32.onnx", ours, check[16:], opts, batch=1)
    assert good.agreement > 0.8


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_fp16_and_int8_graphs_pass_by_default(precision, tome13, train_dir, tmp_path):
    red, d = tome13
    check = _check_images(red, train_dir, prec.DEFAULT_CHECK_IMAGES)  # the default settings
    out = tmp_path / f"{precision}.onnx"
    prec.convert(d / "fp32.onnx", out, prec.PrecisionOptions(precision), None)
    pc = prec.validate(red, d / "fp32.onnx", out, check, prec.PrecisionOptions(precision), batch=1)
    assert pc.passed, pc.describe()
    assert pc.median_max_abs_diff < (0.5 if precision == "fp16" else 2.0)  # logits, where top-1s agree


def test_export_int8_end_to_end_and_refusal(tiny_weights, train_dir, tmp_path, monkeypatch):
    from tomectl.cli import main

    out = tmp_path / "m.onnx"
    args = ["export", "deit_tiny_patch16_224", "--r", "13", "--weights", str(tiny_weights),
            "--onnx", str(out), "--precision", "int8", "--calib-images", str(train_dir),
            "--check-images", "32", "--no-simplify", "--json"]
    assert main(args) == 0
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["precision"]["precision"] == "int8" and side["precision"]["mode"] == "dynamic"
    assert side["precision"]["check"]["passed"] and side["precision"]["check"]["n"] == 32
    from tomectl.models import sha256_of

    assert side["sha256"] == sha256_of(out)
    assert any(n.op_type == "DynamicQuantizeLinear" for n in onnx.load(out).graph.node)

    # a conversion that quantizes the decision nodes too (a generic static quantizer over the whole
    # graph): refused in one line, nothing written
    from onnxruntime.quantization import QuantFormat, quantize_static

    def generic(src, dst, opts, calib):
        quantize_static(src, dst, prec._Reader(calib, "input", 1), quant_format=QuantFormat.QDQ,
                        per_channel=True)
        return {"mode": "static"}

    monkeypatch.setattr(prec, "convert", generic)
    bad = tmp_path / "bad.onnx"
    args[args.index(str(out))] = str(bad)
    assert main(args + ["--int8-mode", "static"]) == 2
    assert not bad.exists() and not (tmp_path / "bad.onnx.json").exists()


def test_bench_precision_needs_a_graph_backend():
    """(bench's int8 rows and their bytes: tests/test_reduced.py)"""
    from tomectl.bench import run_bench

    with pytest.raises(UserError, match="ort and trt"):
        run_bench("deit_tiny_patch16_224", [13], ["torch"], [1], iters=1, random_weights=True,
                  precisions=["int8"])


def test_recipe_records_the_precision_and_export_defaults_to_it():
    from types import SimpleNamespace

    from tomectl import recipe as recipe_mod
    from tomectl.calibrate import Budget
    from tomectl.calibrate.run import chosen_recipe

    d = {"model": "deit_tiny_patch16_224", "schedule": {"r": 8}, "precision": "int8"}
    rec = recipe_mod.from_dict(d)
    assert rec.precision == {"precision": "int8", "int8_mode": "dynamic"}
    assert recipe_mod.from_dict(rec.to_dict()) == rec
    assert recipe_mod.from_dict({**d, "precision": "fp32"}).precision is None
    for bad in ("int4", {"precision": "int8", "bits": 4}, {"precision": "int8", "int8_mode": "qat"}):
        with pytest.raises(UserError, match="precision"):
            recipe_mod.from_dict({**d, "precision": bad})
    # what export uses: asked-for values over the recorded ones, over the defaults
    assert prec.PrecisionOptions.of(rec.precision).precision == "int8"
    assert prec.PrecisionOptions.of(rec.precision, precision="fp32").precision == "fp32"
    static = {"precision": "int8", "int8_mode": "static", "calib_method": "entropy", "n_calib": 64}
    assert prec.PrecisionOptions.of(static, calib_method="minmax").key()["calib_method"] == "minmax"
    # a latency budget measured on int8 graphs writes an artifact that exports them
    budget = Budget.parse(speedup=1.5, backend="ort", precision="int8")
    result = SimpleNamespace(model="deit_tiny_patch16_224", budget=budget,
                             chosen=SimpleNamespace(removed=(2,) * 12, method="tome"))
    assert chosen_recipe(result).precision == {"precision": "int8", "int8_mode": "dynamic"}
