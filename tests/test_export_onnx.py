"""ONNX export: the exporter traps, exactness of both merge formulations, the parity gate, the sidecar."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from tomectl.cli import main
from tomectl.export.onnx import (
    ATOL,
    ExportCheckError,
    _translations,
    export_onnx,
    load_session,
    near_tie_reference,
    run_session,
)
from tomectl.export.onnx import (
    parity as compare,
)

SIZE = (3, 64, 64)


def small_vit(r: int = 2, formulation: str = "scatter", **kw):
    """A 2-block DeiT-Tiny at 64 px (17 tokens): exports in seconds."""
    import timm

    from tomectl import apply

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2, pretrained=False, **kw).eval()
    return apply(model, r=r, formulation=formulation)


def onnx_run(model_proto, *inputs):
    import onnxruntime as ort

    s = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: v.numpy() for i, v in zip(s.get_inputs(), inputs, strict=True)})


def dynamo(module, args, **kw):
    return torch.onnx.export(
        module.eval(), args, None, dynamo=True, opset_version=18, verbose=False, **kw
    ).model_proto


class ScatterMean(torch.nn.Module):
    """Tokens [B, N, C] averaged into 5 slots: with scatter_reduce(mean), or as sum / count."""

    def __init__(self, exact: bool):
        super().__init__()
        self.exact = exact

    def forward(self, x):
        b, n, c = x.shape
        dst = (torch.arange(n) % 5).expand(b, n)
        idx = dst[..., None].expand(b, n, c)
        if not self.exact:
            return x.new_zeros(b, 5, c).scatter_reduce(1, idx, x, reduce="mean", include_self=False)
        num = x.new_zeros(b, 5, c).scatter_add(1, idx, x)
        den = x.new_zeros(b, 5, 1).scatter_add(1, dst[..., None], torch.ones_like(x[..., :1]))
        return num / den


def test_trap_scatter_reduce_mean_exports_silently_wrong_and_verify_only_logs():
    x = torch.randn(2, 12, 4)
    wrong = dynamo(ScatterMean(exact=False), (x,), verify=True)  # no exception, although wrong
    ops = [n.op_type for n in wrong.graph.node]
    assert "ScatterElements" in ops
    diff = np.abs(onnx_run(wrong, x)[0] - ScatterMean(exact=False)(x).numpy()).max()
    assert diff > 0.1, "torch's exporter now gets scatter_reduce(mean) right: update METHODS.md and this test"
    exact = dynamo(ScatterMean(exact=True), (x,))
    assert np.abs(onnx_run(exact, x)[0] - ScatterMean(exact=True)(x).numpy()).max() < 1e-6


class ScatterSumThenCat(torch.nn.Module):
    def forward(self, x, dst):
        b, n, c = x.shape
        y = x.new_zeros(b, 5, c).scatter_reduce(1, dst[..., None].expand(b, n, c), x, reduce="sum")
        return torch.cat([x[:, :1], y], dim=1)


def test_trap_legacy_exporter_scatter_reduce_sum_is_refused_by_onnxruntime(tmp_path):
    import warnings

    x, dst = torch.randn(2, 9, 4), torch.randint(0, 5, (2, 9))
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ScatterSumThenCat(), (x, dst), str(path), dynamo=False, opset_version=18)
    import onnx

    assert "If" in {n.op_type for n in onnx.load(str(path)).graph.node}  # the rank-check Ifs
    with pytest.raises(ExportCheckError, match="onnxruntime cannot load"):
        load_session(path)


def test_stable_argsort_exports_as_topk_that_keeps_ties_in_order():
    class Sorts(torch.nn.Module):
        def forward(self, x):
            return x.argsort(dim=-1, descending=True, stable=True), x.argsort(dim=-1, stable=True)

    x = torch.tensor([[1.0, 3, 3, 0, 3, 1, 1, 2, 0, 3] * 5, [2.0] * 50])  # many exact ties
    proto = dynamo(Sorts(), (x,), custom_translation_table=_translations())
    assert {n.op_type for n in proto.graph.node} >= {"TopK"}
    got = onnx_run(proto, x)
    want = Sorts()(x)
    assert np.array_equal(got[0], want[0].numpy()) and np.array_equal(got[1], want[1].numpy())


@pytest.mark.parametrize("formulation", ["scatter", "onehot"])
def test_both_merge_formulations_export_exactly(tmp_path, formulation):
    model = small_vit(r=3, formulation=formulation)
    images = torch.randn(5, *SIZE, generator=torch.Generator().manual_seed(1))  # 5 = 2 + 2 + 1 padded
    res = export_onnx(
        model, tmp_path / "m.onnx", batch=2, input_size=SIZE, check_inputs=images, simplify=False
    )
    assert res.max_abs_diff < 1e-5 and res.top1_agreement == 1.0 and res.n_check == 5
    assert res.input_shape == [2, *SIZE] and res.output_shape == [2, 1000]
    assert res.formulation == formulation
    ops = set(res.op_counts)
    # scatter: row sums as ScatterND (reduction=add); onehot: MatMul only
    assert ("ScatterND" in ops) == (formulation == "scatter") and "ScatterElements" not in ops
    assert "NonZero" not in ops and "If" not in ops
    logits = run_session(load_session(tmp_path / "m.onnx"), images, 2)
    with torch.no_grad():
        assert np.abs(logits - model(images).numpy()).max() < 1e-5


def test_failed_parity_raises_and_writes_nothing(tmp_path):
    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ScatterMean(exact=False)

        def forward(self, x):  # [B, 3, 8, 8] -> 5 slots of 3 channels
            return self.inner(x.flatten(2).transpose(1, 2)).flatten(1)

    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportCheckError, match="does not match PyTorch") as err:
        export_onnx(Tokens(), out, batch=2, input_size=(3, 8, 8), check_inputs=torch.randn(4, 3, 8, 8))
    assert "nothing was written" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no output, no sidecar, no temp files


def test_simplified_graph_is_kept_only_when_it_keeps_parity(tmp_path, monkeypatch):
    import onnx

    from tomectl.export import onnx as onnx_export

    def broken_slim(proto):  # "simplifies" into a broken graph
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        proto.graph.node.pop()  # drop a node so it looks simpler ...
        return proto

    monkeypatch.setattr(onnx_export, "simplify", broken_slim)
    model = small_vit()
    res = export_onnx(
        model, tmp_path / "m.onnx", batch=1, input_size=SIZE, check_inputs=torch.randn(2, *SIZE)
    )
    assert not res.simplified and res.nodes_simplified == res.nodes - 1
    assert any("lost parity" in n for n in res.notes)
    assert res.max_abs_diff < ATOL

    def bloated_slim(proto):  # fewer nodes, but a constant folded into a much larger file
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1 << 20, np.int64), "folded"))
        proto.graph.node.pop()
        return proto

    monkeypatch.setattr(onnx_export, "simplify", bloated_slim)
    images = torch.randn(2, *SIZE)
    res = export_onnx(model, tmp_path / "m2.onnx", batch=1, input_size=SIZE, check_inputs=images)
    assert not res.simplified and any("larger (constants folded in)" in n for n in res.notes)


class Step(torch.nn.Module):
    """Logits with a hard decision at x[0] = 0, like a merge decision at a similarity tie."""

    def forward(self, x):
        flat = x.flatten(1)
        return torch.stack([10.0 * (flat[:, 0] > 0).float(), flat[:, 1]], dim=1)


def test_near_ties_are_matched_on_a_perturbed_input_but_wrong_numbers_are_not():
    images = torch.zeros(3, 2)
    images[:, 1] = torch.tensor([0.5, 1.0, 2.0])  # x[0] = 0 exactly: on the decision boundary
    with torch.no_grad():
        reference = Step()(images).numpy()
    other_branch = reference.copy()
    other_branch[0, 0] = 10.0  # "onnxruntime" took the other side of the tie on image 0
    fixed, ties = near_tie_reference(Step(), images, reference, other_branch)
    assert ties == 1 and compare(fixed, other_branch).passed(ATOL)
    wrong = reference.copy()
    wrong[1, 1] += 0.01  # a wrong number, not a tie
    fixed, ties = near_tie_reference(Step(), images, reference, wrong)
    assert ties == 0 and not compare(fixed, wrong).passed(ATOL)


def test_compare_counts_disagreements():
    ref = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.1]])
    p = compare(ref, np.array([[0.0, 1.0], [0.0, 1.0], [0.2, 0.1 + 5e-5]]))
    assert p.top1_agreement == pytest.approx(2 / 3) and p.max_abs_diff == pytest.approx(1.0)
    assert not p.passed(ATOL) and compare(ref, ref + 5e-5).passed(ATOL)


def test_deit_tiny_real_weights_exports_with_parity_and_sidecar(deit_tiny, val_images, tmp_path):
    from tomectl import apply

    model = apply(deit_tiny, r=13)
    images = val_images[0][:4]
    out = tmp_path / "deit_tiny_r13.onnx"
    res = export_onnx(model, out, batch=1, check_inputs=images, meta={"model": "deit_tiny_patch16_224"})
    assert res.max_abs_diff <= ATOL and res.top1_agreement == 1.0 and res.n_check == 4
    assert res.input_shape == [1, 3, 224, 224] and res.opset == 18
    # per merging layer: the stable sort of the edges and the sort of the kept A tokens' positions
    # (the reference's order), K constant
    assert res.op_counts["TopK"] == 24
    doc = json.loads(out.with_name(out.name + ".json").read_text())
    assert doc["input"] == {"name": "input", "shape": [1, 3, 224, 224], "dtype": "float32", "layout": "NCHW"}
    assert doc["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert doc["preprocessing"]["interpolation"] == "bicubic"
    assert doc["reduction"]["tokens_per_layer"][-1] == 197 - 12 * 13
    assert doc["parity"]["max_abs_diff"] <= ATOL and doc["parity"]["top1_agreement"] == 1.0
    assert doc["model"] == "deit_tiny_patch16_224" and doc["sha256"] == res.sha256
    assert stat.S_IMODE(os.stat(out).st_mode) & 0o044  # readable by others, not mkstemp's 0600


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    assert main(["export", "deit_tiny_patch16_224", "--r", "13", "--random-weights"]) == 2
    assert "--onnx FILE" in capsys.readouterr().err
    existing = tmp_path / "m.onnx"
    existing.write_text("old")
    assert (
        main(["export", "deit_tiny_patch16_224", "--r", "13", "--onnx", str(existing), "--random-weights"])
        == 2
    )
    assert "--force" in capsys.readouterr().err and existing.read_text() == "old"
    assert (
        main(
            [
                "export",
                "deit_tiny_patch16_224",
                "--onnx",
                str(tmp_path / "x.onnx"),
                "--precision",
                "int4",  # (fp16 and int8 ONNX graphs are made since issue 16: tests/test_precision.py)
                "--random-weights",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--precision" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# one family per static batch size (batch 1 and 8 each export a family's graph once: the batch is
# baked in the same way for every family, and a DeiT-size export costs ~20 s here). timm's registered
# test ViTs (width 64, 160 px) stand in where the family, not the size, is what is tested.
EXPORT_MODELS = [
    ("test_vit", 14, 8),  # class token (DeiT/ViT layout), 6 blocks
    ("test_vit2", 10, 1),  # a register token, no class token, LayerScale, size-weighted average pool
    ("deit_tiny_distilled_patch16_224", 13, 2),  # class + distillation token, two heads
]


@pytest.mark.slow
@pytest.mark.parametrize("name,r,batch", EXPORT_MODELS)
def test_model_families_export_with_parity(tmp_path, name, r, batch, capsys):
    out = tmp_path / "m.onnx"
    rc = main(
        [
            "export",
            name,
            "--r",
            str(r),
            "--onnx",
            str(out),
            "--batch",
            str(batch),
            "--random-weights",
            "--check-images",
            "8",
            "--json",
        ]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["onnx"]["max_abs_diff"] <= ATOL and doc["onnx"]["top1_agreement"] == 1.0
    assert doc["onnx"]["input_shape"][0] == batch and doc["gmacs"] < 0.7 * doc["gmacs_base"]
    assert (doc["formulation"] == "onehot"
            and not {"ScatterElements", "ScatterND"} & set(doc["onnx"]["op_counts"]))


@pytest.mark.slow
def test_artifact_exports_at_batch_8_with_real_weights(tiny_weights, val_dir, tmp_path, capsys):
    art = tmp_path / "deit_t_r13"
    assert (
        main(
            [
                "compress",
                "deit_tiny_patch16_224",
                "--r",
                "13",
                "--weights",
                str(tiny_weights),
                "--out",
                str(art),
            ]
        )
        == 0
    )
    out = tmp_path / "deit_t_r13.onnx"
    capsys.readouterr()
    assert (
        main(
            [
                "export",
                str(art),
                "--onnx",
                str(out),
                "--batch",
                "8",
                "--calib-images",
                str(val_dir),
                "--check-images",
                "16",
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["onnx"]["n_check"] == 16 and doc["onnx"]["max_abs_diff"] <= ATOL
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["weights"]["sha256"] == "b2e17235172c1dcddacb55aa8914e2f8b4b95eb9bb7d7782f333bcbef77151b8"
    assert sidecar["input"]["shape"] == [8, 3, 224, 224]


def test_gelu_is_written_in_the_order_onnxruntime_fuses(tmp_path):
    """Each block's exact GELU reaches onnxruntime as one fused Gelu kernel, while the file keeps
    standard ONNX operators only (TensorRT parses it) and the parity check holds."""
    import collections

    import onnx
    import onnxruntime as ort

    res = export_onnx(small_vit(), tmp_path / "m.onnx", input_size=SIZE, check_inputs=torch.randn(2, *SIZE))
    assert res.max_abs_diff < ATOL
    proto = onnx.load(tmp_path / "m.onnx")
    assert {n.domain for n in proto.graph.node} == {""}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    assert ops["Gelu"] == 2 and ops["Erf"] == 0, ops
