"""Outputs: refuse at the start what could not be written at the end.

`check_writable(path, kind)` is called by every command that writes, before any work: it refuses an
existing directory where a file is asked for (and a file where a directory is), a path under a
regular file, a folder that cannot be created (under /proc, a read-only file system...), and a
folder where no file can be made; it proves the last by creating the missing folders, writing a
probe file with the name the atomic writers will use (`artifact.atomic_file`/`atomic_dir`), and
removing both again, so that a refused or later failed run leaves nothing on disk.

What can still fail at the end (a full disk, a folder removed meanwhile) is an `OSError`;
`failure_message(err)` turns one that concerns a checked output into one sentence for the CLI, and
`cleanup()` removes the folders the writers created for outputs that were never completed.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from .errors import UserError

Kind = Literal["file", "dir"]

# errors that say "this cannot be written", whatever the file: reported as such even without a name
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


@dataclass
class _Planned:
    path: Path
    what: str
    missing: list[Path] = field(default_factory=list)  # ancestors absent at check time, deepest first


_planned: list[_Planned] = []


def reset() -> None:
    """Forget the outputs checked so far (the CLI calls this at the start of every command)."""
    _planned.clear()


def _stat(p: Path) -> Optional[os.stat_result]:
    """os.stat (following links), None where there is nothing (or nothing reachable) there."""
    try:
        return os.stat(p)
    except (OSError, ValueError):
        return None


def _exists(p: Path) -> bool:
    try:
        os.lstat(p)
        return True
    except (OSError, ValueError):
        return False


def _not_a_folder(p: Path) -> str:
    return "a file, not a folder" if os.path.isfile(p) else "not a folder"


def _empty(p: Path) -> bool:
    try:
        with os.scandir(p) as it:
            return next(it, None) is None
    except OSError:
        return False


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _label(what: Optional[str], path: Path) -> str:
    return f"{what} {path}" if what else str(path)


def _refuse_root(path: Path, label: str) -> None:
    """A directory output replaced by --force must not hold the current folder (or be `/`)."""
    try:
        resolved, here = path.resolve(), Path.cwd().resolve()
    except OSError:
        return
    if resolved == here or resolved in here.parents or resolved == Path(resolved.anchor):
        raise UserError(f"{label} holds the current folder; name a new directory for the output")


def check_writable(path: str | Path, kind: Kind = "file", force: Optional[bool] = None,
                   what: Optional[str] = None, inside: bool = False, marker: Optional[str] = None) -> Path:
    """Refuse now, with one sentence, an output that could not be written at the end.

    kind:   "file" (written via a temporary file renamed over it) or "dir" (a directory).
    force:  None: an existing output is simply replaced; False: an existing one is refused (pass
            --force); True: it may be replaced.
    what:   the option that named it (e.g. "--out"), for the message.
    inside: for kind "dir": files are written into the directory itself (a report folder), rather
            than into a temporary sibling renamed into place (an artifact).
    marker: for kind "dir" with force: the file that shows an existing directory is one of ours
            (e.g. "recipe.yaml"); --force does not replace a non-empty directory without it.
    Nothing is left on disk. Returns the path.
    """
    path = Path(path)
    label = _label(what, path)
    if str(path) in ("", "."):
        raise UserError(f"{what or 'the output'} needs a name, got {str(path)!r}")
    st = _stat(path)
    is_dir = st is not None and stat.S_ISDIR(st.st_mode)
    present = _exists(path)
    if kind == "file":
        if is_dir:
            raise UserError(f"{label} is a directory; name the file to write")
        if present and not (st is not None and stat.S_ISREG(st.st_mode)):
            raise UserError(f"{label} exists and is not a regular file; name a new file to write")
    else:
        if present and not is_dir:
            raise UserError(f"{label} is a file, not a directory; name a directory to write")
        if is_dir and force:
            _refuse_root(path, label)
            if marker is not None and not _exists(path / marker) and not _empty(path):
                raise UserError(f"{label} is a directory that holds other files (no {marker}); "
                                "--force replaces only an earlier output: name a new directory")
    if present and force is False:
        raise UserError(f"{label} already exists; pass --force to replace it")

    # the nearest existing ancestor must be a folder; the missing ones are created, then removed
    missing: list[Path] = []
    parent = path.parent
    while not _exists(parent):
        missing.append(parent)
        if parent.parent == parent:
            break
        parent = parent.parent
    if _exists(parent) and not os.path.isdir(parent):
        raise UserError(f"cannot write {label}: {parent} is {_not_a_folder(parent)}")
    if os.environ.get("RANK", "0") not in ("", "0"):  # torchrun: only the main process writes
        _planned.append(_Planned(path, what or "", missing))
        return path
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise UserError(f"cannot write {label}: {d} is {_not_a_folder(d)}") from None
                continue
            except OSError as e:
                raise UserError(f"cannot write {label}: cannot create the folder {d} "
                                f"({_reason(e)})") from None
            created.append(d)
        where = path if kind == "dir" and inside and is_dir else path.parent
        _probe(where, path.name if where == path.parent else "probe", label, kind == "dir" and not inside)
    finally:
        for d in reversed(created):
            try:
                os.rmdir(d)
            except OSError:
                pass
    _planned.append(_Planned(path, what or "", missing))
    return path


def _probe(folder: Path, name: str, label: str, as_dir: bool) -> None:
    """Create (and remove) what the atomic writers create in `folder`: a temporary file, or a
    temporary directory with a file in it; with a name as long as theirs."""
    prefix = f".{name}.tmp-"
    try:
        if as_dir:
            tmp = tempfile.mkdtemp(prefix=prefix, dir=folder)
            try:
                with open(os.path.join(tmp, "probe"), "wb") as f:
                    f.write(b"0")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            fd, tmp = tempfile.mkstemp(prefix=prefix, dir=folder)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
                os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write {label}: cannot create a file in {folder} ({_reason(e)})") from None


def _concerns(p: Optional[str | bytes], out: _Planned) -> bool:
    """Is file name `p` (of an OSError) the output, inside it, its temporary sibling or a folder
    created for it?"""
    if p is None:
        return False
    try:
        q = Path(os.fsdecode(p)).absolute()
        target = out.path.absolute()
    except (OSError, ValueError):
        return False
    if q == target or target in q.parents:
        return True
    if q.parent == target.parent and q.name.startswith(f".{target.name}."):
        return True
    if q.parent.parent == target.parent and q.parent.name.startswith(f".{target.name}."):
        return True  # a file inside an atomic directory's temporary
    return any(q == m.absolute() or q in m.absolute().parents for m in out.missing) or q in target.parents


def failure_message(err: OSError) -> Optional[str]:
    """One sentence for an OSError met while writing a checked output (None: not about one)."""
    names = [n for n in (err.filename, getattr(err, "filename2", None)) if n is not None]
    for out in _planned:
        if any(_concerns(n, out) for n in names):
            return (f"could not write {_label(out.what or None, out.path)}: {_reason(err)}; "
                    "nothing was written")
    if err.errno in _WRITE_ERRNOS and _planned:
        outs = ", ".join(_label(o.what or None, o.path) for o in _planned)
        return f"could not write {outs}: {_reason(err)}; nothing was written"
    return None


def cleanup() -> None:
    """After a failed or interrupted run: remove the (empty) folders created for checked outputs."""
    for out in _planned:
        for d in out.missing:  # deepest first; stops at the first that holds something
            try:
                os.rmdir(d)
            except FileNotFoundError:
                continue
            except OSError:
                break
