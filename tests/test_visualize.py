"""`tomectl visualize`: patch ownership from source tracking, and the PNG it writes."""

import numpy as np
import pytest
import torch
from PIL import Image

from tomectl.cli import main
from tomectl.recipe import Recipe
from tomectl.schedule import Schedule
from tomectl.visualize import draw, patch_owners, visualize


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(path)
    return path


def test_patch_owners_reads_the_source_matrix():
    # 1 protected + 4 patches; final tokens: [cls, {p0, p2}, {p3}]; p1 was pruned
    source = torch.tensor([
        [1, 0, 0, 0, 0],
        [0, 1, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ], dtype=torch.float32)
    assert patch_owners(source, 1).tolist() == [0, -1, 0, 1]


def test_draw_outlines_groups_and_greys_dropped_patches():
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[:, 2:] = 200
    owners = np.array([0, 1, 0, -1])  # 2x2 grid of 2x2-pixel patches
    picture = np.asarray(draw(rgb, owners, (2, 2)))
    assert picture.shape == (8, 8 * 2 + 8, 3)
    right = picture[:, 16:]
    assert (right[4:, 4:] == 48).all()  # the dropped patch (bottom right) is dark grey
    assert right[1, 1].tolist() == right[6, 1].tolist() == [0, 0, 0]  # group {0, 2}: its mean colour
    assert right[1, 6].tolist() == [200, 200, 200]  # group {1}
    left = picture[:, :8]
    assert (left[:, 3] != 0).any()  # the border between groups 0 and 1 is drawn


@pytest.mark.parametrize("method,schedule", [("tome", {"r": 8}), ("tofu", {"r": 8}), ("evit", {"keep": 0.3}),
                                             ("bat", {"keep": 0.3})])
def test_visualize_every_method(method, schedule, image_file, tmp_path):
    out = tmp_path / f"{method}.png"
    rec = Recipe("deit_tiny_patch16_224", Schedule.make(**schedule), method=method)
    res = visualize(rec, image_file, out, random_weights=True)
    assert out.is_file() and Image.open(out).size == (2 * 448 + 8, 448)
    assert res.grid == (14, 14) and res.final_tokens == res.tokens_per_layer[-1] - 1
    if method == "tofu":  # pruning drops patches; the others keep every patch in some token
        assert res.patches_dropped > 0
    else:
        assert res.patches_dropped == 0


def test_cli_visualize_and_its_errors(image_file, tmp_path, capsys):
    out = tmp_path / "t.png"
    rc = main(["visualize", "deit_tiny_patch16_224", str(image_file), "--method", "bat", "--keep", "0.3",
               "--random-weights", "--out", str(out), "--json"])
    assert rc == 0 and out.is_file()
    assert '"final_tokens"' in capsys.readouterr().out
    assert main(["visualize", "deit_tiny_patch16_224", str(tmp_path / "missing.jpg"), "--random-weights",
                 "--out", str(out)]) == 2
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["visualize", "deit_tiny_patch16_224", str(bad), "--random-weights", "--out", str(out)]) == 2
    assert main(["visualize", "deit_tiny_patch16_224", str(image_file), "--random-weights",
                 "--out", str(tmp_path / "t.jpg")]) == 2
    assert not list(tmp_path.glob(".t.png.tmp-*"))  # nothing half-written left behind
