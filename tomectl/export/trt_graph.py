"""The TensorRT path's half that needs no GPU: what TensorRT's ONNX parser accepts, the fp16
rewrite for strongly typed networks, the layers that must stay fp32, whether the tensorrt module
and an NVIDIA GPU are here, and how each precision is built on each TensorRT major (`plan_build`).

See `tomectl.export.tensorrt` for the whole path; the half that builds and runs engines is
`tomectl.export.trt_engine`.
"""

from __future__ import annotations

import collections
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError

PRECISIONS = ("fp32", "fp16", "int8")
# top-1 agreement with onnxruntime fp32 an engine must reach before it is written: fp32 engines, and
# fp16/int8 engines built without the unreduced model's logits (with them, `precision.check_precision`
# judges them instead: see trt_engine.agreement_floor)
MIN_AGREEMENT = {"fp32": 0.99, "fp16": 0.99, "int8": 0.95}
TOPK_MAX_K = 3840
DECISION_OPS = ("TopK", "ArgMax", "ArgMin")
NVIDIA_DRIVER = Path("/proc/driver/nvidia")  # present where an NVIDIA driver is loaded


# --- what the parser accepts (no GPU needed) ----------------------------------------------------


def _constants(model_proto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model_proto.graph.initializer}
    for node in model_proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name == "value_ints":
                    values[node.output[0]] = np.array(list(attr.ints), dtype=np.int64)
                elif attr.name == "value_int":
                    values[node.output[0]] = np.array(attr.i, dtype=np.int64)
    return values


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def parse_problems(model_proto) -> list[str]:
    """What keeps TensorRT's ONNX parser from building `model_proto` with built-in layers only.

    Returns one sentence per problem (empty: parse-ready). Checked: static input shapes, custom
    op domains, ScatterND/ScatterElements with a reduction, NonZero, TopK (sorted=1 only, and a
    constant K below 3840), OneHot's constant depth. TensorRT 10's parser takes a K computed at
    run time (its operator table restricts only `sorted` and K < 3840: onnx-tensorrt
    docs/operators.md), so a run-time K is not a problem; a constant one is checked against 3840.
    """
    problems = []
    consts = _constants(model_proto)
    for value in model_proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            problems.append(f"input {value.name} has a dynamic shape; tomectl engines are static")
    for node in model_proto.graph.node:
        what = f"{node.op_type} node {node.name or node.output[0]}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{what} is a custom op of domain {node.domain!r}")
        elif node.op_type == "ScatterND" and _attr(node, "reduction", "none") != "none":
            problems.append(
                f"{what} has reduction={_attr(node, 'reduction')}, which TensorRT refuses "
                "(use --formulation onehot)"
            )
        elif node.op_type == "ScatterElements" and _attr(node, "reduction", "none") != "none":
            problems.append(
                f"{what} has reduction={_attr(node, 'reduction')}, which runs only through "
                "TensorRT's plugin library (use --formulation onehot)"
            )
        elif node.op_type == "NonZero":
            problems.append(f"{what} has a data-dependent output shape")
        elif node.op_type == "TopK":
            k = consts.get(node.input[1]) if len(node.input) > 1 else None
            if _attr(node, "sorted", 1) != 1:
                problems.append(f"{what} has sorted=0, which TensorRT's parser refuses (it takes sorted=1)")
            if k is not None and int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
                problems.append(
                    f"{what} has K={int(np.asarray(k).reshape(-1)[0])}; TensorRT takes K < {TOPK_MAX_K}"
                )
        elif node.op_type == "OneHot" and node.input[1] not in consts:
            problems.append(f"{what} has a depth computed at run time; TensorRT needs it at build time")
    return problems


def decision_nodes(model_proto) -> list[str]:
    """Names of the nodes whose results feed only the merge decisions (TopK/ArgMax and everything
    upstream of them that nothing else uses): the matching that must stay in fp32."""
    consumers = collections.defaultdict(list)
    for node in model_proto.graph.node:
        for name in node.input:
            consumers[name].append(node.name)
    outputs = {o.name for o in model_proto.graph.output}
    chosen = {n.name for n in model_proto.graph.node if n.op_type in DECISION_OPS}
    changed = True
    while changed:
        changed = False
        for node in model_proto.graph.node:
            if node.name in chosen:
                continue
            outs = [o for o in node.output if o]
            if not outs or any(o in outputs for o in outs):
                continue
            users = [c for o in outs for c in consumers[o]]
            if users and all(u in chosen for u in users):
                chosen.add(node.name)
                changed = True
    return sorted(chosen)


def to_fp16(model_proto):
    """The graph in half precision for a strongly typed TensorRT network (inputs and outputs stay
    fp32; the decision nodes stay fp32), by onnxruntime's float16 converter."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    names = [n.name for n in model_proto.graph.node]
    if len(set(names)) != len(names) or not all(names):  # the converter keys nodes by name
        model_proto = onnx.ModelProto.FromString(model_proto.SerializeToString())
        for i, node in enumerate(model_proto.graph.node):
            node.name = f"{node.op_type}_{i}"
    half = convert_float_to_float16(
        model_proto,
        keep_io_types=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST),
        node_block_list=decision_nodes(model_proto),
    )
    # The converter inserts one Cast per (input, blocked consumer): identical duplicates, same
    # name and output, when a tensor feeds two blocked nodes. Keep the first of each.
    # It also appends the input Casts after their consumers: put the nodes back in topological order.
    seen, keep = set(), []
    for node in half.graph.node:
        key = (node.op_type, tuple(node.input), tuple(node.output))
        if node.op_type == "Cast" and key in seen:
            continue
        seen.add(key)
        keep.append(node)
    keep = _topological(keep, {v.name for v in half.graph.input} | {t.name for t in half.graph.initializer})
    del half.graph.node[:]
    half.graph.node.extend(keep)
    onnx.checker.check_model(half)
    return half


def _topological(nodes: list, available: set[str]) -> list:
    """`nodes` ordered so that each comes after the producers of its inputs (stable otherwise)."""
    available = set(available) | {""}  # "" marks an omitted optional input
    ordered, pending = [], list(nodes)
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"the graph has a cycle or an undefined input near node {pending[0].name}")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for n in ready:
            ordered.append(n)
            available.update(n.output)
    return ordered


# --- the tensorrt module, its version and what this machine has ---------------------------------


def _gpu_missing() -> Optional[str]:
    if torch.cuda.is_available():
        return None
    if shutil.which("nvidia-smi") or NVIDIA_DRIVER.exists():
        return "a CUDA build of torch (this torch is CPU-only; engines run on torch CUDA buffers)"
    return "an NVIDIA GPU (no CUDA device is visible)"


def availability():
    """(tensorrt module or None, [what is missing])."""
    missing = []
    trt = None
    try:
        import tensorrt as trt  # noqa: F811
    except ImportError:
        missing.append("the tensorrt Python package (install tomectl's trt extra, or pip install tensorrt)")
    except Exception as e:  # e.g. its shared libraries cannot be loaded
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        missing.append(f"a working tensorrt package (import fails: {first[:120]})")
    gpu = _gpu_missing()
    if gpu:
        missing.append(gpu)
    return trt, missing


def require_tensorrt():
    """The tensorrt module, or a one-line UserError naming everything that is missing."""
    trt, missing = availability()
    if missing:
        raise UserError(
            f"TensorRT export needs {' and '.join(missing)}; this machine lacks "
            f"{'it' if len(missing) == 1 else 'them'} (ONNX export with --onnx works without)"
        )
    return trt


def parse_version(version: str) -> tuple[int, int]:
    m = re.match(r"^(\d+)\.(\d+)", str(version))
    if not m:
        raise UserError(f"cannot read the TensorRT version {version!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class BuildPlan:
    """How one precision is built on one TensorRT major (decided without a GPU)."""

    version: str
    major: int
    precision: str
    strongly_typed: bool  # TensorRT 11+: types come from the graph
    builder_flags: tuple[str, ...]  # trt.BuilderFlag members to set
    clear_flags: tuple[str, ...]  # ... and to clear (where the member exists)
    onnx_precision: str  # precision of the graph handed to the parser: fp32 | fp16
    calibrate: bool  # int8 entropy calibration from images
    pin_decisions_fp32: bool  # weakly typed builds: pin the decision layers to fp32


def plan_build(version: str, precision: str) -> BuildPlan:
    """The build recipe for `precision` under TensorRT `version` (UserError where unsupported)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    major, _minor = parse_version(version)
    if major < 10:
        raise UserError(f"TensorRT {version} is too old; tomectl builds with TensorRT 10.x or 11.x")
    clear = ("TF32",) if precision == "fp32" else ()
    if major == 10:
        flags = {
            "fp32": (),
            "fp16": ("FP16", "PREFER_PRECISION_CONSTRAINTS"),
            "int8": ("INT8", "FP16", "PREFER_PRECISION_CONSTRAINTS"),
        }[precision]
        return BuildPlan(
            version,
            major,
            precision,
            strongly_typed=False,
            builder_flags=flags,
            clear_flags=clear,
            onnx_precision="fp32",
            calibrate=precision == "int8",
            pin_decisions_fp32=precision != "fp32",
        )
    if precision == "int8":
        raise UserError(
            f"int8 on TensorRT {version} needs explicit Q/DQ quantization in the ONNX graph, which tomectl "
            "does not write or validate yet; use --precision fp16, or TensorRT 10.x for calibrated int8"
        )
    return BuildPlan(
        version,
        major,
        precision,
        strongly_typed=True,
        builder_flags=(),
        clear_flags=clear,
        onnx_precision=precision,
        calibrate=False,
        pin_decisions_fp32=False,
    )
