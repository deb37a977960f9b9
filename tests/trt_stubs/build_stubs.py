"""Record what TensorRT's real Python bindings define, per version, without a GPU or TensorRT.

    .venv/bin/python tests/trt_stubs/build_stubs.py [VERSION ...]   # default: every one in VERSIONS

For each version: `pip download --no-deps` the small bindings wheel (tensorrt-cu12-bindings, or
tensorrt-cu13-bindings for 11.x) into a temporary folder, list the undefined symbols of its
extension module (`nm -D`) and the libraries it links (`readelf -d`), build stub libraries
(libnvinfer / libnvonnxparser / libnvinfer_plugin, whatever it links) that define each of those
symbols as a dummy function (`cc -shared`), import the real bindings in a subprocess with
LD_LIBRARY_PATH pointing at the stubs, and write tests/fixtures/tensorrt/<major.minor>.json:

- enums: {name: {member: value}} (module level and nested in classes, as "Class.Enum");
- classes: {name: {bases, methods, properties}} (names the class itself defines; the rest through
  its bases, as Python's attribute lookup finds them);
- functions: the module-level functions (e.g. init_libnvinfer_plugins);
- constants: module-level enum members (trt.float32, ...) as "Enum.MEMBER".

Nothing is called in the stubs (they would crash): only the module's types are read. Where a
version cannot be imported even with stubs, the fixture says why (`import_error`) and records what
can be read without importing: the undefined symbols. Wheels and libraries stay in the temporary
folder; only the JSON files are written into the repository.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

#: the versions tomectl supports: 10.0 (first 10.x), 10.3 (JetPack 6.1), the newest 10.x, the first and
#: the newest 11.x
VERSIONS = {
    "10.0": ("tensorrt-cu12-bindings", "10.0.1"),
    "10.3": ("tensorrt-cu12-bindings", "10.3.0"),
    "10.16": ("tensorrt-cu12-bindings", "10.16.1.11"),
    "11.0": ("tensorrt-cu13-bindings", "11.0.0.114"),
    "11.4": ("tensorrt-cu13-bindings", "11.4.0.106"),
}
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tensorrt"
TENSORRT_LIBS = ("libnvinfer", "libnvonnxparser", "libnvinfer_plugin")

# run in the child process, with the stubs on LD_LIBRARY_PATH and the wheel on sys.path
INTROSPECT = r"""
import inspect, json, sys
import tensorrt_bindings as trt

def is_enum(v):
    return isinstance(v, type) and hasattr(v, "__members__")

def members(e):
    return {k: int(v) for k, v in e.__members__.items()}

out = {"version": trt.__version__, "enums": {}, "classes": {}, "functions": [], "constants": {}}
mod = trt.tensorrt if hasattr(trt, "tensorrt") else trt
for name in sorted(dir(mod)):
    if name.startswith("__"):
        continue
    v = getattr(mod, name)
    if is_enum(v):
        out["enums"][name] = members(v)
    elif isinstance(v, type):
        own = v.__dict__
        methods, props = [], []
        for k in sorted(own):
            if k.startswith("__") and k != "__init__":
                continue
            a = own[k]
            if is_enum(a):
                out["enums"][f"{name}.{k}"] = members(a)
            elif isinstance(a, property):
                props.append(k)
            elif callable(a) or isinstance(a, (staticmethod, classmethod)):
                methods.append(k)
            elif type(a).__name__ in ("pybind11_static_property",):
                props.append(k)
            elif is_enum(type(a)):
                pass  # enum members re-exported on their enum class
            else:
                props.append(k)
        bases = [b.__name__ for b in v.__bases__
                 if b.__module__ != "builtins" and b.__name__ != "pybind11_object"]
        out["classes"][name] = {"bases": bases, "methods": methods, "properties": props}
    elif callable(v):
        out["functions"].append(name)
    elif is_enum(type(v)):
        out["constants"][name] = f"{type(v).__name__}.{v.name}"
json.dump(out, sys.stdout, sort_keys=True)
"""


def sh(*cmd: str, **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def download(package: str, version: str, dest: Path) -> Path:
    sh(sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), f"{package}=={version}",
       f"--python-version={sys.version_info.major}{sys.version_info.minor}", "--only-binary=:all:")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {package}=={version}, got {wheels}")
    return wheels[0]


def tensorrt_symbols(extension: Path) -> tuple[list[str], list[str]]:
    """(TensorRT libraries the extension links, the symbols it needs from them)."""
    needed = re.findall(r"Shared library: \[([^\]]+)\]", sh("readelf", "-d", str(extension)))
    libs = [n for n in needed if n.split(".so")[0] in TENSORRT_LIBS]
    undefined = [line.split()[-1] for line in sh("nm", "-D", "--undefined-only", str(extension)).splitlines()]
    # versioned symbols (@GLIBC_..., @GLIBCXX_...) come from the C/C++ runtime, Py* from python,
    # the rest of the runtime's weak hooks are listed by name
    runtime = re.compile(r"^(_?Py|_ITM_|__gmon_start__|__pthread_key_create|_ZGTt|__cxa_|_Unwind_)")
    syms = sorted({s for s in undefined if "@" not in s and not runtime.match(s)})
    return libs, syms


def build_stubs(libs: list[str], syms: list[str], out: Path) -> None:
    src = out / "stub.c"
    src.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in syms))
    first = True
    for lib in libs:
        # every symbol in the first library; the others exist so the loader finds them
        body = src if first else out / "empty.c"
        if not first:
            body.write_text("int tomectl_trt_stub;\n")
        sh("cc", "-shared", "-fPIC", "-o", str(out / lib), str(body), f"-Wl,-soname,{lib}")
        first = False


def record(key: str, package: str, version: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="tomectl-trt-stubs-") as td:
        td = Path(td)
        wheel = download(package, version, td / "wheel")
        site = td / "site"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
        extension = next(site.glob("tensorrt_bindings/tensorrt*.so"))
        libs, syms = tensorrt_symbols(extension)
        stubs = td / "stubs"
        stubs.mkdir()
        build_stubs(libs, syms, stubs)
        env = {**os.environ, "LD_LIBRARY_PATH": str(stubs), "PYTHONPATH": str(site)}
        proc = subprocess.run([sys.executable, "-c", INTROSPECT], capture_output=True, text=True, env=env,
                              cwd=td)
        doc = {"package": f"{package}=={version}", "wheel": wheel.name, "links": libs,
               "stubbed_symbols": syms}
        if proc.returncode == 0:
            doc.update(json.loads(proc.stdout))
            doc["imported"] = True
        else:
            doc.update(imported=False, version=version,
                       import_error=(proc.stderr.strip().splitlines() or ["?"])[-1][:300])
        return doc


def main(argv: list[str]) -> int:
    keys = argv or list(VERSIONS)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for key in keys:
        package, version = VERSIONS[key]
        doc = record(key, package, version)
        path = FIXTURES / f"{key}.json"
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        what = (f"{len(doc.get('enums', {}))} enums, {len(doc.get('classes', {}))} classes, "
                f"{len(doc.get('functions', []))} functions" if doc["imported"] else doc["import_error"])
        print(f"{key}: {package}=={version}: {what} -> {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
