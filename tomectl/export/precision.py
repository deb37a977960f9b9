"""Reduced precision that composes with token reduction: int8 and fp16 ONNX graphs, validated right.

A token-reduced graph holds two kinds of computation. The backbone's linear layers (qkv, proj,
MLP, patch embedding, head) are what int8 and fp16 are for. The reduction's own nodes *decide*:
the similarity and score matrices, the sorts (TopK) and ArgMax, the class-attention rows, the
one-hot assignment and the size bookkeeping (sums of sizes, the log-size attention bias).
Quantizing a decision node turns near-ties into different, equally good, choices at best, and at
worst collapses the scores so that every decision is wrong: onnxruntime's `quantize_static` run
over a whole ToMe graph, as a user would, keeps 0.3 % top-1 agreement on DeiT-Tiny r=13.

So the nodes converted are chosen from the graph, in one place (`quantizable_nodes`): the
MatMul/Gemm/Conv nodes of the backbone's `nn.Linear`/`nn.Conv2d` modules (read from the
exporter's node metadata; a constant 2-D/4-D weight input where the metadata is gone), never one
inside the method's learned modules, never one feeding only decisions (`trt_graph.decision_nodes`).
Everything else stays float.

int8 for onnxruntime (`onnxruntime.quantization`):
- "dynamic" (default): int8 weights, activations quantized at run time; no calibration; the patch
  embedding's convolution stays float (`dynamic_nodes`: onnxruntime's dynamic int8 Conv is slower
  than the float one). The default by measurement (`benchmarks/results/precision.md`, 2026-12-03:
  DeiT-Tiny, shared weights, onnxruntime 1.32 CPU, all 1,300 val images against the fp32
  unreduced model): at every schedule it agrees as much as static QDQ or more (r=13: 92.8 vs
  92.5 %, r=8: 95.6 vs 94.9 %, r=0: 98.2 vs 96.9 %, which tomectl's own check refuses for
  static), needs no calibration images, and ran faster at every schedule (DeiT-Tiny batch 1:
  2.13x vs 1.91x with r=13, 1.64x vs 1.51x without; DeiT-S batch 8: 3.65x vs 2.86x, 2.28x vs
  1.99x; medians of 3 rounds on a noisy machine).
- "static": QDQ, per-channel weights, calibrated on images (`--calib-images`, default the shared
  train images) by Entropy or Percentile or MinMax; the format TensorRT 11 (strongly typed,
  explicit Q/DQ) builds int8 engines from.

fp16 (`trt_graph.to_fp16`): inputs and outputs stay fp32, the decision nodes stay fp32.

Validation (`check_precision`): merges are discrete, so a reduced-precision graph is not held to
fp32 parity with the fp32 reduced graph (an fp16 ToMe graph of DeiT-Tiny r=13 takes an equally
good merge on some 5 % of images). Its top-1 agreement with the *unreduced fp32 model* is compared
with the fp32 reduced graph's, paired over the same check images, and it is refused when the drop
is shown to exceed `margin`: when the whole 95 % interval of the paired difference lies below
-margin. A point-estimate rule would refuse correct graphs by chance: on 256 images a correct fp16
graph's difference has a standard error of about 1.5 points (its merges flip on ~5 % of images,
half for better, half for worse). Both agreements and the interval are reported.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..adapters.vit import LEARNED_ATTR
from ..errors import UserError
from ..reduced import PRECISIONS

INT8_MODES = ("dynamic", "static")
DEFAULT_INT8_MODE = "dynamic"  # by measurement: see the module docstring
CALIB_METHODS = ("entropy", "percentile", "minmax")
DEFAULT_CALIB_METHOD = "entropy"
DEFAULT_CALIB_IMAGES = 64
DEFAULT_CHECK_IMAGES = 256  # the agreement difference needs a few hundred images to mean something
#: how far top-1 agreement with the unreduced fp32 model may fall below the fp32 reduced graph's
#: before a graph is refused (see `PrecisionCheck.passed`: the whole 95 % interval must be below it)
DEFAULT_MARGIN = {"fp16": 0.01, "int8": 0.02}
LINEAR_MODULES = ("torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv2d")


def _meta(node, key: str) -> Optional[str]:
    for p in node.metadata_props:
        if p.key == key:
            return p.value
    return None


def _constant_rank(model_proto) -> dict[str, int]:
    ranks = {t.name: len(t.dims) for t in model_proto.graph.initializer}
    for node in model_proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    ranks[node.output[0]] = len(attr.t.dims)
    return ranks


def quantizable_nodes(model_proto) -> list[str]:
    """Names of the backbone's linear nodes: the only ones int8 converts (see the module docstring)."""
    from .trt_graph import decision_nodes

    decide = set(decision_nodes(model_proto))
    ops = ("MatMul", "Gemm", "Conv")
    with_meta = any(_meta(n, "pkg.torch.onnx.class_hierarchy") for n in model_proto.graph.node)
    ranks = _constant_rank(model_proto) if not with_meta else {}
    out = []
    for node in model_proto.graph.node:
        if node.op_type not in ops or node.name in decide:
            continue
        if with_meta:
            hierarchy = _meta(node, "pkg.torch.onnx.class_hierarchy") or ""
            scopes = _meta(node, "pkg.torch.onnx.name_scopes") or ""
            if any(m in hierarchy for m in LINEAR_MODULES) and LEARNED_ATTR not in scopes:
                out.append(node.name)
        elif len(node.input) > 1 and ranks.get(node.input[1]) == (4 if node.op_type == "Conv" else 2):
            out.append(node.name)
    return out


#: bumped whenever the int8 graphs of the same fp32 graph change (cached latency tables key on it)
INT8_GRAPH_REVISION = 2  # 2: dynamic int8 keeps the patch embedding's Conv in float


def dynamic_nodes(model_proto, nodes: Sequence[str]) -> list[str]:
    """The nodes dynamic int8 converts: the quantizable ones but the convolutions.

    onnxruntime's CPU kernel for a dynamically quantized Conv (ConvInteger, its input image
    quantized at run time by a DynamicQuantizeLinear) is several times slower than the float Conv it
    replaces, while the MatMuls become DynamicQuantizeMatMul, its fast int8 GEMM. Measured
    (DeiT-Tiny unreduced, onnxruntime 1.32 CPU, batch 1, 1 thread, 7 interleaved rounds): the
    patch embedding's ConvInteger took 3.9 ms per run against 0.8 ms for the float Conv (profiler),
    and the whole graph ran 1.33x faster than fp32 with it and 1.58-1.65x without it (two runs).
    Static QDQ keeps it: its Conv becomes a QLinearConv, and it is the graph TensorRT builds int8
    engines from (1.43x with the Conv, 1.49x without, within the noise of one run)."""
    conv = {n.name for n in model_proto.graph.node if n.op_type == "Conv"}
    return [n for n in nodes if n not in conv]


def float_nodes(model_proto, converted: Optional[Sequence[str]] = None) -> list[str]:
    """The MatMul/Gemm/Conv nodes that stay float in an int8 graph: all but `converted` (default
    the quantizable ones, so the reduction's own)."""
    keep = set(quantizable_nodes(model_proto) if converted is None else converted)
    return [n.name for n in model_proto.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
            and n.name not in keep]


def _named(model_proto):
    """The graph with every node named uniquely (the quantizers and converters key nodes by name)."""
    import onnx

    names = [n.name for n in model_proto.graph.node]
    if len(set(names)) == len(names) and all(names):
        return model_proto
    model_proto = onnx.ModelProto.FromString(model_proto.SerializeToString())
    for i, node in enumerate(model_proto.graph.node):
        node.name = f"{node.op_type}_{i}"
    return model_proto


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over preprocessed images, in chunks of the
    graph's batch size."""

    def __init__(self, images: torch.Tensor, name: str, batch: int):
        from ..runtime import chunks

        self._it = iter([{name: c.numpy().astype(np.float32)} for c, _ in chunks(images, batch)])

    def get_next(self):
        return next(self._it, None)


def to_int8(src: Path, out: Path, mode: str = DEFAULT_INT8_MODE, calib: Optional[torch.Tensor] = None,
            calib_method: str = DEFAULT_CALIB_METHOD) -> dict:
    """Write the int8 version of the fp32 graph `src` to `out`; returns what was done."""
    import onnx
    from onnxruntime import quantization as q

    if mode not in INT8_MODES:
        raise UserError(f"--int8-mode must be one of {', '.join(INT8_MODES)}, got {mode!r}")
    proto = _named(onnx.load(str(src)))
    nodes = quantizable_nodes(proto)
    if mode == "dynamic":
        nodes = dynamic_nodes(proto, nodes)
    if not nodes:
        raise UserError("the graph has no linear layer int8 could convert")
    with tempfile.TemporaryDirectory(prefix="tomectl-int8-") as td:
        named = Path(td) / "named.onnx"
        onnx.save(proto, str(named))
        _quiet_quantizer_logs()
        if mode == "dynamic":
            # per-tensor weights: per-channel ran slower here at no better agreement (DeiT-Tiny r=13:
            # 10.3 vs 8.9 ms, 93.0 vs 93.7 % on 300 val images)
            q.quantize_dynamic(named, out, op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                               nodes_to_quantize=nodes, per_channel=False, weight_type=q.QuantType.QInt8)
        else:
            if calib is None or not len(calib):
                raise UserError("static int8 needs calibration images (--calib-images DIR)")
            if calib_method not in CALIB_METHODS:
                raise UserError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, "
                                f"got {calib_method!r}")
            method = {"entropy": q.CalibrationMethod.Entropy, "percentile": q.CalibrationMethod.Percentile,
                      "minmax": q.CalibrationMethod.MinMax}[calib_method]
            batch = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 1
            q.quantize_static(named, out, _Reader(calib, proto.graph.input[0].name, batch),
                              quant_format=q.QuantFormat.QDQ, per_channel=True,
                              op_types_to_quantize=["MatMul", "Gemm", "Conv"], nodes_to_quantize=nodes,
                              activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                              calibrate_method=method)
    info = {"mode": mode, "quantized_nodes": len(nodes), "float_nodes": len(float_nodes(proto, nodes)),
            "per_channel": mode == "static"}
    if mode == "static":
        info.update(calib_method=calib_method, calib_images=len(calib))
    return info


def to_fp16_graph(src: Path, out: Path) -> dict:
    """Write the fp16 version of `src` (fp32 inputs/outputs, decision nodes fp32) to `out`."""
    import onnx

    from .trt_graph import decision_nodes, to_fp16

    proto = onnx.load(str(src))
    half = to_fp16(proto)
    onnx.save(half, str(out))
    return {"decision_nodes_fp32": len(decision_nodes(proto))}


def _quiet_quantizer_logs() -> None:
    import logging

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))


# --- validation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionCheck:
    """A reduced-precision graph against the fp32 reduced graph, both against the unreduced fp32
    model, on the same images."""

    precision: str
    n: int
    agreement: float  # top-1 agreement with the unreduced fp32 model
    agreement_fp32: float  # the fp32 reduced graph's
    difference: float  # agreement - agreement_fp32
    difference_ci95: tuple[float, float]  # paired (normal approximation over per-image differences)
    agreement_with_fp32_graph: float  # top-1 agreement with the fp32 reduced graph
    median_max_abs_diff: float  # logits vs the fp32 reduced graph, where their top-1s agree
    margin: float

    @property
    def passed(self) -> bool:
        """Refused only when the drop is shown to exceed the margin (the 95 % interval below it)."""
        return self.difference_ci95[1] >= -self.margin

    def describe(self) -> str:
        lo, hi = self.difference_ci95
        return (f"{self.precision}: agreement with the unreduced fp32 model {self.agreement:.1%} vs "
                f"{self.agreement_fp32:.1%} for the fp32 graph ({self.difference * 100:+.1f} points, 95 % "
                f"[{lo * 100:+.1f}, {hi * 100:+.1f}], margin -{self.margin * 100:.1f}), "
                f"{self.agreement_with_fp32_graph:.1%} with the fp32 graph, on {self.n} images")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["difference_ci95"] = list(self.difference_ci95)
        d["passed"] = self.passed
        return d


def check_precision(unreduced: np.ndarray, fp32: np.ndarray, candidate: np.ndarray, precision: str,
                    margin: Optional[float] = None) -> PrecisionCheck:
    """Compare logits [N, classes] of the unreduced fp32 model, the fp32 reduced graph and the
    reduced-precision candidate on the same N images (see the module docstring)."""
    margin = DEFAULT_MARGIN.get(precision, 0.0) if margin is None else margin
    if not 0 <= margin <= 1:
        raise UserError(f"--max-agreement-drop must be between 0 and 1, got {margin}")
    ref = np.asarray(unreduced).argmax(-1)
    top32, top = np.asarray(fp32).argmax(-1), np.asarray(candidate).argmax(-1)
    n = len(ref)
    if n == 0:
        raise UserError("no check images to validate the reduced-precision graph on")
    d = (top == ref).astype(np.float64) - (top32 == ref).astype(np.float64)
    mean = float(d.mean())
    half = 1.96 * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else 1.0
    same = top == top32
    diffs = np.abs(np.asarray(candidate, np.float64) - np.asarray(fp32, np.float64)).max(-1)
    return PrecisionCheck(
        precision=precision, n=n, agreement=float((top == ref).mean()),
        agreement_fp32=float((top32 == ref).mean()),
        difference=mean, difference_ci95=(mean - half, mean + half),
        agreement_with_fp32_graph=float(same.mean()),
        median_max_abs_diff=float(np.median(diffs[same])) if same.any() else float("inf"), margin=margin,
    )


def split_images(images: torch.Tensor, n_calib: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration images, check images): disjoint, the first `n_calib` calibrate."""
    if len(images) <= n_calib:
        raise UserError(f"need more than {n_calib} images to calibrate int8 on some and check on others "
                        f"(have {len(images)})")
    return images[:n_calib], images[n_calib:]


def precision_names(values: Sequence[str]) -> list[str]:
    out = list(dict.fromkeys(values))
    for p in out:
        if p not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {p!r}")
    return out


# --- the export ---------------------------------------------------------------------------------


@dataclass
class PrecisionOptions:
    """How a reduced-precision graph is made and checked (`tomectl export --precision ...`)."""

    precision: str = "fp32"
    int8_mode: str = DEFAULT_INT8_MODE
    calib_method: str = DEFAULT_CALIB_METHOD
    calib_images: Optional[str | Path] = None  # folder; default the shared train images
    n_calib: int = DEFAULT_CALIB_IMAGES
    n_check: int = DEFAULT_CHECK_IMAGES
    margin: Optional[float] = None  # default DEFAULT_MARGIN[precision]
    validate: bool = True  # False only for speed work on random weights (bench): nothing to agree with

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.int8_mode not in INT8_MODES:
            raise UserError(f"--int8-mode must be one of {', '.join(INT8_MODES)}, got {self.int8_mode!r}")
        if self.calib_method not in CALIB_METHODS:
            raise UserError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, "
                            f"got {self.calib_method!r}")
        for name, v in (("--calib-count", self.n_calib), ("--check-images", self.n_check)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be a whole number >= 1, got {v!r}")
        if self.margin is not None and not 0 <= self.margin <= 1:
            raise UserError(f"--max-agreement-drop must be between 0 and 1, got {self.margin}")

    @staticmethod
    def of(recipe_precision: Optional[dict], **asked) -> "PrecisionOptions":
        """The options an export uses: what was asked for (non-None values) over what the recipe
        records (the precision it was calibrated for), over the defaults."""
        recorded = dict(recipe_precision or {})
        if asked.get("precision") not in (None, recorded.get("precision", "fp32")):
            recorded = {}  # another precision asked for: none of the recorded settings apply
        return PrecisionOptions(**{**recorded, **{k: v for k, v in asked.items() if v is not None}})

    def key(self) -> dict:
        """What decides the graph's bytes (recorded in sidecars and artifacts)."""
        d = {"precision": self.precision}
        if self.precision == "int8":
            d["int8_mode"] = self.int8_mode
            if self.int8_mode == "static":
                d.update(calib_method=self.calib_method, n_calib=self.n_calib)
        return d


def images_for(model, opts: PrecisionOptions) -> tuple[Optional[torch.Tensor], torch.Tensor, str]:
    """(calibration images or None, check images, where from): disjoint sets of one folder."""
    from .. import data
    from ..models import preprocessing
    from .onnx import shared_calibration_dir

    root = Path(opts.calib_images) if opts.calib_images is not None else shared_calibration_dir()
    if root is None:
        raise UserError("a reduced-precision export is validated on real images: pass --calib-images DIR "
                        "(a folder of images; the project's shared train images are used where present)")
    static = opts.precision == "int8" and opts.int8_mode == "static"
    n_calib = opts.n_calib if static else 0
    images = data.load_images(root, preprocessing(model), n_calib + opts.n_check, resize="timm")
    if static:
        calib, check = split_images(images, n_calib)
        where = f"calibrated on {len(calib)} and checked on {len(check)} other images from {root}"
        return calib, check, where
    return None, images, f"checked on {len(images)} images from {root}"


def convert(src: Path, out: Path, opts: PrecisionOptions, calib: Optional[torch.Tensor]) -> dict:
    """The fp32 graph `src` in `opts.precision`, written to `out`; returns what was done."""
    if opts.precision == "int8":
        return to_int8(src, out, opts.int8_mode, calib, opts.calib_method)
    if opts.precision == "fp16":
        return to_fp16_graph(src, out)
    raise ValueError("fp32 needs no conversion")


def validate(reduced, fp32_graph: Path, candidate: Path, check: torch.Tensor, opts: PrecisionOptions,
             batch: int) -> PrecisionCheck:
    """`check_precision` of `candidate` on the check images (the unreduced reference: the same model
    with the reduction off, in fp32 PyTorch)."""
    from ..runtime import ort_session, run_session

    unreduced = reduced.unreduced_logits(check)
    fp32 = run_session(ort_session(fp32_graph), check, batch)
    try:
        cand = run_session(ort_session(candidate), check, batch)
    except Exception as e:
        from .onnx import ExportCheckError, _first_line

        raise ExportCheckError(f"onnxruntime cannot run the {opts.precision} graph: {_first_line(e)}") from e
    return check_precision(unreduced, fp32, cand, opts.precision, opts.margin)


def export_precision(reduced, out: str | Path, opts: PrecisionOptions, export_fp32, progress=None):
    """The reduced-precision graph of `reduced` at `out` (+ sidecar): the fp32 graph first, checked
    for parity as always (`export_fp32(path)` -> OnnxExportResult), then converted and validated
    against the unreduced model (`validate`); nothing is written unless it passes."""
    import json
    import shutil

    from ..artifact import atomic_file, write_json
    from ..models import sha256_of
    from .onnx import ExportCheckError, readable

    say = progress or (lambda msg: None)
    out = Path(out)
    sidecar = out.with_name(out.name + ".json")
    with tempfile.TemporaryDirectory(prefix="tomectl-precision-") as td:
        fp32_path = Path(td) / "fp32.onnx"
        res = export_fp32(fp32_path)
        say("loading calibration and check images...")
        static = opts.precision == "int8" and opts.int8_mode == "static"
        if opts.validate or static:
            calib, check, where = images_for(reduced.model, opts)
        else:
            calib, check, where = None, None, "not validated (random weights: speed work only)"
        say(f"converting to {opts.precision}...")
        cand = Path(td) / f"{opts.precision}.onnx"
        info = convert(fp32_path, cand, opts, calib)
        pc = None
        if opts.validate:
            say(f"validating the {opts.precision} graph against the unreduced model...")
            pc = validate(reduced, fp32_path, cand, check, opts, res.batch)
            if not pc.passed:
                raise ExportCheckError(f"the {opts.precision} graph loses too much agreement "
                                       f"({pc.describe()}); nothing was written to {out}")
        doc = json.loads(Path(res.sidecar).read_text())
        res.path, res.sidecar, res.sha256 = str(out), str(sidecar), sha256_of(cand)
        res.precision, res.precision_check = opts.precision, pc.to_dict() if pc else None
        res.conversion = {**opts.key(), **info}
        res.notes.append(pc.describe() if pc else f"{opts.precision} graph {where}")
        doc.update(file=out.name, sha256=res.sha256,
                   precision={**res.conversion, "images": where, "check": res.precision_check})
        with atomic_file(sidecar) as tmp_json, atomic_file(out) as tmp_onnx:
            shutil.copyfile(cand, tmp_onnx)
            write_json(tmp_json, doc)
            readable(tmp_onnx, tmp_json)
    return res
