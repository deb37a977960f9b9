"""`python -m tomectl`: the same entry point as the `tomectl` script (Ctrl-C safe from the start)."""

import sys

if __name__ == "__main__":
    try:
        from .cli import _entry
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; nothing written\n")
        from .cli import forget_handled_interrupt

        forget_handled_interrupt()
        sys.exit(130)
    _entry()
