"""A stand-in `tensorrt` module generated from the real bindings' records (tests/fixtures/tensorrt,
written by tests/trt_stubs/build_stubs.py), and the TensorRT names tomectl's source uses (by ast).

The fake has exactly the recorded enums (real member values), classes (their recorded methods and
properties, through their recorded bases), module functions and DataType aliases. An instance of a
fake class refuses any name its recorded class lacks; methods record their calls (module-wide in
`trt._calls`) and return what `trt._returns["Class.method"](self, *args)` gives (None without it);
properties read `trt._props["Class.prop"]` (a value, or a function of the instance).
"""

from __future__ import annotations

import ast
import functools
import json
import re
import types
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "tensorrt"
EXPORT = Path(__file__).resolve().parents[1] / "tomectl" / "export"
SOURCES = [EXPORT / "trt_engine.py", EXPORT / "trt_graph.py"]


def _key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


VERSIONS = sorted((p.stem for p in FIXTURES.glob("*.json")), key=_key)


@functools.lru_cache(maxsize=None)
def record(key: str) -> dict:
    return json.loads((FIXTURES / f"{key}.json").read_text())


def class_names(rec: dict, cls: str) -> set[str]:
    """Methods and properties of `cls`, its bases' included, as the record has them."""
    c = rec["classes"][cls]
    names = set(c["methods"]) | set(c["properties"])
    names |= {k.split(".", 1)[1] for k in rec["enums"] if k.startswith(cls + ".")}
    for b in c["bases"]:
        if b in rec["classes"]:
            names |= class_names(rec, b)
    return names


class EnumMember:
    def __init__(self, enum: str, name: str, value: int):
        self._enum, self.name, self.value = enum, name, value

    def __int__(self):
        return self.value

    __index__ = __int__

    def __eq__(self, other):
        return isinstance(other, EnumMember) and (self._enum, self.value) == (other._enum, other.value)

    def __hash__(self):
        return hash((self._enum, self.value))

    def __repr__(self):
        return f"<{self._enum}.{self.name}: {self.value}>"


def _enum(qualname: str, members: dict[str, int]):
    values = {name: EnumMember(qualname, name, v) for name, v in members.items()}
    return type(qualname.rsplit(".", 1)[-1], (), {**values, "__members__": values})


def fake_trt(key: str):
    """The fake tensorrt module of recorded version `key` ("10.3", ...)."""
    rec = record(key)
    if not rec.get("imported"):
        raise ValueError(f"TensorRT {key} was not imported when recorded: {rec.get('import_error')}")
    mod = types.ModuleType("tensorrt")
    mod.__version__ = rec["version"]
    mod._record, mod._calls, mod._returns, mod._props = rec, [], {}, {}
    enums = {q: _enum(q, m) for q, m in rec["enums"].items()}
    for q, e in enums.items():
        if "." not in q:
            setattr(mod, q, e)
    classes: dict[str, type] = {}

    def make(cls: str) -> type:
        if cls in classes:
            return classes[cls]
        info = rec["classes"][cls]
        bases = tuple(make(b) for b in info["bases"] if b in rec["classes"]) or (object,)
        allowed = frozenset(class_names(rec, cls))
        methods = set(info["methods"])
        for b in info["bases"]:
            if b in rec["classes"]:
                methods |= {n for n in class_names(rec, b) if n in rec["classes"][b]["methods"]}

        def __init__(self, *args, **kwargs):
            object.__setattr__(self, "_args", args)
            object.__setattr__(self, "_values", {})

        def __getattr__(self, name):
            if name.startswith("_") and name != "__init__":
                raise AttributeError(name)
            if name not in allowed:
                raise AttributeError(f"tensorrt {mod.__version__}: {cls} has no attribute {name!r}")
            if name in methods:
                def call(*args, _name=name):
                    mod._calls.append((cls, _name, *args))
                    fn = mod._returns.get(f"{cls}.{_name}")
                    return fn(self, *args) if fn else None
                return call
            if name in self.__dict__.get("_values", {}):
                return self._values[name]
            value = mod._props.get(f"{cls}.{name}")
            return value(self) if callable(value) else value

        def __setattr__(self, name, value):
            generated = type(self).__dict__.get("_trt_class") is not None
            if generated and name not in allowed:
                raise AttributeError(f"tensorrt {mod.__version__}: {cls} has no attribute {name!r} to set")
            if generated:
                mod._calls.append((cls, f"{name}=", value))
                self._values[name] = value
            else:
                object.__setattr__(self, name, value)

        ns = {"__init__": __init__, "__getattr__": __getattr__, "__setattr__": __setattr__, "_trt_class": cls}
        for q, e in enums.items():
            if q.startswith(cls + "."):
                ns[q.split(".", 1)[1]] = e
        classes[cls] = type(cls, bases, ns)
        return classes[cls]

    for cls in rec["classes"]:
        setattr(mod, cls, make(cls))
    for name in rec["functions"]:
        def fn(*args, _name=name):
            mod._calls.append(("tensorrt", _name, *args))
            f = mod._returns.get(_name)
            return f(*args) if f else None
        setattr(mod, name, fn)
    for alias, member in rec["constants"].items():
        enum, name = member.split(".")
        setattr(mod, alias, getattr(enums[enum], name))
    return mod


def resolve(rec: dict, path: tuple[str, ...]) -> bool:
    """Whether `trt.<path>` exists in recorded version `rec`."""
    head, rest = path[0], list(path[1:])
    if head == "__version__":
        return not rest
    if head in rec["functions"] or head in rec["constants"]:
        return not rest  # nothing of theirs is read
    if head in rec["enums"]:
        return len(rest) <= 1 and (not rest or rest[0] in rec["enums"][head])
    if head in rec["classes"]:
        if not rest:
            return True
        if rest[0] == "__init__":
            return len(rest) == 1
        nested = f"{head}.{rest[0]}"
        if nested in rec["enums"]:
            return len(rest) <= 2 and (len(rest) == 1 or rest[1] in rec["enums"][nested])
        return len(rest) == 1 and rest[0] in class_names(rec, head)
    return False


def _chain(node) -> tuple[str, ...] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "trt":
        return tuple(reversed(parts))
    return None


def used_names(sources=SOURCES) -> dict[tuple[str, ...], dict]:
    """Every `trt.X[.Y[.Z]]` the source reads: {path: {"functions": {...}, "optional": bool}}, by the
module-level function or class method it is read in (nested definitions count as their owner's).

    optional: only read behind `hasattr(trt..., "X")` (every use of the path is a hasattr test, or
    sits in an `if` guarded by one). `hasattr(trt.A, "B")` records the path (A, B) as optional."""
    found: dict[tuple[str, ...], dict] = {}

    def add(path, func, optional):
        entry = found.setdefault(path, {"functions": set(), "optional": True})
        entry["functions"].add(func)
        entry["optional"] = entry["optional"] and optional

    def hasattr_path(test):
        for node in ast.walk(test):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
                    and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)):
                base = _chain(node.args[0])  # () for trt itself
                if base is not None:
                    yield (*base, node.args[1].value)

    for src in sources:
        tree = ast.parse(Path(src).read_text())
        tops = [(n.name, n) for n in tree.body if isinstance(n, ast.FunctionDef)]
        tops += [(f"{c.name}.{n.name}", n) for c in tree.body if isinstance(c, ast.ClassDef)
                 for n in c.body if isinstance(n, ast.FunctionDef)]
        for name, func in tops:
            guarded: set[tuple[str, ...]] = set()
            for node in ast.walk(func):
                if isinstance(node, (ast.If, ast.IfExp, ast.BoolOp)):
                    test = node.test if not isinstance(node, ast.BoolOp) else node.values[0]
                    guarded |= set(hasattr_path(test))
            for path in {p for node in ast.walk(func) for p in hasattr_path(node)}:
                add(path, name, True)
            outer = {id(n.value) for n in ast.walk(func) if isinstance(n, ast.Attribute)}
            for node in ast.walk(func):
                if isinstance(node, ast.Attribute) and id(node) not in outer:
                    path = _chain(node)
                    if path:
                        add(path, name, any(path[: len(g)] == g for g in guarded))
    return found
