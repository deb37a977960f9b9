"""Build a reduced model: a recipe (or keyword arguments) -> a timm model with the reduction installed.

This is what every command starts from (compress, export, eval, bench, calibrate), and what the
Python API exposes as `tomectl.apply` and `tomectl.load`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from . import models
from .adapters import adapter_for
from .artifact import load_learned
from .errors import UserError
from .recipe import Recipe, check_formulation, check_method, check_method_options
from .reduce import get_method
from .reduced import Reduced, Target
from .schedule import Schedule, resolve, token_counts

#: what `build` returns: a reduced model and what it was built from (see `tomectl.reduced`)
Built = Reduced


def plan_for(model: nn.Module, method: str, schedule: Schedule,
             options: Optional[dict] = None) -> tuple[object, list[int]]:
    """Resolve `schedule` for `model` (validated against what `method`, with its `options`, can remove
    and at which layers it acts)."""
    adapter = adapter_for(model)
    adapter.check_supported(model)
    m = get_method(method, options)
    n_layers = adapter.num_layers(model)
    removed = resolve(schedule, n_layers, adapter.num_tokens(model), adapter.protected_tokens(model),
                      m.capacity, m.layers(n_layers))
    return adapter, removed


def install(model: nn.Module, method: str, removed: Sequence[int], prop_attn: bool = True,
            formulation: str = "scatter", track_source: bool = False,
            options: Optional[dict] = None) -> nn.Module:
    adapter = adapter_for(model)
    plan = adapter.ReductionPlan(method=method, removed=tuple(removed), prop_attn=prop_attn,
                                 formulation=formulation, track_source=track_source,
                                 options=dict(options or {}))
    return adapter.install(model, plan)


def apply(model: nn.Module, method: str = "tome", r: Optional[int] = None, *, inflect: Optional[float] = None,
          per_layer: Optional[Sequence[int]] = None, keep: Optional[float] = None, prop_attn: bool = True,
          formulation: str = "scatter", track_source: bool = False,
          options: Optional[dict] = None) -> nn.Module:
    """Install a token reduction into a timm ViT in place and return it.

    >>> model = tomectl.apply(timm.create_model("deit_small_patch16_224", pretrained=True), r=13)
    >>> model = tomectl.apply(model, "evit", keep=0.3, options={"layers": [3, 6, 9]})

    Exactly one of `r` (with optional `inflect`), `per_layer` or `keep` gives the schedule;
    `options` are the method's own (see its `option_defaults`).
    """
    check_method(method)
    check_formulation(formulation, "formulation")
    options = check_method_options(method, options)
    schedule = Schedule.make(r=r, inflect=inflect, per_layer=per_layer, keep=keep)
    _, removed = plan_for(model, method, schedule, options)
    return install(model, method, removed, prop_attn, formulation, track_source, options)


def _weights_from_recipe(recipe: Recipe, weights, random_weights: bool):
    """CLI flags win; else what the recipe (or artifact) recorded; else the default resolution."""
    if weights is not None or random_weights:
        return weights, random_weights, None
    w = recipe.weights
    if not w:
        return None, False, None
    if w["source"] == "random":
        return None, True, None
    if w["source"] in ("file", "dir"):
        path = Path(w["path"])
        if not path.is_file():
            raise UserError(f"the recipe's weights file {path} is gone; pass --weights FILE")
        return path, False, w.get("sha256")
    return None, False, None  # hub


def build(recipe: Recipe, weights: Optional[str | Path] = None, random_weights: bool = False,
          track_source: bool = False, allow_untrained: bool = False, target: Target = Target(),
          **model_kwargs) -> Reduced:
    """Create the model of `recipe` and install its reduction (with its learned parameters, if any),
    in the merge formulation `target` gets (see `reduced.Target.formulation_for`).

    A learned method whose untrained parameters are meaningless (PatchMerger, LTM) is refused
    without `recipe.learned` unless `allow_untrained` (what `tomectl train` starts from)."""
    wfile, rnd, sha = _weights_from_recipe(recipe, weights, random_weights)
    loaded = models.create(recipe.model, weights=wfile, random_weights=rnd, **model_kwargs)
    if sha and loaded.weights.sha256 and sha != loaded.weights.sha256:
        raise UserError(
            f"weights {loaded.weights.path} changed since the artifact was made (sha256 differs); "
            "pass --weights FILE to use them anyway"
        )
    _, removed = plan_for(loaded.model, recipe.method, recipe.schedule, recipe.method_options)
    tokens = token_counts(removed, adapter_for(loaded.model).num_tokens(loaded.model))
    for key, value in (("removed_per_layer", removed), ("tokens_per_layer", tokens)):
        if key in recipe.resolved and list(recipe.resolved[key]) != value:
            raise UserError(f"recipe's {key} {recipe.resolved[key]} does not match its schedule ({value})")
    formulation, _ = target.formulation_for(recipe.formulation)
    install(loaded.model, recipe.method, removed, recipe.prop_attn, formulation, track_source,
            recipe.method_options)
    method = get_method(recipe.method, recipe.method_options)
    if method.learned:
        if recipe.learned:
            load_learned(loaded.model, recipe.learned["path"], recipe.learned.get("sha256"))
        elif any(removed) and not method.usable_untrained and not allow_untrained:
            raise UserError(
                f"method {recipe.method!r} needs trained parameters and none are given; train them with "
                f"`tomectl train {recipe.model} --method {recipe.method} ...` and use the artifact it writes"
            )
    return Reduced(loaded, recipe, target)
