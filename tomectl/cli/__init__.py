"""The `tomectl` command line: parses, calls a library function, renders. Nothing else."""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.20 vendors its own click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException

from ..errors import UserError
from . import common

app = typer.Typer(
    name="tomectl",
    help="Token merging and pruning for timm Vision Transformers: compress, calibrate, export, bench, eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_commands() -> None:
    """Each module of this package that defines `register(app)` adds its commands (one per file)."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(app)


_register_commands()


def main(argv=None) -> int:
    """Entry point: user mistakes become one red line and exit code 2 (tracebacks with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        rv = app(args=args, prog_name="tomectl", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except UserError as e:
        if debug:
            raise
        common.error(str(e))
        return 2
    except typer.Exit as e:
        return e.exit_code
    except ClickException as e:  # bad flags: click's own one-line usage error
        e.show()
        return 2
    except (typer.Abort, KeyboardInterrupt):
        common.error("interrupted; nothing was left half-written")
        return 130


def _entry() -> None:  # pragma: no cover
    sys.exit(main())
