"""The one exception type for user mistakes.

A `UserError` carries a sentence that says what was wrong and what to do. The CLI turns it into
one red line and exit code 2; anything else is a bug and may show a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (model name, file, budget, recipe...), not a bug."""
