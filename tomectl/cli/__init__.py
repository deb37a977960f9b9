"""The `tomectl` command line: parses, calls a library function, renders. Nothing else.

Importing this package is cheap (standard library only): typer, the commands and through them torch
and timm are imported inside `main()`, where Ctrl-C is caught, so that an interrupt in the first
seconds (while importing) prints one line and exits 130 like one later on.
"""

from __future__ import annotations

import os
import signal
import sys

from ..errors import UserError

INTERRUPTED = "interrupted; nothing written"

_app = None


class _HeldInterrupts:
    """Hold Ctrl-C while native libraries import, and raise it once they have.

    torch's extension modules call back into Python while they initialise (pybind11); a
    KeyboardInterrupt raised inside such a callback cannot unwind through C++, and the process dies
    with "terminate called after throwing an instance of 'pybind11::error_already_set'" (exit 134)
    instead of the one-line message and exit 130. Seen in the Ctrl-C start-up tests under load."""

    def __enter__(self):
        self.hit = False
        try:
            self.previous = signal.signal(signal.SIGINT, self._hold)
        except ValueError:  # not the main thread: nothing to hold
            self.previous = None
        return self

    def _hold(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.hit and exc[0] is None:
            raise KeyboardInterrupt
        return False


def _import_torch() -> None:
    """Import torch (every command needs it) with Ctrl-C held until its libraries are loaded."""
    with _HeldInterrupts():
        import torch  # noqa: F401


def _register_commands(app) -> None:
    """Each module of this package that defines `register(app)` adds its commands (one per file);
    every command is wrapped by `common.checked` (option ranges, Ctrl-C)."""
    import importlib
    import pkgutil

    from . import common

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(app)
    for cmd in app.registered_commands:
        if not getattr(cmd.callback, "__wrapped__", None):
            cmd.callback = common.checked(cmd.callback)


def get_app():
    """The typer application (built, with all its commands, on first use)."""
    global _app
    if _app is None:
        import typer

        app = typer.Typer(
            name="tomectl",
            help="Token merging and pruning for timm Vision Transformers: compress, calibrate, export, "
                 "bench, eval.",
            no_args_is_help=True,
            pretty_exceptions_enable=False,
            add_completion=False,
        )
        _register_commands(app)
        _app = app
    return _app


def __getattr__(name: str):
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _say(msg: str) -> None:
    """One `error:` line on stderr without rich (which may not be imported yet, or half-imported)."""
    red = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
    prefix = "\x1b[1;31merror:\x1b[0m" if red else "error:"
    try:
        sys.stderr.write(f"{prefix} {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _interrupted(msg: str | None = None) -> int:
    """Ctrl-C: one line, exit code 130; a second Ctrl-C meanwhile does not interrupt the message."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        previous = None
    try:
        from .. import outputs

        outputs.cleanup()
        _say(msg or INTERRUPTED)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 130


def _one_line(e) -> str:
    """Click's usage error (usage, hint, empty line, message) as one sentence."""
    msg = e.format_message()
    ctx = getattr(e, "ctx", None)
    if ctx is not None and getattr(e, "exit_code", 1) == 2:
        msg = msg.rstrip(".") + f"; see `{ctx.command_path} --help`"
    return msg


def _run(args: list[str], debug: bool) -> int:
    from .. import outputs

    outputs.reset()
    try:
        _import_torch()
        app = get_app()
        rv = app(args=args, prog_name="tomectl", standalone_mode=False)
        rv = rv if isinstance(rv, int) else 0
        if rv == 130:  # typer turned a Ctrl-C while parsing into a silent exit 130
            return _interrupted()
        return rv
    except KeyboardInterrupt:
        return _interrupted()
    except UserError as e:
        outputs.cleanup()
        if debug:
            raise
        _error(str(e))
        return 2
    except OSError as e:  # writing an output failed at the end (the disk filled, say)
        msg = outputs.failure_message(e)
        if msg is None or debug:
            raise
        outputs.cleanup()
        _error(msg)
        return 2
    except Exception as e:
        from . import common

        if isinstance(e, common.Interrupted):
            return _interrupted(str(e) or None)
        import typer

        try:  # typer >= 0.20 vendors its own click
            from typer._click.exceptions import ClickException
        except ImportError:  # pragma: no cover
            from click import ClickException
        if isinstance(e, typer.Exit):
            return e.exit_code
        if isinstance(e, ClickException):  # bad flags: one line, like every other mistake
            outputs.cleanup()
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()
                return 2
            _error(_one_line(e))
            return e.exit_code
        raise


def _error(msg: str) -> None:
    from . import common

    common.error(msg)


def main(argv=None) -> int:
    """Entry point: user mistakes become one red line and exit code 2 (tracebacks with --debug);
    Ctrl-C, in any phase (imports included), one line and exit code 130."""
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in args
        if debug:
            args.remove("--debug")
        return _run(args, debug)
    except KeyboardInterrupt:  # in the handlers above, or before them
        return _interrupted()


def forget_handled_interrupt() -> None:
    """Exit 130 after a Ctrl-C we handled, not death by SIGINT.

    CPython notes a KeyboardInterrupt that escapes code run through `PyRun_String` (which some
    extension modules call while they import) in `_Py_UnhandledKeyboardInterrupt` and, at exit, kills
    itself with SIGINT when it is set, even though tomectl caught the interrupt and printed its line:
    the exit status then depended on which import the Ctrl-C landed in (seen as -2 instead of 130 in
    the start-up tests). Private to CPython, so looked up defensively."""
    try:
        import ctypes

        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0
    except (ImportError, ValueError, AttributeError, OSError):  # not CPython, or not exported
        pass


def _entry() -> None:  # pragma: no cover
    rc = main()
    try:  # a Ctrl-C while the interpreter shuts down must not print a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        pass
    if rc == 130:
        forget_handled_interrupt()
    sys.exit(rc)
