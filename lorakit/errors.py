"""The one exception type a user sees.

Every mistake a user can make (a bad file, a wrong shape, an unknown option) raises
``LorakitError`` with a one-line message that says what is wrong and how to fix it.
The CLI prints that line and exits with status 2, never a traceback.
"""


class LorakitError(ValueError):
    """A user-facing error: the message is one line, naming the problem and the fix."""
