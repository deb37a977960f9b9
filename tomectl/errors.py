"""The one exception type for user mistakes.

A `UserError` carries a sentence that says what was wrong and what to do. The CLI turns it into
one red line and exit code 2; anything else is a bug and may show a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (model name, file, budget, recipe...), not a bug."""


def read_input(path, where: str, expected: str) -> bytes:
    """The bytes of an input file, or one UserError for a directory, a missing or unreadable file.
    `where` names the file for people ("recipe x.yaml"); `expected` says what it should hold."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{where} is a directory; expected a file with {expected}")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{where} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {where}: {e.strerror or e}") from None
