"""Static-shape ONNX export of a (reduced) timm ViT, checked before anything is written.

A fixed schedule gives fixed token counts at every layer, so a reduced ViT is an ordinary
static-shape graph at a fixed batch size. The export goes through torch's ONNX exporter (the
torch.export-based one, opset 18) and then through three checks, in this order; the file appears
at the output path only when all of them pass:

1. ``onnx.checker`` (full check, with shape inference);
2. onnxruntime (CPU) loads the graph: the legacy exporter writes ``scatter_reduce(sum)`` inside
   rank-check ``If`` nodes that onnxruntime refuses to load, for example;
3. parity with PyTorch on real images: max |logit difference| <= `atol` (1e-4) and 100 % top-1
   agreement in fp32. torch's exporter turns ``scatter_reduce(reduce="mean")`` into an unreduced
   ScatterElements *without any error* (wrong numbers), and its ``verify=True`` only logs large
   differences, so nothing short of running the graph can be trusted.

Graph simplification (onnxslim, when installed) is kept only where it removes nodes without
growing the file (it can fold index Expands into large constants) and passes the same parity
check. A JSON sidecar ``<out>.json`` records the input name and shape, the preprocessing a
deployment needs, the reduction, the parity figures and the versions.

ToMe sorts its edges with ``argsort(stable=True)``, which torch's exporter has no translation for
(``aten.sort.stable``). ONNX TopK is specified to break ties by the lower index, which is exactly
a stable sort, so it is exported as a TopK over the whole (static) axis with a constant K.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..artifact import atomic_file, write_json
from ..errors import UserError
from ..runtime import Status, chunks, ort_session, run_session

OPSET = 18  # the exporter's native opset; TensorRT 10 parses it (Gelu stays decomposed into Erf)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ATOL = 1e-4
DEFAULT_CHECK_IMAGES = 16
SLIM_MAX_GROWTH = 1.01  # onnxslim can fold index Expands into large constants: not worth one node
NEAR_TIE_EPS = 1e-6  # relative input noise that stands in for float rounding differences
NEAR_TIE_TRIES = 16
MAX_PROTO_BYTES = 2**31 - 1  # protobuf limit; larger models would need ONNX external data
SHARED_CALIB = ("data", "imagenet-train-1000")

Progress = Status  # export reports steps, not counts


class ExportCheckError(UserError):
    """An exported graph failed a check; nothing was written at the output path."""


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against PyTorch on the same inputs."""

    max_abs_diff: float
    top1_agreement: float
    n: int
    near_ties: int = 0  # inputs matched on a near-tie branch of the merge decisions (see near_tie_reference)

    def passed(self, atol: float) -> bool:
        return self.max_abs_diff <= atol and self.top1_agreement == 1.0

    def describe(self) -> str:
        ties = f", {self.near_ties} on merge near-ties" if self.near_ties else ""
        return (
            f"max |diff| {self.max_abs_diff:.2e}, top-1 agreement {self.top1_agreement:.1%} on {self.n} "
            f"inputs{ties}"
        )


@dataclass
class CheckInputs:
    """What the parity check runs on."""

    images: torch.Tensor  # [N, 3, H, W], preprocessed
    source: str  # "images from DIR" or "random inputs"
    warning: Optional[str] = None


@dataclass
class OnnxExportResult:
    path: str
    batch: int
    input_name: str
    input_shape: list[int]
    output_name: str
    output_shape: list[int]
    opset: int
    nodes: int  # as exported
    nodes_simplified: Optional[int]  # after onnxslim (None: not tried or not available)
    simplified: bool  # the written graph is the simplified one
    max_abs_diff: float
    top1_agreement: float
    n_check: int
    exporter: str
    near_ties: int = 0
    check_source: str = ""
    formulation: Optional[str] = None
    op_counts: dict = field(default_factory=dict)
    seconds: float = 0.0
    sidecar: Optional[str] = None
    sha256: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    precision: str = "fp32"
    conversion: Optional[dict] = None  # int8 / fp16: how the fp32 graph was converted
    precision_check: Optional[dict] = None  # int8 / fp16: `precision.PrecisionCheck.to_dict()`

    def to_dict(self) -> dict:
        return asdict(self)


# --- the translation torch's exporter lacks -----------------------------------------------------


def _sort_stable(self, *, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable -> ONNX TopK over the full axis (ties go to the lower index: stable)."""
    from onnxscript import opset18 as op

    k = self.shape[dim]
    if not isinstance(k, int):  # a symbolic size: never the case for our static graphs
        k = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    else:
        k = op.Constant(value_ints=[k])
    return op.TopK(self, k, axis=dim, largest=descending, sorted=True)


def _translations() -> dict:
    return {torch.ops.aten.sort.stable: _sort_stable}


# --- building blocks ----------------------------------------------------------------------------


def export_graph(model: nn.Module, example: torch.Tensor, opset: int = OPSET,
                 output_names: Sequence[str] = (OUTPUT_NAME,)):
    """Trace `model` on `example` (its batch size is baked in) and return the ONNX ModelProto.

    The exporter's chatter (progress lines, warnings) is captured; on failure its last lines go
    into the error.
    """
    log = io.StringIO()
    try:
        # no_grad: an inference graph. Learned methods' token sizes depend on parameters, and with
        # a grad-requiring attention mask torch's decomposition of timm's attention fails to export.
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                None,
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(output_names),
                custom_translation_table=_translations(),
                optimize=False,
                verbose=False,
            )
            return optimize_graph(program)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportCheckError(f"torch's ONNX exporter failed: {first[:300]}") from e


def optimize_graph(program):
    """The exporter's graph cleaned up: functions inlined, constants folded (with shape inference),
    dead nodes and duplicate initializers removed, common subexpressions merged; returns the proto.

    This is `onnxscript.optimizer.optimize_ir` (what `torch.onnx.export(optimize=True)` runs) without
    its pattern-rewrite pass. Measured on DeiT-Tiny ToMe r=13 (opset 18, onnxscript 0.7): the rewriter
    takes 25 of the export's 42 s, and all it changes is 70 Transposes and 2 Reshapes, which onnxslim
    removes as well (961 nodes after onnxslim either way, the same operators) and onnxruntime's own
    session optimizer handles (the same latency, batch 1, 1 thread, within 1 %). Each GELU is then
    put in the order onnxruntime fuses (`gelu_in_fusable_order`)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    import onnxscript.optimizer

    model = program.model
    common.InlinePass()(model)
    onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)
    proto = ir.serde.serialize_model(model)
    gelu_in_fusable_order(proto)
    return proto


#: bumped whenever the exporter writes different graphs for the same model (cached latency tables
#: key on it)
GRAPH_REVISION = 2  # 2: GELU in the order onnxruntime fuses


def gelu_in_fusable_order(proto) -> int:
    """Reassociate each exact GELU the exporter writes, ``x * ((1 + erf(x / sqrt2)) * 0.5)``, into
    ``(x * (1 + erf(x / sqrt2))) * 0.5``, the order onnxruntime's GeluFusion recognises (it then runs
    one Gelu kernel instead of five elementwise operators). The graph keeps only standard ONNX
    operators (TensorRT parses it as before) and the numbers do not move: multiplying by 0.5 is
    exact in floating point. Measured (DeiT-Tiny unreduced, onnxruntime 1.32 CPU, batch 1, 1
    thread, 7 interleaved rounds, against the same graph unchanged): int8 dynamic 1.08x faster
    [1.06-1.14 over rounds], fp32 1.03x (noisier); max |logit difference| 6e-7. Returns how many
    GELUs were rewritten."""
    from onnx import numpy_helper

    consts = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    users: dict[str, list] = collections.defaultdict(list)
    for n in proto.graph.node:
        for i in n.input:
            users[i].append(n)

    def only_user(name: str, op: str):
        us = users.get(name, [])
        return us[0] if len(us) == 1 and us[0].op_type == op else None

    def is_half(name: str) -> bool:
        t = consts.get(name)
        if t is None:
            return False
        v = numpy_helper.to_array(t)
        return v.size == 1 and float(v.reshape(-1)[0]) == 0.5

    count = 0
    for erf in [n for n in proto.graph.node if n.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        add = only_user(erf.output[0], "Add")
        if div is None or div.op_type != "Div" or add is None:
            continue
        x = div.input[0]
        scale = only_user(add.output[0], "Mul")
        if scale is None:
            continue
        half = [i for i in scale.input if i != add.output[0]]
        out = only_user(scale.output[0], "Mul")
        if len(half) != 1 or not is_half(half[0]) or out is None or sorted(out.input) != sorted(
                [x, scale.output[0]]):
            continue
        scale.input[:] = [x, add.output[0]]  # x * (1 + erf)
        out.input[:] = [scale.output[0], half[0]]  # ... * 0.5
        count += 1
    return count


def check_graph(path: str | Path) -> None:
    """onnx.checker's full check (types and shapes); raises ExportCheckError."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportCheckError(f"the exported graph fails onnx.checker: {_first_line(e)}") from e


def load_session(path: str | Path, threads: Optional[int] = None):
    """`ort_session`, with a graph onnxruntime refuses turned into an ExportCheckError."""
    try:
        return ort_session(path, threads)
    except Exception as e:
        raise ExportCheckError(f"onnxruntime cannot load the exported graph: {_first_line(e)}") from e


@torch.no_grad()
def run_torch(model: nn.Module, images: torch.Tensor, batch: int) -> np.ndarray:
    """PyTorch logits in the same fixed-size batches the exported graph sees."""
    out = []
    for chunk, real in chunks(images, batch):
        out.append(model(chunk).float().numpy()[:real])
    return np.concatenate(out)


def parity(reference: np.ndarray, logits: np.ndarray) -> Parity:
    """Max |logit difference| and top-1 agreement of `logits` against `reference` (fp32 parity)."""
    reference = np.asarray(reference, dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    diff = float(np.abs(reference - logits).max()) if reference.size else 0.0
    agree = float((reference.argmax(-1) == logits.argmax(-1)).mean()) if len(reference) else 1.0
    return Parity(max_abs_diff=diff, top1_agreement=agree, n=len(reference))


def op_counts(model_proto) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model_proto.graph.node).most_common())


def simplify(model_proto):
    """onnxslim's simplification, or None when onnxslim is not installed."""
    try:
        import onnxslim
    except ImportError:
        return None
    log = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        warnings.simplefilter("ignore")
        return onnxslim.slim(model_proto)


def readable(*paths: Path) -> None:
    """Give files the mode the umask allows (the atomic temp files are created 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in paths:
        os.chmod(p, 0o666 & ~umask)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(e).__name__


def _shape(value_info) -> list[int]:
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _save(model_proto, path: Path) -> None:
    import onnx

    if model_proto.ByteSize() > MAX_PROTO_BYTES:
        raise UserError(
            "the model is over 2 GB, which needs ONNX external data; tomectl cannot export it yet"
        )
    onnx.save(model_proto, str(path))


# --- check inputs -------------------------------------------------------------------------------


def shared_calibration_dir() -> Optional[Path]:
    """The project's shared calibration images (../shared beside the checkout, or $TOMECTL_SHARED)."""
    roots = [
        os.environ.get("TOMECTL_SHARED"),
        Path.cwd().parent / "shared",
        Path(__file__).resolve().parents[3] / "shared",
    ]
    for root in roots:
        if root and (Path(root).joinpath(*SHARED_CALIB)).is_dir():
            return Path(root).joinpath(*SHARED_CALIB)
    return None


def check_inputs_for(
    model: nn.Module,
    n: int = DEFAULT_CHECK_IMAGES,
    images_dir: Optional[str | Path] = None,
    input_size: Optional[Sequence[int]] = None,
) -> CheckInputs:
    """`n` preprocessed images from `images_dir` (default: the shared calibration images), else
    seeded random inputs with a warning."""
    from .. import data
    from ..models import preprocessing

    pre = preprocessing(model)
    if input_size is not None:
        pre["input_size"] = list(input_size)
    root = Path(images_dir) if images_dir is not None else shared_calibration_dir()
    if root is not None:
        images = data.load_images(root, pre, n, resize="timm")
        return CheckInputs(images, f"{len(images)} images from {root}")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, *pre["input_size"], generator=gen)
    return CheckInputs(
        images,
        f"{n} random inputs",
        "no images to check on (pass --calib-images DIR): parity was checked on random inputs",
    )


# --- the export ---------------------------------------------------------------------------------


def _preprocessing_or_none(model: nn.Module) -> Optional[dict]:
    from ..models import preprocessing

    try:
        return preprocessing(model)
    except Exception:  # not a timm model (tests export plain modules too)
        return None


def export_onnx(
    model: nn.Module,
    out: str | Path,
    *,
    batch: int = 1,
    input_size: Sequence[int] = (3, 224, 224),
    check_inputs: Optional[torch.Tensor | CheckInputs] = None,
    simplify: bool = True,
    atol: float = ATOL,
    opset: int = OPSET,
    meta: Optional[dict] = None,
    progress: Progress = None,
    reduction: Optional[dict] = None,
) -> OnnxExportResult:
    """Export `model` at a fixed `batch` to `out` (+ `<out>.json`), checked as the module says.

    check_inputs: preprocessed images [N, 3, H, W] (or a CheckInputs); None: the shared
                  calibration images when present, else random inputs (with a note).
    meta:         extra entries for the sidecar (model name, weights, recipe).
    reduction:    the reduction's summary for the sidecar (`Reduced.summary`); by default read from
                  the model (None for a plain model).
    Raises ExportCheckError (nothing written) when a check fails.
    """
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    say = progress or (lambda msg: None)
    out = Path(out)
    if reduction is None:
        from ..reduced import summary_of

        reduction = summary_of(model)
    t0 = time.perf_counter()
    model.eval()
    notes: list[str] = []

    check_inputs = _as_check_inputs(check_inputs, model, input_size, say)
    if check_inputs.warning:
        notes.append(check_inputs.warning)
    images = check_inputs.images.float()

    say(f"exporting at batch {batch}...")
    example = images[:batch] if len(images) >= batch else next(chunks(images, batch))[0]
    proto = export_graph(model, example.contiguous(), opset)
    nodes = len(proto.graph.node)
    say(f"checking {nodes} nodes against PyTorch on {check_inputs.source}...")
    reference = run_torch(model, images, batch)

    sidecar = out.with_name(out.name + ".json")
    with tempfile.TemporaryDirectory(prefix="tomectl-export-") as td:
        raw = Path(td) / "exported.onnx"
        _save(proto, raw)
        parity = graph_parity(raw, reference, images, batch, model, atol)
        if not parity.passed(atol):
            raise ExportCheckError(f"the exported graph does not match PyTorch ({parity.describe()}; "
                                   f"need <= {atol:g} and 100 %); nothing was written to {out}")
        chosen, final_parity, nodes_simplified, simplified = raw, parity, None, False
        if simplify:
            say("simplifying with onnxslim...")
            def check(path: Path) -> Parity:
                return graph_parity(path, reference, images, batch, model, atol)

            nodes_simplified, slim = _simplified(proto, Path(td) / "simplified.onnx", notes, check, atol)
            if slim is not None:
                chosen, final_parity, simplified, proto = slim

        if final_parity.near_ties:
            notes.append(f"{final_parity.near_ties} of {final_parity.n} check inputs sit on a merge "
                         "near-tie (candidates within rounding): matched against PyTorch on a "
                         "rounding-sized perturbation")
        from ..models import sha256_of

        result = OnnxExportResult(
            path=str(out), batch=batch, input_name=INPUT_NAME, input_shape=_shape(proto.graph.input[0]),
            output_name=OUTPUT_NAME, output_shape=_shape(proto.graph.output[0]), opset=opset, nodes=nodes,
            nodes_simplified=nodes_simplified, simplified=simplified, max_abs_diff=final_parity.max_abs_diff,
            top1_agreement=final_parity.top1_agreement, n_check=final_parity.n,
            near_ties=final_parity.near_ties,
            exporter=f"torch.onnx (torch.export-based, torch {torch.__version__})",
            check_source=check_inputs.source, op_counts=op_counts(proto),
            formulation=(reduction or {}).get("formulation"), sidecar=str(sidecar), sha256=sha256_of(chosen),
            notes=notes,
        )
        result.seconds = round(time.perf_counter() - t0, 2)
        with atomic_file(sidecar) as tmp_json, atomic_file(out) as tmp_onnx:
            shutil.copyfile(chosen, tmp_onnx)
            write_json(tmp_json, sidecar_document(result, model, atol, meta, reduction))
            readable(tmp_onnx, tmp_json)
    return result


def _as_check_inputs(check_inputs, model: nn.Module, input_size: Sequence[int], say) -> CheckInputs:
    """The parity check's inputs: as given (a tensor or CheckInputs), else the default images."""
    if check_inputs is None:
        say("loading check images...")
        check_inputs = check_inputs_for(model, DEFAULT_CHECK_IMAGES, input_size=input_size)
    if isinstance(check_inputs, torch.Tensor):
        check_inputs = CheckInputs(check_inputs, f"{len(check_inputs)} given inputs")
    shape = tuple(check_inputs.images.shape[1:])
    if shape != tuple(input_size):
        raise UserError(f"check images have shape {shape}, the model takes {tuple(input_size)}")
    return check_inputs


def graph_parity(
    path: Path,
    reference: np.ndarray,
    images: torch.Tensor,
    batch: int,
    model: Optional[nn.Module] = None,
    atol: float = ATOL,
) -> Parity:
    """All three checks of the module docstring on the graph at `path`; ExportCheckError if one
    cannot run. With `model`, inputs that sit on a merge near-tie are matched as
    `near_tie_reference` explains."""
    check_graph(path)
    session = load_session(path)
    try:
        logits = run_session(session, images, batch)
    except Exception as e:
        raise ExportCheckError(f"onnxruntime fails running the exported graph: {_first_line(e)}") from e
    ties = 0
    if model is not None:  # ties are told apart at the strict tolerance even where `atol` is looser
        reference, ties = near_tie_reference(model, images, reference, logits, min(atol, ATOL))
    p = parity(reference, logits)
    return Parity(p.max_abs_diff, p.top1_agreement, p.n, ties)


@torch.no_grad()
def near_tie_reference(
    model: nn.Module,
    images: torch.Tensor,
    reference: np.ndarray,
    logits: np.ndarray,
    atol: float = ATOL,
    eps: float = NEAR_TIE_EPS,
    tries: int = NEAR_TIE_TRIES,
):
    """Reference logits with near-tie inputs resolved; returns (reference, how many were resolved).

    Token merging decides by comparisons (argmax, sorting of similarities). Where two candidates
    are within float rounding of each other (gaps of 1e-7 occur, especially with random weights),
    onnxruntime and PyTorch, both correct, may take different branches, and the logits then
    differ by far more than `atol`. For each input that misses the tolerance, PyTorch is run on
    `tries` copies perturbed by noise of size `eps` (rounding-sized): when one of them lands
    within `atol` of onnxruntime, with the same top-1, the difference is a near-tie, and that
    output becomes the reference. A wrong graph is not explained this way: its error is not
    confined to inputs whose decisions hinge on rounding.
    """
    reference = reference.copy()
    bad = np.flatnonzero(
        (np.abs(reference - logits).max(-1) > atol) | (reference.argmax(-1) != logits.argmax(-1))
    )
    resolved = 0
    gen = torch.Generator().manual_seed(0)
    for i in bad:
        x = images[i : i + 1]
        noisy = x + eps * torch.randn((tries, *x.shape[1:]), generator=gen) * x.abs().amax().clamp(min=1.0)
        outs = model(noisy).float().numpy()
        err = np.abs(outs - logits[i]).max(-1)
        ok = np.flatnonzero((err <= atol) & (outs.argmax(-1) == logits[i].argmax()))
        if len(ok):
            reference[i] = outs[ok[np.argmin(err[ok])]]
            resolved += 1
    return reference, resolved


def _simplified(proto, path: Path, notes: list, check: Callable[[Path], Parity], atol: float):
    """onnxslim's version of `proto`, kept only where it has fewer nodes, does not grow the file and
    passes `check` at `atol`: (its node count or None, (path, parity, True, graph) or None). Why it
    was not kept goes into `notes`."""
    slim, why = _try_simplify(proto)
    if slim is None:
        notes.append(why)
        return None, None
    nodes, n_slim = len(proto.graph.node), len(slim.graph.node)
    grew = slim.ByteSize() / max(proto.ByteSize(), 1)
    if n_slim >= nodes:
        notes.append(f"onnxslim gave {n_slim} nodes for {nodes}: kept the exported one")
        return n_slim, None
    if grew > SLIM_MAX_GROWTH:
        notes.append(f"onnxslim's graph is {grew:.2f}x larger (constants folded in): kept the exported one")
        return n_slim, None
    _save(slim, path)
    try:
        slim_parity = check(path)
    except ExportCheckError:
        slim_parity = None
    if slim_parity is None or not slim_parity.passed(atol):
        notes.append("onnxslim's graph lost parity with PyTorch: kept the exported graph")
        return n_slim, None
    return n_slim, (path, slim_parity, True, slim)


def _try_simplify(proto):
    """(simplified graph, None) or (None, why not)."""
    try:
        slim = simplify(proto)
    except Exception as e:  # onnxslim failing is not a reason to fail the export
        return None, f"onnxslim failed ({_first_line(e)}): graph not simplified"
    if slim is None:
        return None, "onnxslim is not installed: graph not simplified (pip install onnxslim)"
    return slim, None


def sidecar_document(result: OnnxExportResult, model: nn.Module, atol: float, meta: Optional[dict],
                     reduction: Optional[dict] = None) -> dict:

    doc = {
        "file": Path(result.path).name,
        "sha256": result.sha256,
        "input": {
            "name": result.input_name,
            "shape": result.input_shape,
            "dtype": "float32",
            "layout": "NCHW",
        },
        "output": {"name": result.output_name, "shape": result.output_shape, "dtype": "float32"},
        "batch": result.batch,
        "preprocessing": _preprocessing_or_none(model),
        "reduction": reduction,
        "graph": {
            "opset": result.opset,
            "nodes": result.nodes,
            "nodes_simplified": result.nodes_simplified,
            "simplified": result.simplified,
            "op_counts": result.op_counts,
        },
        "parity": {
            "reference": "PyTorch fp32",
            "runtime": "onnxruntime CPU",
            "inputs": result.check_source,
            "n": result.n_check,
            "max_abs_diff": result.max_abs_diff,
            "top1_agreement": result.top1_agreement,
            "atol": atol,
            "near_ties": result.near_ties,
        },
        "exporter": result.exporter,
    }
    return stamped(doc, meta)


def stamped(doc: dict, meta: Optional[dict]) -> dict:
    """A sidecar document with the versions and time it was made, and the caller's `meta` on top
    (model, weights, recipe): the tail every exported file's JSON shares (ONNX, engines)."""
    from ..provenance import now, versions

    doc.update(versions=versions(), created=now())
    if meta:
        doc.update(meta)
    return doc

