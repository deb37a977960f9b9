"""The Dockerfile parses into the two targets and installs tomectl the way the README says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = {
    "FROM",
    "ARG",
    "ENV",
    "WORKDIR",
    "COPY",
    "ADD",
    "RUN",
    "CMD",
    "ENTRYPOINT",
    "LABEL",
    "EXPOSE",
    "USER",
    "VOLUME",
    "SHELL",
    "HEALTHCHECK",
    "STOPSIGNAL",
    "ONBUILD",
}


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages(text: str) -> dict[str, dict]:
    """Stage name -> {"image": base image with the global ARG defaults filled in, "steps": [...]}."""
    args, result, current = {}, {}, None
    for keyword, rest in instructions(text):
        if keyword == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert m, f"every stage is named (FROM image AS name), got FROM {rest}"
            image = re.sub(r"\$\{(\w+)\}", lambda v: args[v.group(1)], m.group(1))
            current = m.group(2)
            result[current] = {"image": image, "steps": []}
        else:
            assert current is not None, f"{keyword} before the first FROM (only ARG may come first)"
            result[current]["steps"].append((keyword, rest))
    return result


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_parses_into_cpu_and_tensorrt_targets(dockerfile):
    for keyword, _ in instructions(dockerfile):
        assert keyword in INSTRUCTIONS, f"unknown Dockerfile instruction {keyword}"
    st = stages(dockerfile)
    assert set(st) == {"cpu", "tensorrt"}
    assert re.fullmatch(r"python:3\.\d+-slim", st["cpu"]["image"])
    assert "nvidia/tensorrt" in st["tensorrt"]["image"]
    for name, stage in st.items():
        kinds = [k for k, _ in stage["steps"]]
        assert "ENTRYPOINT" in kinds, name
        for keyword, rest in stage["steps"]:
            if keyword in ("ENTRYPOINT", "CMD"):
                assert isinstance(json.loads(rest), list), f"{name}: {keyword} in exec (JSON) form"
        entry = json.loads(dict(stage["steps"])["ENTRYPOINT"])
        assert entry == ["tomectl"]
        copied = " ".join(rest for keyword, rest in stage["steps"] if keyword == "COPY")
        for needed in ("pyproject.toml", "tomectl"):
            assert needed in copied, f"{name} stage does not copy {needed}"


def _installs(stage) -> list[str]:
    return [rest for keyword, rest in stage["steps"] if keyword == "RUN" and "pip install" in rest]


def test_dockerfile_installs_as_the_readme_says(dockerfile):
    st = stages(dockerfile)
    cpu = _installs(st["cpu"])
    trt = _installs(st["tensorrt"])
    assert "pip install ." in cpu
    assert 'pip install ".[trt]"' in trt
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md yet")
    text = readme.read_text()
    assert "pip install ." in text
    assert '".[trt]"' in text
