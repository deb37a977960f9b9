"""DeiT-Tiny with the real shared weights on real shared validation images (slow, still in `make test`)."""

import pytest
import torch

import tomectl
from tomectl.metrics import compare

pytestmark = pytest.mark.slow


def test_unreduced_accuracy_and_tome_agreement(deit_tiny, val_dir):
    from tomectl import data, models

    pre = models.preprocessing(deit_tiny)
    samples = data.scan(val_dir, limit=260)  # every 5th of the 1,300, spread over the classes
    x = data.load_images(val_dir, pre, 260, resize="squash")
    y = torch.tensor([s.label for s in samples])
    with torch.inference_mode():
        ref = torch.cat([deit_tiny(x[i:i + 65]) for i in range(0, len(x), 65)])
        tomectl.apply(deit_tiny, r=13)
        red = torch.cat([deit_tiny(x[i:i + 65]) for i in range(0, len(x), 65)])
    c = compare(ref, red, y)
    # all 1,300 images: unreduced 80.2 % top-1, r=13 agrees on 93.2 % (see benchmarks/tome_accuracy.py)
    assert c.ref_top1 >= 0.74
    assert c.agreement >= 0.88
    assert c.top1 >= c.ref_top1 - 0.06
    assert c.kl < 0.2


def test_artifact_reproduces_apply(tmp_path, tiny_weights, val_images):
    from tomectl import compress, recipe
    from tomectl.schedule import Schedule

    x, _ = val_images
    out = tmp_path / "t13"
    compress.compress(recipe.Recipe(model="deit_tiny_patch16_224", schedule=Schedule(r=13)), out,
                      weights=tiny_weights)
    loaded = tomectl.load(out)
    direct = tomectl.apply(tomectl.models.create("deit_tiny_patch16_224", weights=tiny_weights).model, r=13)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x[:8]), direct(x[:8]))
