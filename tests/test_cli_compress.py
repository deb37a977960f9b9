"""The CLI as a user runs it: compress/inspect output, --json, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
import yaml

from tomectl.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_json_and_artifact(tmp_path, capsys):
    out = tmp_path / "deit_t_r13"
    code, stdout, _ = run(capsys, "compress", "deit_tiny_patch16_224", "--r", "13", "--out", str(out),
                          "--random-weights", "--json")
    assert code == 0
    doc = json.loads(stdout)
    assert doc["tokens_per_layer"][-1] == 41 and doc["gmacs_ratio"] == pytest.approx(0.586, abs=1e-3)
    assert (out / "recipe.yaml").is_file() and (out / "summary.json").is_file()


def test_compress_from_a_recipe_and_inspect_an_artifact(tmp_path, capsys):
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"model": "deit_tiny_patch16_224", "schedule": {"r": 8, "inflect": -1.0}}))
    out = tmp_path / "art"
    code, stdout, _ = run(capsys, "compress", "--recipe", str(rec), "--out", str(out), "--random-weights")
    assert code == 0 and "tokens per layer" in stdout
    code, stdout, _ = run(capsys, "inspect", str(out), "--json")
    assert code == 0 and json.loads(stdout)["removed_per_layer"][0] == 16


def test_inspect_table(capsys):
    code, stdout, _ = run(capsys, "inspect", "deit_small_patch16_224", "--r", "13")
    assert code == 0
    assert "4.599 -> 2.706" in stdout and "DeiT" in stdout


@pytest.mark.parametrize("args,match", [
    (["inspect", "resnet50"], "not a ViT"),
    (["inspect", "deit_smal_patch16_224"], "did you mean"),
    (["inspect", "deit_tiny_patch16_224", "--per-layer", "99,0,0,0,0,0,0,0,0,0,0,0"],
     "layer 0 would remove 99"),
    (["inspect", "deit_tiny_patch16_224", "--r", "8", "--keep", "0.5"], "exactly one of"),
    (["inspect", "deit_tiny_patch16_224", "--per-layer", "1,x"], "comma-separated"),
    (["inspect", "deit_tiny_patch16_224", "--method", "magic"], "unknown method"),
    (["inspect", "deit_tiny_patch16_224", "--formulation", "fast"], "formulation"),
    (["inspect", "swin_tiny_patch4_window7_224"], "not a ViT"),
    (["compress", "deit_tiny_patch16_224", "--r", "8", "--out", "OUT", "--weights", "/no/such.pth"],
     "does not exist"),
    (["compress", "--recipe", "/no/such.yaml", "--out", "OUT"], "does not exist"),
    (["compress", "--out", "OUT"], "name a model"),
    (["inspect", "deit_tiny_patch16_224", "--r", "abc"], "Invalid value"),
    (["compress", "deit_tiny_patch16_224", "--r", "8"], "Missing option"),
])
def test_bad_input_is_one_line_and_exit_2(args, match, tmp_path, capsys):
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    code, stdout, stderr = run(capsys, *args)
    assert code == 2
    assert match in stderr
    assert "Traceback" not in stderr + stdout
    assert not (tmp_path / "o").exists()


def test_existing_output_is_kept_without_force(tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    code, _, stderr = run(capsys, "compress", "deit_tiny_patch16_224", "--r", "4", "--out", str(out),
                          "--random-weights")
    assert code == 2 and "--force" in stderr


def test_console_script_and_module_entry_points():
    r = subprocess.run([sys.executable, "-m", "tomectl", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "compress" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tomectl", "inspect", "resnet50"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
