"""A reduced model: one object the commands share (compress, export, bench, calibrate, eval, train).

`Reduced` is built once from a recipe and a `Target` (backend, precision, batch). It owns what
the adapter installed: the method, the plan (merge formulation, proportional attention), the
learned modules, and prices its MACs from the plan *actually installed*, so what a report says
is what the graph computes. It is the only code outside the adapter that touches the adapter's
attributes; `tomectl.apply/remove/load` and `build.build` sit on top of it.

- `off()`: the reduction switched off and on again without reinstalling anything (hooks, plan
  and learned modules stay): the unreduced reference of eval, calibrate and the teacher of train.
- `replan(...)`: install another schedule, method or formulation in the same model.
- `export_onnx(...)`: the one export pipeline (`tomectl export`, `bench`, `calibrate` all call
  it), with the formulation the target's backend gets.

The merge formulation is chosen in one place, `Target.formulation_for`: graph backends
(onnxruntime, TensorRT) get "onehot" (see `export/__init__.py` for the measurement), eager and
compiled torch get the recipe's ("scatter" unless it says otherwise); an explicit `formulation`
on the target wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from . import models
from .adapters import adapter_for
from .errors import UserError
from .flops import MacsReport, analytic_macs, measured_macs
from .reduce import FORMULATIONS, get_method

#: every backend a command can run a reduced model on (bench, calibrate, eval's runners)
BACKENDS = ("torch", "torch-compile", "torch-cuda", "ort", "ort-cuda", "ort-trt", "trt")
GPU_BACKENDS = ("torch-cuda", "ort-cuda", "ort-trt", "trt")
#: backends that run an exported graph (ONNX, or a TensorRT engine built from one)
GRAPH_BACKENDS = ("ort", "ort-cuda", "ort-trt", "trt")
PRECISIONS = ("fp32", "fp16", "int8")
#: the merge formulation each graph runtime gets unless one is asked for (export/__init__.py says why)
GRAPH_FORMULATION = "onehot"


@dataclass(frozen=True)
class Target:
    """Where a reduced model will run: what decides the graph that is built, timed and shipped."""

    backend: str = "torch"
    precision: str = "fp32"
    batch: int = 1
    formulation: Optional[str] = None  # asked for; None: the backend's default

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise UserError(f"batch must be a whole number >= 1, got {self.batch!r}")
        if self.formulation is not None and self.formulation not in FORMULATIONS:
            raise UserError(f"unknown merge formulation {self.formulation!r}; "
                            f"choose one of {', '.join(FORMULATIONS)}")

    @property
    def graph(self) -> bool:
        """Whether this target runs an exported graph."""
        return self.backend in GRAPH_BACKENDS

    def formulation_for(self, recipe_formulation: str = "scatter") -> tuple[str, str]:
        """(merge formulation, why): the one policy every command uses."""
        if self.formulation is not None:
            return self.formulation, "asked for"
        if self.graph:
            runtime = "TensorRT" if self.backend in ("trt", "ort-trt") else "onnxruntime"
            return GRAPH_FORMULATION, f"default for {runtime}"
        return recipe_formulation, "the recipe's"

    @staticmethod
    def for_export(trt: bool, batch: int = 1, precision: str = "fp32",
                   formulation: Optional[str] = None) -> "Target":
        return Target("trt" if trt else "ort", precision, batch, formulation)


def plan_of(model: nn.Module):
    """The reduction plan installed in `model`, or None (a plain model or not a supported family)."""
    try:
        adapter = adapter_for(model)
    except UserError:
        return None
    return adapter.plan_of(model)


def learned_modules(model: nn.Module) -> Optional[nn.ModuleDict]:
    """The learned method's parameters installed in `model`, or None."""
    try:
        adapter = adapter_for(model)
    except UserError:
        return None
    return adapter.learned_modules(model)


def summary_of(model: nn.Module) -> Optional[dict]:
    """The installed reduction as the export's sidecar and reports record it (None: plain model)."""
    from .schedule import token_counts

    plan = plan_of(model)
    if plan is None:
        return None
    return {"method": plan.method, "removed_per_layer": list(plan.removed),
            "tokens_per_layer": token_counts(plan.removed, adapter_for(model).num_tokens(model)),
            "prop_attn": plan.prop_attn, "formulation": plan.formulation}


def replan(model: nn.Module, **changes) -> nn.Module:
    """Install the model's current plan with `changes` (removed, method, options, formulation,
    prop_attn, track_source); learned modules stay where they still fit. Nothing happens when the
    plan is unchanged."""
    adapter = adapter_for(model)
    plan = adapter.plan_of(model)
    if plan is None:
        raise ValueError("no reduction is installed in this model")
    if "removed" in changes:
        changes["removed"] = tuple(changes["removed"])
    new = dataclasses.replace(plan, **changes)
    if new != plan:
        adapter.install(model, new)
    return model


def plain_state_dict(model: nn.Module) -> dict:
    """The model's state_dict without the reduction's learned modules: what the plain timm model loads."""
    modules = learned_modules(model)
    if modules is None:
        return model.state_dict()
    prefix = next(name for name, m in model.named_modules() if m is modules) + "."
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}


@contextlib.contextmanager
def reduction_off(model: nn.Module):
    """The model computes what the plain timm model computes (same weights) inside the block; the
    reduction is switched back on afterwards. Nothing is reinstalled. A plain model is left alone."""
    if plan_of(model) is None:
        yield model
        return
    adapter = adapter_for(model)
    before = adapter.set_enabled(model, False)
    try:
        yield model
    finally:
        adapter.set_enabled(model, before)


class Reduced:
    """A timm model with a token reduction installed, and what it was built from and for."""

    def __init__(self, loaded: models.LoadedModel, recipe, target: Target = Target()):
        self.loaded = loaded
        self.recipe = recipe
        self.target = target
        self.adapter = adapter_for(loaded.model)
        if self.adapter.plan_of(loaded.model) is None:
            raise ValueError("Reduced wraps a model whose reduction is installed (use build.build)")

    # --- what it is ---------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def plan(self):
        return self.adapter.plan_of(self.model)

    @property
    def removed(self) -> list[int]:
        return list(self.plan.removed)

    @property
    def tokens(self) -> list[int]:
        from .schedule import token_counts

        return token_counts(self.plan.removed, self.adapter.num_tokens(self.model))

    @property
    def formulation(self) -> str:
        return self.plan.formulation

    @property
    def method(self):
        return get_method(self.plan.method, self.plan.options)

    @property
    def modules(self) -> Optional[nn.ModuleDict]:
        return self.adapter.learned_modules(self.model)

    def macs(self) -> MacsReport:
        """MACs per image of the plan installed now (its formulation included), analytically."""
        plan = self.plan
        return analytic_macs(self.adapter.dims(self.model), plan.removed, self.method, plan.formulation)

    def macs_for(self, target: Target) -> MacsReport:
        """MACs per image of this plan in the formulation `target` gets (nothing is reinstalled)."""
        plan = self.plan
        formulation, _ = target.formulation_for(self.recipe.formulation)
        return analytic_macs(self.adapter.dims(self.model), plan.removed, self.method, formulation)

    def base_macs(self) -> MacsReport:
        return analytic_macs(self.adapter.dims(self.model), [0] * len(self.plan.removed))

    def measured_macs(self) -> int:
        """MACs per image of one forward under torch's FlopCounterMode (the installed plan)."""
        return measured_macs(self.model, models.preprocessing(self.model)["input_size"])

    def summary(self) -> dict:
        """The reduction as the export's sidecar and reports record it."""
        return summary_of(self.model)

    # --- changing it --------------------------------------------------------------------------

    def unreduced_logits(self, images: torch.Tensor):
        """numpy logits of the unreduced fp32 model (this model, reduction off) on `images`: the
        reference a reduced-precision graph or engine is judged against."""
        from .runtime import predict

        with self.off():
            return predict(self.model, images).numpy()

    def off(self):
        """Context manager: the unreduced model (timm's own forward, same weights), then back on."""
        return reduction_off(self.model)

    def replan(self, **changes) -> "Reduced":
        """Install the current plan with `changes` (removed, method, options, formulation,
        prop_attn, track_source) in the same model; learned modules stay where they still fit."""
        replan(self.model, **changes)
        return self

    def retarget(self, target: Target) -> "Reduced":
        """Aim the model at `target`: its merge formulation is installed (numbers do not change)."""
        formulation, _ = target.formulation_for(self.recipe.formulation)
        self.target = target
        if target.graph:  # graphs never track sources (nothing reads them there)
            return self.replan(formulation=formulation, track_source=False)
        return self.replan(formulation=formulation)

    # --- running and exporting it -------------------------------------------------------------

    def runner(self):
        """Image batch -> logits (CPU float) on this process's torch backend, under inference mode."""
        from .runtime import torch_runner

        return torch_runner(self.model)

    def export_onnx(self, out: str | Path, *, check_inputs=None, atol: Optional[float] = None,
                    simplify: bool = True, meta: Optional[dict] = None, progress=None, precision=None,
                    fp32_export=None):
        """The ONNX graph for this target (its batch, formulation and precision), checked against
        PyTorch: the one export pipeline of `tomectl export`, `bench` and `calibrate`.

        precision: `export.precision.PrecisionOptions` (default: the target's precision with the
        default int8 mode); an int8/fp16 graph is made from the checked fp32 one and validated
        against the unreduced model before it is written.
        fp32_export: the OnnxExportResult of this same export in fp32, already written and checked
        (bench's fp32 row of the same configuration): the int8/fp16 graph starts from its file
        instead of exporting it again (the exporter is deterministic: the same bytes)."""
        from .export.onnx import ATOL, DEFAULT_CHECK_IMAGES, check_inputs_for, export_onnx
        from .export.precision import PrecisionOptions, export_precision

        opts = precision or PrecisionOptions(self.target.precision)
        if opts.precision != "fp32":
            def fp32(path: Path):
                if fp32_export is None:
                    return self.export_onnx(path, check_inputs=check_inputs, atol=atol, simplify=simplify,
                                            meta=meta, progress=progress)
                return _copy_export(fp32_export, Path(path))

            self.target = dataclasses.replace(self.target, precision="fp32")  # the graph it starts from
            try:
                return export_precision(self, out, opts, fp32, progress)
            finally:
                self.target = dataclasses.replace(self.target, precision=opts.precision)

        if check_inputs is None:  # the same images `tomectl export` checks on by default
            check_inputs = check_inputs_for(self.model, max(DEFAULT_CHECK_IMAGES, self.target.batch))
        if not self.target.graph:
            self.retarget(Target("ort", self.target.precision, self.target.batch, self.target.formulation))
        else:
            self.retarget(self.target)
        return export_onnx(self.model, out, batch=self.target.batch,
                           input_size=tuple(models.preprocessing(self.model)["input_size"]),
                           check_inputs=check_inputs, simplify=simplify, atol=ATOL if atol is None else atol,
                           meta={**self.sidecar_meta(), **(meta or {})}, progress=progress,
                           reduction=self.summary())

    def sidecar_meta(self) -> dict:
        """What an exported file's sidecar records of its origin: model, weights, recipe (with the
        formulation installed), GMACs priced on that formulation."""
        return {"model": self.recipe.model, "weights": self.loaded.weights.to_dict(),
                "recipe": dataclasses.replace(self.recipe, formulation=self.formulation).to_dict(),
                "gmacs": round(self.macs().gmacs, 4), "gmacs_base": round(self.base_macs().gmacs, 4)}


def _copy_export(res, path: Path):
    """A copy of the checked export `res` (file and sidecar) at `path`: its result, moved there."""
    import copy
    import shutil

    if res.precision != "fp32" or not Path(res.path).is_file() or not Path(res.sidecar or "").is_file():
        raise ValueError("fp32_export must be a written fp32 export with its sidecar")
    side = path.with_name(path.name + ".json")
    shutil.copyfile(res.path, path)
    shutil.copyfile(res.sidecar, side)
    out = copy.deepcopy(res)
    out.path, out.sidecar = str(path), str(side)
    return out


def check_backends(backends: Sequence[str]) -> list[str]:
    """The distinct backends asked for, each checked to be runnable here (one-line UserError)."""
    from .runtime import ORT_PROVIDERS

    out = list(dict.fromkeys(backends))
    if not out:
        raise UserError("give at least one backend (e.g. --backend torch,ort)")
    for b in out:
        if b not in BACKENDS:
            raise UserError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    gpu = [b for b in out if b in GPU_BACKENDS]
    if gpu and not torch.cuda.is_available():
        raise UserError(f"backend {gpu[0]} needs a CUDA GPU and none is visible; use torch or ort")
    for b in out:
        if b in ORT_PROVIDERS and b != "ort":
            import onnxruntime as ort

            have = ort.get_available_providers()
            if ORT_PROVIDERS[b][0] not in have:
                raise UserError(f"backend {b} needs onnxruntime's {ORT_PROVIDERS[b][0]}, which this install "
                                f"lacks (available: {', '.join(have)})")
        if b == "trt":
            try:
                import tensorrt  # noqa: F401
            except ImportError:
                raise UserError("backend trt needs TensorRT (pip install 'tomectl[trt]') and a GPU") from None
    return out
