"""Schedules: tokens per layer for each shape, and the errors that name the layer."""

import pytest

from tomectl.errors import UserError
from tomectl.reduce import ToMe
from tomectl.schedule import Schedule, layer_counts, resolve, token_counts

CAP = ToMe().capacity  # ToMe: at most half of the unprotected tokens per layer


def test_constant_r_tokens_per_layer_deit():
    removed = resolve(Schedule(r=13), 12, 197, 1, CAP)
    assert removed == [13] * 12
    assert token_counts(removed, 197) == [197, 184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54, 41]


def test_ramp_is_the_references_and_runs_from_2r_to_0():
    removed = layer_counts(Schedule(r=8, inflect=-1.0), 12, 197, 1)
    assert removed[0] == 16 and removed[-1] == 0
    # ToMe's reference truncates each layer's count, so the total is a little under constant r's
    assert removed == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0] and sum(removed) <= 8 * 12
    ramp13 = layer_counts(Schedule(r=13, inflect=-1.0), 12, 197, 1)
    assert ramp13 == [26, 23, 21, 18, 16, 14, 11, 9, 7, 4, 2, 0]
    assert all(a >= b for a, b in zip(removed, removed[1:], strict=False))  # decreasing
    inc = layer_counts(Schedule(r=8, inflect=0.5), 12, 197, 1)
    assert inc[0] == 4 and inc[-1] == 12


def test_keep_ratio_hits_the_final_count_exactly():
    removed = resolve(Schedule(keep=0.25), 12, 197, 1, CAP)
    final = token_counts(removed, 197)[-1]
    assert final == 1 + 49  # class token + 25 % of 196
    assert max(removed) - min(removed) <= 1


def test_r_is_capped_like_tome_but_explicit_lists_are_refused_with_the_layer():
    removed = resolve(Schedule(r=16), 12, 197, 1, CAP)
    assert removed[:11] == [16] * 11 and removed[11] == 10  # 21 tokens enter layer 11: 20 free, half = 10
    with pytest.raises(UserError, match="layer 11 would remove 16 tokens but only 10"):
        resolve(Schedule(per_layer=(16,) * 12), 12, 197, 1, CAP)
    with pytest.raises(UserError, match="layer 0 would remove 99"):
        resolve(Schedule(per_layer=(99,) + (0,) * 11), 12, 197, 1, CAP)
    with pytest.raises(UserError, match="layer"):
        resolve(Schedule(keep=0.001), 12, 197, 1, CAP)


@pytest.mark.parametrize("d,match", [
    ({"r": 13, "speed": 2}, "unknown key 'speed'"),
    ({"r": -1}, "r must be a whole number"),
    ({"r": 1.5}, "r must be a whole number"),
    ({"r": 13, "inflect": 3}, "inflect must be"),
    ({"inflect": 0.5}, "exactly one of"),
    ({"r": 8, "keep": 0.5}, "exactly one of"),
    ({"keep": 0}, "keep must be a fraction"),
    ({"per_layer": [1, -2]}, "per_layer must be"),
    ("r13", "must be a mapping"),
])
def test_bad_schedules_are_refused(d, match):
    with pytest.raises(UserError, match=match):
        Schedule.from_dict(d)


def test_per_layer_length_must_match_the_model():
    with pytest.raises(UserError, match="3 entries but the model has 12"):
        resolve(Schedule(per_layer=(1, 2, 3)), 12, 197, 1, CAP)
