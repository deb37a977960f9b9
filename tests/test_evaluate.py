"""tomectl.evaluate and `tomectl eval`: label mapping, skipped images, refusals, agreement on real images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tomectl import data, evaluate
from tomectl.artifact import RECIPE, write_yaml
from tomectl.cli import main
from tomectl.errors import UserError
from tomectl.recipe import Recipe
from tomectl.schedule import Schedule

TINY = "deit_tiny_patch16_224"
# position in the canonical sorted list of the 1,000 ImageNet-1k wnids
FIRST, SECOND, LAST = ("n01440764", 0), ("n01443537", 1), ("n15075141", 999)


def _real_images(val_dir: Path, n: int) -> list[Path]:
    return [Path(s.path) for s in data.scan(val_dir, limit=n)]


def _copy_tree(images: list[Path], dst: Path) -> Path:
    """Copy images into dst/<wnid>/ (the ImageNet layout), keeping their class folder."""
    for p in images:
        (dst / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst / p.parent.name / p.name)
    return dst


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path)


# --------------------------------------------------------------------------------------------
# Labels


def test_wnid_folders_use_canonical_order_not_folders_present(tmp_path):
    # Only three classes present: an ImageFolder numbering would give 0, 1, 2.
    for wnid, _ in (LAST, FIRST, SECOND):
        _png(tmp_path / wnid / "a.png")
    labels = {Path(s.path).parent.name: s.label for s in data.scan(tmp_path)}
    assert labels == {FIRST[0]: 0, SECOND[0]: 1, LAST[0]: 999}


def test_labels_file_with_wnids_and_indices(tmp_path):
    _png(tmp_path / "img" / "x.png")
    _png(tmp_path / "img" / "y.png")
    abs_z = tmp_path / "z.png"
    _png(abs_z)
    lf = tmp_path / "labels.txt"
    lf.write_text(f"# comment\nimg/x.png {LAST[0]}\nimg/y.png 7\n{abs_z} {SECOND[0]}\n")
    samples = data.scan(tmp_path, labels_file=lf)
    assert [(Path(s.path).name, s.label) for s in samples] == [("x.png", 999), ("y.png", 7), ("z.png", 1)]


def test_label_outside_model_classes_refused(tmp_path):
    _png(tmp_path / "x.png")
    lf = tmp_path / "labels.txt"
    lf.write_text("x.png 1000\n")
    rec = Recipe(TINY, Schedule.make(r=0))
    with pytest.raises(UserError, match="outside the model's 1000 classes"):
        evaluate.evaluate(rec, tmp_path, labels_file=lf, weights=_weights_or_skip())


def _weights_or_skip() -> Path:
    from conftest import WEIGHTS

    if not WEIGHTS.exists():
        pytest.skip("shared DeiT-Tiny weights absent")
    return WEIGHTS


# --------------------------------------------------------------------------------------------
# Bad inputs (CLI: one line, exit code 2)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_missing_data_folder_exit_2(tmp_path, capsys):
    assert main(["eval", TINY, "--data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in _one_error_line(capsys)


def test_bad_resize_exit_2(tmp_path, capsys):
    _png(tmp_path / FIRST[0] / "a.png")
    assert main(["eval", TINY, "--data", str(tmp_path), "--resize", "stretch"]) == 2
    assert "--resize" in _one_error_line(capsys)


def test_random_weights_artifact_refused(tmp_path, capsys):
    art = tmp_path / "art"
    art.mkdir()
    write_yaml(art / RECIPE, {"model": TINY, "method": "tome", "schedule": {"r": 13},
                              "weights": {"source": "random"}})
    _png(tmp_path / "imgs" / FIRST[0] / "a.png")
    assert main(["eval", str(art), "--data", str(tmp_path / "imgs")]) == 2
    assert "random weights" in _one_error_line(capsys)


def test_random_weights_built_model_refused(tmp_path):
    from tomectl.build import build

    _png(tmp_path / FIRST[0] / "a.png")
    built = build(Recipe(TINY, Schedule.make(r=0)), random_weights=True)
    with pytest.raises(UserError, match="random weights"):
        evaluate.evaluate(built, tmp_path)


def test_target_kind():
    assert evaluate.backend_of(Recipe(TINY, Schedule.make(r=0))) == "torch"
    assert evaluate.backend_of("m.onnx") == "onnx"
    assert evaluate.backend_of("m.engine") == "engine"
    with pytest.raises(UserError):
        evaluate.backend_of("m.pt")


# --------------------------------------------------------------------------------------------
# Real weights and images


def test_undecodable_image_skipped_and_counted(val_dir, tiny_weights, tmp_path):
    root = _copy_tree(_real_images(val_dir, 3), tmp_path / "val")
    bad = root / FIRST[0] / "ILSVRC2012_val_broken.JPEG"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG at all")
    res = evaluate.evaluate(Recipe(TINY, Schedule.make(r=13)), root, resize="squash", weights=tiny_weights,
                            batch_size=2, workers=1, threads=1)  # the skip crosses a DataLoader worker
    assert res.data["images"] == 4
    assert res.data["evaluated"] == 3 and res.data["skipped"] == 1
    assert res.data["skipped_paths"] == [str(bad)]
    assert res.comparison.n == 3 and res.n_labelled == 3


def test_eval_agreement_on_real_images(val_dir, tiny_weights, tmp_path, capsys):
    """r=0 agrees with itself exactly; r=13's reference is the same unreduced model; plausible top-1."""
    common = dict(resize="squash", limit=32, weights=tiny_weights, workers=0, batch_size=16, threads=1)
    base = evaluate.evaluate(Recipe(TINY, Schedule.make(r=0)), val_dir, **common)
    c0 = base.comparison
    assert c0.n == 32 and c0.agreement == 1.0 and c0.kl == pytest.approx(0.0, abs=1e-6)
    assert c0.flips_right_to_wrong == 0 and c0.flips_wrong_to_right == 0
    # 32 images spread over the 1,300: measured 68.75 % (22/32); the full set gives 80.15 %.
    assert 0.6 <= base.top1 <= 0.85
    assert base.top5 >= 0.85
    assert base.gmacs == pytest.approx(base.gmacs_base)

    red = evaluate.evaluate(Recipe(TINY, Schedule.make(r=13)), val_dir, **common)
    c = red.comparison
    assert c.ref_top1 == pytest.approx(base.top1)  # the toggled-off model is the unreduced model
    assert 0.8 <= c.agreement < 1.0  # measured 0.9375 on these 32 (0.932 on all 1,300)
    assert c.agreement_ci95[0] < c.agreement < c.agreement_ci95[1]
    assert 0 < c.kl < 0.5
    assert red.top1 - c.ref_top1 == pytest.approx((c.flips_wrong_to_right - c.flips_right_to_wrong) / 32)
    assert red.gmacs / red.gmacs_base == pytest.approx(0.586, abs=0.01)

    doc = red.to_dict()
    for key in ("schema_version", "kind", "target", "backend", "model", "schedule", "gmacs", "gmacs_base",
                "data", "top1", "top5", "n_labelled", "reference", "comparison", "note", "provenance"):
        assert key in doc
    assert doc["comparison"]["agreement"] == c.agreement
    json.dumps(doc)  # serialisable


def test_predict_tensor_and_loader_agree(deit_tiny, val_images):
    x, _ = val_images
    x = x[:6]
    a = evaluate.predict(deit_tiny, x, batch_size=4)
    b = evaluate.predict(deit_tiny, [x[:3], x[3:]])
    assert a.shape == (6, 1000)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_cli_eval_json_and_out(val_dir, tiny_weights, tmp_path, capsys):
    root = _copy_tree(_real_images(val_dir, 4), tmp_path / "val")
    out = tmp_path / "res" / "eval.json"
    rc = main(["eval", TINY, "--r", "8", "--weights", str(tiny_weights), "--data", str(root),
               "--resize", "squash", "--workers", "0", "--threads", "1", "--json", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["schedule"] == "r=8" and printed["data"]["evaluated"] == 4
    assert not list(out.parent.glob(".*tmp*"))  # nothing half-written left behind


@pytest.mark.slow  # an ONNX export with its parity check
def test_eval_onnx_against_sidecar_reference(val_dir, tiny_weights, tmp_path):
    """An exported graph is evaluated with onnxruntime; its sidecar's recipe gives the torch reference."""
    export = pytest.importorskip("tomectl.export", reason="ONNX export not available")
    rec = Recipe(TINY, Schedule.make(r=13))
    path = tmp_path / "m.onnx"
    export.export(rec, onnx_out=path, batch=4, weights=tiny_weights, check_images=4, simplify=False,
                  formulation="scatter")  # the one-hot formulation adds its assignment matmul to the GMACs
    root = _copy_tree(_real_images(val_dir, 6), tmp_path / "val")
    common = dict(resize="squash", workers=0, batch_size=4)
    res = evaluate.evaluate(path, root, **common)  # 6 images through a batch-4 graph: one padded chunk
    assert res.backend == "onnx" and res.data["evaluated"] == 6
    assert res.model == TINY and res.schedule == "r=13"
    assert res.gmacs == pytest.approx(0.735, abs=0.002)
    torch_res = evaluate.evaluate(rec, root, weights=tiny_weights, **common)
    assert res.comparison is not None and res.comparison.n == 6
    assert res.top1 == torch_res.top1
    assert res.comparison.agreement == torch_res.comparison.agreement
    assert res.comparison.ref_top1 == torch_res.comparison.ref_top1
