"""TensorRT engines from a validated ONNX graph, for TensorRT 10.x and 11.x (detected at run time).

The two majors build reduced precision differently:

- TensorRT 10.x (weakly typed networks, still what JetPack 6 devices run): fp16 and int8 are
  builder flags; int8 is calibrated from images with an entropy calibrator (IInt8EntropyCalibrator2).
- TensorRT 11.x removed those flags: every network is strongly typed, so fp16 means handing the
  parser an ONNX graph that is already in half precision (converted here with onnxruntime's
  float16 converter, inputs and outputs kept in fp32), and int8 means Q/DQ nodes in the graph.
  tomectl writes no Q/DQ graph yet, so int8 on TensorRT 11 is refused with a clear message.

In both, the few layers that only *decide* which tokens merge (key normalisation, the similarity
product, the max/argmax and the sorts) stay in fp32: fp16 rounding makes near-ties of the
similarity flip, and a flipped decision moves whole tokens. fp32 engines are built with TF32
disabled, so fp32 means fp32.

TensorRT's ONNX parser refuses ScatterND with a reduction, runs ScatterElements with a reduction
only through its plugin library, and needs a constant K for TopK (K < 3840). `parse_problems` checks
a graph for these without a GPU; the "scatter" merge formulation sums rows with ScatterND
(reduction=add), so TensorRT takes the "onehot" one, which has no Scatter at all (its default).

Every engine is validated against onnxruntime (fp32 CPU) on real images before it is written
(top-1 agreement floor per precision, max |logit difference| reported), and gets a metadata JSON
beside it (TensorRT version, GPU, precision, shapes, build time, sha256). A timing cache file is
reused across builds. Without the ``tensorrt`` package or without an NVIDIA GPU every entry point
raises a one-line UserError naming what is missing.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..artifact import atomic_file, write_json
from ..errors import UserError
from .onnx import ExportCheckError, Progress, _chunks, compare, ort_session, readable, run_session

PRECISIONS = ("fp32", "fp16", "int8")
# top-1 agreement with onnxruntime fp32 an engine must reach before it is written
MIN_AGREEMENT = {"fp32": 0.99, "fp16": 0.99, "int8": 0.95}
TOPK_MAX_K = 3840
DECISION_OPS = ("TopK", "ArgMax", "ArgMin")
DEFAULT_WORKSPACE_GB = 4.0
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
    op domains, ScatterND/ScatterElements with a reduction, NonZero, TopK's constant K (and
    K < 3840), OneHot's constant depth.
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
            if k is None:
                problems.append(f"{what} has a K computed at run time; TensorRT needs a constant K")
            elif int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
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


def network_flags(trt, plan: BuildPlan) -> int:
    """create_network flags: STRONGLY_TYPED on 11+ (always on there; set where the member exists)."""
    if plan.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def configure(trt, config, plan: BuildPlan, workspace_gb: float) -> None:
    """Apply `plan` to a builder config: workspace, precision flags, TF32 off for fp32."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.clear_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))


def pin_layers_fp32(trt, network, node_names: Sequence[str]) -> int:
    """Weak typing (10.x): ask for fp32 in the layers the parser made from `node_names`.

    The ONNX parser names each layer after its node (with a suffix where a node becomes several
    layers). Returns how many layers were pinned."""
    names = set(node_names)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        base = layer.name
        if not (base in names or any(base.startswith(n + "_") or base.startswith(n + ":") for n in names)):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in (trt.float32, trt.float16):
                layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


# --- logging, calibration, timing cache ---------------------------------------------------------

_LOGGERS: dict = {}


def _logger(trt):
    """One logger per process (TensorRT wants the builder and runtime to share it); keeps errors."""
    if "logger" not in _LOGGERS:

        class _Log(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if int(severity) <= int(trt.ILogger.Severity.ERROR):
                    self.errors.append(str(msg))

        _LOGGERS["logger"] = _Log()
    return _LOGGERS["logger"]


def _calibrator(trt, images: torch.Tensor, batch: int):
    """IInt8EntropyCalibrator2 over `images` [N, 3, H, W] (TensorRT 10.x int8)."""

    class ImageCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.images = images.float().contiguous()
            self.batch = batch
            self.next = 0
            self.device = torch.empty((batch, *images.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self):
            return self.batch

        def get_batch(self, names):
            if self.next + self.batch > len(self.images):
                return None
            self.device.copy_(self.images[self.next : self.next + self.batch])
            torch.cuda.synchronize()
            self.next += self.batch
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self):
            return None  # calibrate afresh: the cache would be tied to one graph and image set

        def write_calibration_cache(self, cache):
            return None

    return ImageCalibrator()


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def default_timing_cache(version: str) -> Path:
    """~/.cache/tomectl/tensorrt-<version>-<gpu>.timing: tactic timings are per version and GPU."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tomectl"
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name()).strip("-").lower()
    return root / f"tensorrt-{version}-{gpu}.timing"


def _load_timing_cache(config, path: Path):
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, False)  # a cache from another version/GPU is not mixed in
    return cache


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    with atomic_file(path) as tmp:
        tmp.write_bytes(bytes(cache.serialize()))
        readable(tmp)


# --- running engines ----------------------------------------------------------------------------


def _torch_dtype(trt, dtype):
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int8: torch.int8,
        trt.bool: torch.bool,
    }
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class TrtRunner:
    """Run a static-shape engine: ``TrtRunner(path)(batch)`` -> logits (numpy in, numpy out;
    torch in, torch out on the input's device). Buffers are torch CUDA tensors."""

    def __init__(self, engine_path: str | Path):
        trt = require_tensorrt()
        self._trt = trt
        path = Path(engine_path)
        if not path.is_file():
            raise UserError(f"engine {path} does not exist")
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(
                f"{path} is not an engine TensorRT {trt.__version__} on {gpu_name()} can load "
                "(engines are tied to the TensorRT version and GPU that built them)"
            )
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            spec = (
                name,
                tuple(self.engine.get_tensor_shape(name)),
                _torch_dtype(trt, self.engine.get_tensor_dtype(name)),
            )
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(spec)
        if len(self.inputs) != 1:
            raise UserError(f"{path} has {len(self.inputs)} inputs; tomectl engines take one image batch")
        self._buffers = {
            name: torch.empty(shape, dtype=dtype, device="cuda") for name, shape, dtype in self.outputs
        }
        for name, buf in self._buffers.items():
            self.context.set_tensor_address(name, buf.data_ptr())
        self.stream = torch.cuda.Stream()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.inputs[0][1]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.outputs[0][1]

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        name, shape, dtype = self.inputs[0]
        if tuple(x.shape) != shape:
            raise UserError(f"the engine takes a batch of shape {shape}, got {tuple(x.shape)}")
        x = x.to("cuda", dtype).contiguous()
        self.context.set_tensor_address(name, x.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT failed to execute the engine")
        self.stream.synchronize()
        return self._buffers[self.outputs[0][0]].float().clone()

    def __call__(self, batch):
        if isinstance(batch, np.ndarray):
            return self._run(torch.from_numpy(batch)).cpu().numpy()
        return self._run(batch).to(batch.device)

    def time_ms(self, iters: int = 100, warmup: int = 20) -> float:
        """Median latency of one batch already on the GPU, in milliseconds (CUDA events around
        each run, which includes copying the logits out of the engine's buffer)."""
        x = torch.randn(self.input_shape, device="cuda")
        for _ in range(warmup):
            self._run(x)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self._run(x)
            end.record(self.stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times))


def run_engine(runner: TrtRunner, images: torch.Tensor) -> np.ndarray:
    out = []
    for chunk, real in _chunks(images, runner.batch):
        out.append(runner(chunk.numpy())[:real])
    return np.concatenate(out)


# --- building -----------------------------------------------------------------------------------


@dataclass
class EngineResult:
    path: str
    precision: str
    batch: int
    tensorrt_version: str
    gpu: str
    input_shape: list[int]
    output_shape: list[int]
    build_seconds: float
    sha256: str
    timing_cache: str
    max_abs_diff: float
    top1_agreement: float
    n_check: int
    min_agreement: float
    metadata: str
    onnx_sha256: str
    strongly_typed: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _sidecar_preprocessing(onnx_path: Path) -> Optional[dict]:
    sidecar = onnx_path.with_name(onnx_path.name + ".json")
    if sidecar.is_file():
        return json.loads(sidecar.read_text()).get("preprocessing")
    return None


def _images(onnx_path: Path, source, n: int, shape: Sequence[int]) -> tuple[torch.Tensor, str]:
    """Preprocessed images from a tensor, a folder (preprocessing from the ONNX sidecar), the
    shared calibration images, or seeded random inputs."""
    from .. import data
    from .onnx import shared_calibration_dir

    if isinstance(source, torch.Tensor):
        return source, f"{len(source)} given images"
    pre = _sidecar_preprocessing(onnx_path)
    root = Path(source) if source is not None else shared_calibration_dir()
    if root is not None and pre is not None:
        images = data.load_images(root, pre, n, resize="timm")
        return images, f"{len(images)} images from {root}"
    if source is not None:
        raise UserError(
            f"{onnx_path} has no sidecar JSON with its preprocessing; pass the images as a tensor"
        )
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape[1:], generator=gen), f"{n} random inputs"


def build_engine(
    onnx_path: str | Path,
    out: str | Path,
    *,
    precision: str = "fp32",
    batch: Optional[int] = None,
    calib_images=None,
    check_images=None,
    n_check: int = 64,
    timing_cache: Optional[str | Path] = None,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    min_agreement: Optional[float] = None,
    meta: Optional[dict] = None,
    progress: Progress = None,
) -> EngineResult:
    """Build a TensorRT engine from a validated static-shape ONNX graph, validate it against
    onnxruntime, and write it with its metadata JSON (``<out>.json``).

    calib_images: int8 calibration images (tensor [N, 3, H, W] or folder; default: check images).
    check_images: validation images (tensor or folder; default: the shared calibration images).
    Raises UserError without tensorrt or a GPU, ExportCheckError (nothing written) when the
    parser refuses the graph, the build fails, or the engine disagrees with onnxruntime.
    """
    import onnx

    say = progress or (lambda msg: None)
    trt = require_tensorrt()
    plan = plan_build(trt.__version__, precision)
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise UserError(f"ONNX file {onnx_path} does not exist")
    model_proto = onnx.load(str(onnx_path))
    shape = [d.dim_value for d in model_proto.graph.input[0].type.tensor_type.shape.dim]
    if batch is not None and shape[0] != batch:
        raise UserError(
            f"{onnx_path} was exported at batch {shape[0]}, not {batch}; export it again with --batch"
        )
    floor = MIN_AGREEMENT[precision] if min_agreement is None else min_agreement
    notes = [f"{p} (TensorRT may still build it)" for p in parse_problems(model_proto)]
    from ..models import sha256_of

    with tempfile.TemporaryDirectory(prefix="tomectl-trt-") as td:
        parse_path = onnx_path
        if plan.onnx_precision == "fp16":
            say("converting the graph to fp16 for a strongly typed network...")
            parse_path = Path(td) / "fp16.onnx"
            onnx.save(to_fp16(model_proto), str(parse_path))

        log = _logger(trt)
        log.errors.clear()
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(log, "")
        builder = trt.Builder(log)
        network = builder.create_network(network_flags(trt, plan))
        parser = trt.OnnxParser(network, log)
        say(f"parsing {parse_path.name} (TensorRT {trt.__version__})...")
        if not parser.parse_from_file(str(parse_path)):
            errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
            hint = f" ({'; '.join(parse_problems(model_proto))})" if parse_problems(model_proto) else ""
            raise ExportCheckError(
                f"TensorRT's ONNX parser refused the graph: {(errors or log.errors or ['?'])[0]}{hint}"
            )
        config = builder.create_builder_config()
        configure(trt, config, plan, workspace_gb)
        if plan.pin_decisions_fp32:
            pinned = pin_layers_fp32(trt, network, decision_nodes(model_proto))
            notes.append(f"{pinned} merge-decision layers pinned to fp32")

        images, source = _images(onnx_path, check_images, n_check, shape)
        calibrator = None
        if plan.calibrate:
            calib, _ = (
                _images(onnx_path, calib_images, max(n_check, shape[0]), shape)
                if calib_images is not None
                else (images, source)
            )
            if len(calib) < shape[0]:
                raise UserError(f"int8 calibration needs at least {shape[0]} images, got {len(calib)}")
            calibrator = _calibrator(trt, calib, shape[0])  # kept referenced until the build is done
            config.int8_calibrator = calibrator

        cache_path = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__)
        _load_timing_cache(config, cache_path)
        say(f"building the {precision} engine (minutes)...")
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        build_seconds = time.perf_counter() - t0
        calibrator = None
        if serialized is None:
            raise ExportCheckError(
                f"TensorRT could not build the engine: {(log.errors or ['no reason given'])[-1]}"
            )
        _save_timing_cache(config, cache_path)
        engine_tmp = Path(td) / "engine.plan"
        engine_tmp.write_bytes(bytes(serialized))

        say(f"validating against onnxruntime on {source}...")
        reference = run_session(ort_session(onnx_path), images, shape[0])
        runner = TrtRunner(engine_tmp)
        parity = compare(reference, run_engine(runner, images))
        if parity.top1_agreement < floor:
            raise ExportCheckError(
                f"the {precision} engine agrees with onnxruntime on only {parity.top1_agreement:.1%} of "
                f"{parity.n} images (need {floor:.0%}, see --min-agreement; max |diff| "
                f"{parity.max_abs_diff:.3g}); "
                f"nothing was written to {out}"
            )
        result = EngineResult(
            path=str(out),
            precision=precision,
            batch=shape[0],
            tensorrt_version=trt.__version__,
            gpu=gpu_name(),
            input_shape=list(runner.input_shape),
            output_shape=list(runner.output_shape),
            build_seconds=round(build_seconds, 1),
            sha256=sha256_of(engine_tmp),
            timing_cache=str(cache_path),
            max_abs_diff=parity.max_abs_diff,
            top1_agreement=parity.top1_agreement,
            n_check=parity.n,
            min_agreement=floor,
            metadata=str(out.with_name(out.name + ".json")),
            onnx_sha256=sha256_of(onnx_path),
            strongly_typed=plan.strongly_typed,
            notes=notes,
        )
        del runner
        with atomic_file(result.metadata) as tmp_json, atomic_file(out) as tmp_engine:
            shutil.copyfile(engine_tmp, tmp_engine)
            write_json(tmp_json, engine_metadata(result, plan, source, meta))
            readable(tmp_engine, tmp_json)
    return result


def engine_metadata(result: EngineResult, plan: BuildPlan, source: str, meta: Optional[dict]) -> dict:
    from ..provenance import now, versions

    doc = {
        "file": Path(result.path).name,
        "sha256": result.sha256,
        "tensorrt": result.tensorrt_version,
        "gpu": result.gpu,
        "precision": result.precision,
        "strongly_typed": plan.strongly_typed,
        "builder_flags": list(plan.builder_flags),
        "input": {"shape": result.input_shape},
        "output": {"shape": result.output_shape},
        "batch": result.batch,
        "build_seconds": result.build_seconds,
        "timing_cache": result.timing_cache,
        "onnx_sha256": result.onnx_sha256,
        "validation": {
            "reference": "onnxruntime CPU fp32",
            "inputs": source,
            "n": result.n_check,
            "max_abs_diff": result.max_abs_diff,
            "top1_agreement": result.top1_agreement,
            "min_agreement": result.min_agreement,
        },
        "notes": result.notes,
        "versions": versions(),
        "created": now(),
    }
    if meta:
        doc.update(meta)
    return doc
