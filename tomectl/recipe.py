"""Recipes: model + method + schedule, as YAML. Artifacts store the same format, resolved.

    model: deit_small_patch16_224
    method: tome
    schedule: {r: 13}                  # see schedule.py for the four shapes
    options: {prop_attn: true, formulation: scatter}   # + the method's own, e.g. evit {layers: [3, 6, 9]}
    weights: path/to/file.safetensors  # optional; or {source, path, sha256} as artifacts write it
    learned: learned.safetensors       # learned methods: their trained parameters ({path, sha256});
                                       # a relative path is relative to the recipe file
    precision: {precision: int8, int8_mode: dynamic}   # optional: the graph precision it was
                                       # calibrated for (`tomectl export` writes it by default)

An artifact's recipe.yaml adds what compress resolved (``removed_per_layer``, ``tokens_per_layer``,
``tomectl_version``); when read back these are checked against a fresh resolution.
Unknown keys and bad values are refused with the key's name. `options` holds the options every
method shares (OPTION_KEYS) and the chosen method's own (its `option_defaults`: ToFu's
``transition`` and ``norm``, EViT's ``layers``, BAT's ``layers``, ``clusters``, ``pairs``, ``knn``);
the latter are kept in `Recipe.method_options` and handed to the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError, read_input
from .reduce import FORMULATIONS, METHODS, get_method
from .schedule import Schedule

TOP_KEYS = ("model", "method", "schedule", "options", "weights", "learned", "precision")
PRECISION_KEYS = ("precision", "int8_mode", "calib_method", "n_calib")
LEARNED_KEYS = ("path", "sha256")
RESOLVED_KEYS = ("removed_per_layer", "tokens_per_layer", "tomectl_version")
OPTION_KEYS = ("prop_attn", "formulation")
WEIGHTS_KEYS = ("source", "path", "sha256")


@dataclass(frozen=True)
class Recipe:
    model: str
    schedule: Schedule
    method: str = "tome"
    prop_attn: bool = True
    formulation: str = "scatter"
    weights: Optional[dict] = None  # {source, path, sha256}; None: resolve as models.create does
    resolved: dict = field(default_factory=dict)  # removed_per_layer, tokens_per_layer (artifacts)
    method_options: dict = field(default_factory=dict)  # the method's own options, as given
    learned: Optional[dict] = None  # {path, sha256?}: trained parameters of a learned method
    precision: Optional[dict] = None  # the graph's precision ({precision, int8_mode, ...}); None: fp32

    @property
    def options(self) -> dict:
        return {"prop_attn": self.prop_attn, "formulation": self.formulation, **self.method_options}

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "model": self.model,
            "method": self.method,
            "schedule": self.schedule.to_dict(),
            "options": self.options,
        }
        if self.weights:
            d["weights"] = dict(self.weights)
        if self.learned:
            d["learned"] = dict(self.learned)
        if self.precision:
            d["precision"] = dict(self.precision)
        return d


def check_method(method: Any, where: str = "method") -> str:
    if method not in METHODS:
        raise UserError(f"{where}: unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    return method


def check_method_options(method: str, options: Any, where: str = "options") -> dict:
    """Validate a method's own options by building the method with them (one-line UserError)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise UserError(f"{where} must be a mapping, got {options!r}")
    try:
        get_method(method, options)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return dict(options)


def check_formulation(value: Any, where: str = "options.formulation") -> str:
    if value not in FORMULATIONS:
        raise UserError(f"{where} must be one of {', '.join(FORMULATIONS)}, got {value!r}")
    return value


def from_dict(d: Any, where: str = "recipe") -> Recipe:
    if not isinstance(d, dict):
        kind = ("a list" if isinstance(d, list) else "nothing" if d is None
                else f"the {type(d).__name__} {d!r:.40}")
        raise UserError(f"{where} must be a YAML mapping with keys {', '.join(TOP_KEYS)}; it holds {kind}")
    unknown = [k for k in d if k not in TOP_KEYS + RESOLVED_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(TOP_KEYS)}")
    if not isinstance(d.get("model"), str) or not d["model"]:
        raise UserError(f"{where}: 'model' must name a timm model, got {d.get('model')!r}")
    method = check_method(d.get("method", "tome"), f"{where}: method")
    if "schedule" not in d:
        raise UserError(f"{where}: missing 'schedule' (e.g. schedule: {{r: 13}})")
    schedule = Schedule.from_dict(d["schedule"], f"{where}: schedule")

    opts = d.get("options") or {}
    if not isinstance(opts, dict):
        raise UserError(f"{where}: 'options' must be a mapping, got {opts!r}")
    own = tuple(METHODS[method].option_defaults)
    bad = [k for k in opts if k not in OPTION_KEYS + own]
    if bad:
        raise UserError(f"{where}: unknown option {bad[0]!r}; allowed: {', '.join(OPTION_KEYS + own)}")
    method_options = check_method_options(method, {k: v for k, v in opts.items() if k in own},
                                          f"{where}: options")
    prop_attn = opts.get("prop_attn", True)
    if not isinstance(prop_attn, bool):
        raise UserError(f"{where}: options.prop_attn must be true or false, got {prop_attn!r}")
    formulation = check_formulation(opts.get("formulation", "scatter"), f"{where}: options.formulation")

    weights = d.get("weights")
    if isinstance(weights, str):
        weights = {"source": "file", "path": weights}
    elif isinstance(weights, dict):
        bad = [k for k in weights if k not in WEIGHTS_KEYS]
        if bad:
            raise UserError(f"{where}: unknown weights key {bad[0]!r}; allowed: {', '.join(WEIGHTS_KEYS)}")
        if weights.get("source") not in ("file", "dir", "hub", "random"):
            raise UserError(f"{where}: weights.source must be file, dir, hub or random, "
                            f"got {weights.get('source')!r}")
        if weights["source"] in ("file", "dir") and not isinstance(weights.get("path"), str):
            raise UserError(f"{where}: weights.path is needed for source {weights['source']}")
    elif weights is not None:
        raise UserError(f"{where}: 'weights' must be a file path or a mapping, got {weights!r}")

    learned = d.get("learned")
    if isinstance(learned, str):
        learned = {"path": learned}
    elif isinstance(learned, dict):
        bad = [k for k in learned if k not in LEARNED_KEYS]
        if bad:
            raise UserError(f"{where}: unknown learned key {bad[0]!r}; allowed: {', '.join(LEARNED_KEYS)}")
        if not isinstance(learned.get("path"), str):
            raise UserError(f"{where}: learned.path must be a file path")
    elif learned is not None:
        raise UserError(f"{where}: 'learned' must be a file path or a mapping, got {learned!r}")
    if learned is not None and not METHODS[method].learned:
        raise UserError(f"{where}: method {method!r} has no learned parameters, "
                        "but the recipe gives 'learned'")

    precision = _precision(d.get("precision"), where)
    resolved = {k: d[k] for k in RESOLVED_KEYS if k in d}
    for k in ("removed_per_layer", "tokens_per_layer"):
        v = resolved.get(k)
        if v is not None and not (isinstance(v, list) and all(isinstance(i, int) for i in v)):
            raise UserError(f"{where}: {k} must be a list of whole numbers")
    return Recipe(
        model=d["model"], schedule=schedule, method=method, prop_attn=prop_attn,
        formulation=formulation, weights=weights, resolved=resolved, method_options=method_options,
        learned=learned, precision=precision,
    )


def _precision(value: Any, where: str) -> Optional[dict]:
    """The recipe's `precision` (a name or a mapping) checked by building its export options."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"precision": value}
    if not isinstance(value, dict):
        raise UserError(f"{where}: 'precision' must be fp32, fp16, int8 or a mapping, got {value!r}")
    bad = [k for k in value if k not in PRECISION_KEYS]
    if bad:
        raise UserError(f"{where}: unknown precision key {bad[0]!r}; allowed: {', '.join(PRECISION_KEYS)}")
    from .export.precision import PrecisionOptions

    try:
        opts = PrecisionOptions(**value)
    except (TypeError, UserError) as e:
        raise UserError(f"{where}: precision: {e}") from None
    return None if opts.precision == "fp32" else opts.key()


EXPECTED = "a YAML mapping like `model: deit_small_patch16_224` / `schedule: {r: 13}` (UTF-8 text)"


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (line and column, 1-based)."""
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    hint = " (YAML indents with spaces, never tabs)" if "'\\t'" in str(problem) else ""
    return f"{problem}{where}{hint}"


def read_yaml(path: str | Path, what: str = "recipe") -> Any:
    """The YAML document in `path`; every way the file can be wrong is one UserError naming it."""
    path = Path(path)
    raw = read_input(path, f"{what} {path}", EXPECTED)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); "
                        f"expected {EXPECTED}") from None
    if "\x00" in text:
        raise UserError(f"{what} {path} is a binary file, not YAML; expected {EXPECTED}")
    if not text.strip():
        raise UserError(f"{what} {path} is empty; expected {EXPECTED}")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {_yaml_problem(e)}") from None


def load(path: str | Path) -> Recipe:
    path = Path(path)
    d = read_yaml(path)
    recipe = from_dict(d, where=str(path))
    if recipe.learned and not Path(recipe.learned["path"]).is_absolute():
        learned = {**recipe.learned, "path": str((path.parent / recipe.learned["path"]).resolve())}
        recipe = replace(recipe, learned=learned)
    return recipe
