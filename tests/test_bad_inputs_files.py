"""Issue 13, the file-content causes: every bad file is one `error:` line, exit 2, nothing on disk.

One reader per file kind turns each failure into a UserError naming the file, what it is and what
was expected: artifact summaries (JSON), recipes (YAML), ONNX files, TensorRT engines, weights,
labels files and training images. Fast: DeiT-Tiny with random weights, a few tiny images.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from tomectl import data, models
from tomectl.cli import main
from tomectl.errors import UserError

TINY = "deit_tiny_patch16_224"
FIRST = "n01440764"  # the first ImageNet wnid


def _images(folder: Path, n: int = 2, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (40 * i, 120, 200)).save(folder / f"im{i}.jpg")
    return folder


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(argv: list[str], capsys, root: Path, *words: str) -> str:
    """Run the CLI; it must exit 2 with one `error:` line holding every word, writing nothing."""
    before = _listing(root)
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert _listing(root) == before, "something was left on disk"
    return err


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "art"
    assert main(["compress", TINY, "--r", "4", "--random-weights", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    """A small valid ONNX graph (image batch -> 1000 logits), as bytes."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 224, 224])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])
    node = helper.make_node("ReduceMean", ["images"], ["logits"], axes=[2, 3], keepdims=0)
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    return model.SerializeToString()


# --------------------------------------------------------------------------------------------
# cause 2: corrupt summary.json, recipe, .onnx, .engine

SUMMARIES = {
    "empty": b"",
    "truncated": b'{"params": 5717416, "gmacs": 1.2',
    "list": b"[1, 2, 3]",
    "null": b"null",
    "binary": bytes(range(256)),
    "latin1": b'{"name": "caf\xe9"}',
}


@pytest.mark.parametrize("kind", list(SUMMARIES))
@pytest.mark.parametrize("command", ["inspect", "eval", "bench"])
def test_corrupt_summary_is_one_line(kind, command, artifact, tmp_path, capsys):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    (art / "summary.json").write_bytes(SUMMARIES[kind])
    imgs = _images(tmp_path / "imgs")
    argv = {"inspect": ["inspect", str(art)],
            "eval": ["eval", str(art), "--data", str(imgs), "--workers", "0"],
            "bench": ["bench", str(art), "--iters", "1", "--warmup", "0"]}[command]
    _refused(argv, capsys, tmp_path, "summary.json", "expected")


def test_summary_that_is_a_directory(artifact, tmp_path, capsys):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    (art / "summary.json").unlink()
    (art / "summary.json").mkdir()
    _refused(["inspect", str(art)], capsys, tmp_path, "summary.json", "is a directory")


RECIPES = {
    "latin1": (b"model: deit_tiny_patch16_224\nmethod: tom\xe9\n", "not UTF-8"),
    "list": (b"- model: deit_tiny_patch16_224\n- schedule: {r: 4}\n", "it holds a list"),
    "tabs": (b"model: deit_tiny_patch16_224\nschedule:\n\tr: 4\n", "tabs"),
    "empty": (b"", "is empty"),
    "blank": (b"   \n\n", "is empty"),
    "scalar": (b"just some words\n", "YAML mapping"),
    "binary": (b"\x00\x01\x02model", "binary"),
    "unclosed": (b"model: deit_tiny_patch16_224\nschedule: {r: 4\n", "not valid YAML"),
    "utf16": ("model: deit_tiny_patch16_224\n".encode("utf-16"), "not UTF-8"),
}


@pytest.mark.parametrize("kind", list(RECIPES))
def test_corrupt_recipe_is_one_line(kind, tmp_path, capsys):
    content, words = RECIPES[kind]
    (tmp_path / "r.yaml").write_bytes(content)
    _refused(["compress", "--recipe", str(tmp_path / "r.yaml"), "--random-weights", "--out",
              str(tmp_path / "out")], capsys, tmp_path, "r.yaml", words)


def test_recipe_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "r.yaml").mkdir()
    _refused(["compress", "--recipe", str(tmp_path / "r.yaml"), "--random-weights", "--out",
              str(tmp_path / "out")], capsys, tmp_path, "r.yaml", "is a directory")


def _onnx_cases(onnx_bytes: bytes) -> dict:
    return {
        "text": (b"hello, I am not a graph\n", "text file"),
        "json": (b'{"graph": []}', "text file"),
        "empty": (b"", "empty"),
        "truncated": (onnx_bytes[: len(onnx_bytes) // 2], "cannot be loaded"),
        "random": (os.urandom(300), "cannot be loaded"),
        "zip": (None, "cannot be loaded"),
    }


@pytest.mark.parametrize("kind", ["text", "json", "empty", "truncated", "random", "zip", "directory"])
def test_bad_onnx_file_is_one_line(kind, onnx_bytes, tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    f = tmp_path / "m.onnx"
    if kind == "directory":
        f.mkdir()
        words = "is a directory"
    elif kind == "zip":
        with zipfile.ZipFile(f, "w") as z:
            z.writestr("model.onnx", onnx_bytes)
        words = "cannot be loaded"
    else:
        content, words = _onnx_cases(onnx_bytes)[kind]
        f.write_bytes(content)
    err = _refused(["eval", str(f), "--data", str(imgs), "--workers", "0"], capsys, tmp_path, "m.onnx", words)
    assert "ONNX" in err


@pytest.mark.parametrize("kind", ["text", "empty", "directory", "onnx", "random"])
def test_bad_engine_talks_about_the_engine(kind, onnx_bytes, tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    f = tmp_path / "m.engine"
    if kind == "directory":
        f.mkdir()
    else:
        f.write_bytes({"text": b"not an engine at all\n", "empty": b"", "onnx": onnx_bytes,
                       "random": os.urandom(400)}[kind])
    err = _refused(["eval", str(f), "--data", str(imgs), "--workers", "0"], capsys, tmp_path, "m.engine")
    assert "engine" in err and "export needs" not in err


# --------------------------------------------------------------------------------------------
# cause 4: train on images it cannot decode


def _train(images: Path, out: Path, *extra: str) -> list[str]:
    return ["train", TINY, "--method", "dtem", "--r", "4", "--images", str(images), "--out", str(out),
            "--epochs", "1", "--batch-size", "2", "--workers", "0", "--augment", "none", "--random-weights",
            *extra]


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "wrong-extension"])
def test_train_refuses_a_folder_where_nothing_decodes(kind, tmp_path, capsys):
    good = _images(tmp_path / "src", 3)
    bad = tmp_path / "bad"
    bad.mkdir()
    for i, src in enumerate(sorted(good.iterdir())):
        raw = src.read_bytes()
        content = {"truncated": raw[:120], "text": b"hello", "empty": b"",
                   "wrong-extension": b"%PDF-1.4 not an image"}[kind]
        (bad / f"x{i}.jpg").write_bytes(content)
    _refused(_train(bad, tmp_path / "out"), capsys, tmp_path, "none of the 3 images", "could be decoded")


def test_train_refuses_val_images_where_nothing_decodes(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    val = tmp_path / "val"
    val.mkdir()
    (val / "a.png").write_text("not a png")
    _refused(_train(imgs, tmp_path / "out", "--val", str(val)), capsys, tmp_path, "could be decoded")


def test_train_says_how_many_images_were_skipped(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 3)
    (imgs / "zz_broken.jpg").write_bytes((imgs / "im0.jpg").read_bytes()[:100])
    (imgs / "zz_text.png").write_text("hello")
    capsys.readouterr()
    assert main(_train(imgs, tmp_path / "out", "--json")) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["skipped_images"] == 2
    assert any("2 of 5 training images could not be decoded" in n for n in res["notes"])
    assert res["epochs"][0]["images"] == 3


# --------------------------------------------------------------------------------------------
# cause 5: weight files


def _weights_case(kind: str, f: Path) -> str:
    from safetensors.torch import save_file

    if kind == "text":
        f.write_text("101 is not a tensor\n")
        return "text file"
    if kind == "zero":
        f.write_bytes(b"")
        return "empty"
    if kind == "zip-not-state-dict":
        with zipfile.ZipFile(f, "w") as z:
            z.writestr("notes.txt", "hi")
        return "zip archive"
    if kind == "directory":
        f.mkdir()
        return "is a directory"
    if kind == "other-model":
        save_file({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8),
                   "fc.bias": torch.zeros(10)}, str(f))
        return "another model's"
    if kind == "pickled-objects":
        torch.save({"model": torch.nn.Linear(2, 2)}, f)
        return "Python objects"
    if kind == "list":
        torch.save([torch.zeros(1)], f)
        return "holds a list"
    if kind == "no-tensors":
        torch.save({"epoch": 3, "lr": 0.1}, f)
        return "without tensors"
    if kind == "truncated-safetensors":
        save_file({"a": torch.zeros(64, 64)}, str(f))
        f.write_bytes(f.read_bytes()[:200])
        return "truncated"
    if kind == "truncated-pth":
        torch.save({"a": torch.zeros(64, 64)}, f)
        f.write_bytes(f.read_bytes()[:300])
        return "truncated"
    if kind == "random":
        f.write_bytes(os.urandom(256))
        return "neither a safetensors file nor a PyTorch checkpoint"
    raise AssertionError(kind)


WEIGHT_KINDS = ["text", "zero", "zip-not-state-dict", "directory", "other-model", "pickled-objects", "list",
                "no-tensors", "truncated-safetensors", "truncated-pth", "random"]


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_bad_weights_say_what_the_file_is(kind, suffix, tmp_path, capsys):
    f = tmp_path / f"w{suffix}"
    words = _weights_case(kind, f)
    err = _refused(["compress", TINY, "--r", "4", "--weights", str(f), "--out", str(tmp_path / "out")],
                   capsys, tmp_path, f.name, words)
    assert "weights_only" not in err and "does not exist" not in err


def test_weights_in_a_nested_or_ddp_checkpoint_load(tmp_path):
    sd = models.create(TINY, random_weights=True).model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ddp.pth")
    lm = models.create(TINY, weights=tmp_path / "ddp.pth")
    assert torch.equal(lm.model.state_dict()["pos_embed"], sd["pos_embed"])


# --------------------------------------------------------------------------------------------
# cause 6: labels eval would drop silently


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


@pytest.mark.parametrize("label,words", [("-1", "neither a class index"), ("-7", "neither a class index"),
                                         ("3.5", "neither a class index"), ("cat", "neither a class index"),
                                         ("n99999999", "nor an ImageNet wnid")])
def test_labels_file_refuses_what_it_does_not_understand(label, words, tmp_path):
    _png(tmp_path / "a.png")
    lf = tmp_path / "labels.txt"
    lf.write_text(f"a.png 3\na.png {label}\n")
    with pytest.raises(UserError, match=words) as e:
        data.scan(tmp_path, labels_file=lf)
    assert "labels.txt:2" in str(e.value)


def test_labels_line_naming_a_missing_file(tmp_path):
    _png(tmp_path / "a.png")
    lf = tmp_path / "labels.txt"
    lf.write_text("a.png 3\ngone.png 4\nalso/gone.png 5\n")
    with pytest.raises(UserError) as e:
        data.scan(tmp_path, labels_file=lf)
    msg = str(e.value)
    assert "labels.txt:2 names gone.png, which does not exist" in msg and "2 of 3 lines" in msg
    assert "undecodable" not in msg


@pytest.mark.parametrize("kind", ["latin1", "directory", "empty"])
def test_bad_labels_file_is_one_line(kind, tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    lf = tmp_path / "labels.txt"
    if kind == "directory":
        lf.mkdir()
    else:
        lf.write_bytes({"latin1": b"im0.jpg caf\xe9\n", "empty": b""}[kind])
    words = {"latin1": "not UTF-8", "directory": "is a directory", "empty": "empty"}[kind]
    _refused(["eval", TINY, "--data", str(imgs), "--labels", str(lf), "--workers", "0"],
             capsys, tmp_path, "labels.txt", words)


def test_unlabelled_folders_are_explained(tmp_path):
    for name in ("cats", "dogs"):
        _png(tmp_path / "a" / name / "x.png")
    _png(tmp_path / "b" / FIRST / "x.png")
    _png(tmp_path / "b" / "misc" / "y.png")
    _png(tmp_path / "c" / "x.png")
    for root, words in (("a", "not named by ImageNet wnids (e.g. 'cats')"),
                        ("b", "1 of its 2 folders are not ImageNet wnids (e.g. 'misc')"),
                        ("c", "no class folders")):
        samples = data.scan(tmp_path / root)
        note = data.unlabelled_note(tmp_path / root, None, samples)
        assert note is not None and words in note and "--labels" in note
    samples = data.scan(tmp_path / "b" / FIRST)  # a flat folder inside: unlabelled as well
    assert data.unlabelled_note(tmp_path / "b" / FIRST, None, samples) is not None
    labelled = tmp_path / "d"
    _png(labelled / FIRST / "x.png")
    assert data.unlabelled_note(labelled, None, data.scan(labelled)) is None


def test_eval_notes_missing_labels_and_refuses_label_5000(tiny_weights, tmp_path):
    from tomectl import evaluate
    from tomectl.recipe import Recipe
    from tomectl.schedule import Schedule

    for name in ("cats", "dogs"):
        _png(tmp_path / "d" / name / "x.png")
    rec = Recipe(TINY, Schedule.make(r=0))
    res = evaluate.evaluate(rec, tmp_path / "d", weights=tiny_weights, workers=0, compare_to_unreduced=False)
    assert res.top1 is None and "not named by ImageNet wnids" in res.note
    lf = tmp_path / "labels.txt"
    lf.write_text("cats/x.png 5000\n")
    refused = r"label 5000 .* outside the model's 1000 classes \(class indices 0..999\)"
    with pytest.raises(UserError, match=refused):
        evaluate.evaluate(rec, tmp_path / "d", labels_file=lf, weights=tiny_weights, workers=0)


# --------------------------------------------------------------------------------------------
# cause 7 (first half): the names offered for a refused model are names tomectl accepts


@pytest.mark.parametrize("name", ["convnext_tiny", "resnet18", "swin_tiny_patch4_window7_224", "convit_tiny",
                                  "gcvit_xxtiny", "deit_tiny_patch16_22", "vit_base_patch16_siglip_22"])
def test_suggested_models_are_accepted(name):
    with pytest.raises(UserError) as e:
        models.check_name(name)
    msg = str(e.value)
    tail = msg.split("did you mean")[-1] if "did you mean" in msg else msg.split("tomectl takes")[-1]
    offered = [w.strip(",.?;()") for w in tail.replace(" and ", " ").split()]
    assert offered, msg
    for cand in offered:
        models.check_name(cand)
        assert models._reducible(cand), cand
    assert "convit" not in msg.split(";")[-1] and "gcvit" not in msg.split(";")[-1]


# --------------------------------------------------------------------------------------------
# cause 9: learned methods without a schedule


def test_patchmerger_default_is_the_papers():
    from tomectl.recipe import Recipe
    from tomectl.schedule import Schedule
    from tomectl.train import default_schedule

    rec, note = default_schedule(Recipe(TINY, Schedule.make(r=0), method="patchmerger"))
    assert rec.schedule.per_layer == tuple([0] * 6 + [188] + [0] * 5)  # block 6 of 12: 196 -> 8 tokens
    assert "Renggli" in note and "196 tokens into 8" in note and "--r" in note
    rec, _ = default_schedule(Recipe(TINY, Schedule.make(r=0), method="patchmerger",
                                     method_options={"layers": [3]}))
    assert rec.schedule.per_layer[3] == 188


@pytest.mark.parametrize("method", ["dtem", "ltm"])
def test_learned_methods_without_a_default_name_the_flags(method, tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    _refused(["train", TINY, "--method", method, "--images", str(imgs), "--out", str(tmp_path / "out"),
              "--random-weights"], capsys, tmp_path, "--r N", "--keep", "--per-layer")


def test_explicit_r0_names_the_flags(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    _refused(["train", TINY, "--method", "patchmerger", "--r", "0", "--images", str(imgs), "--out",
              str(tmp_path / "out"), "--random-weights"], capsys, tmp_path, "nothing to train", "--r N")


def test_patchmerger_trains_with_its_default_and_says_so(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["train", TINY, "--method", "patchmerger", "--images", str(imgs), "--out", str(out),
               "--epochs", "1", "--batch-size", "2", "--workers", "0", "--augment", "none",
               "--random-weights", "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "PatchMerger's default" in cap.err and "196 tokens into 8" in cap.err
    import yaml

    doc = yaml.safe_load((out / "recipe.yaml").read_text())
    assert doc["tokens_per_layer"][-1] == 9  # 8 merged tokens + the class token
