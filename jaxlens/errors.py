"""The one exception type jaxlens raises for bad input (checkpoints, configs, arguments).

The CLI prints ``str(err)`` as a single line and exits non-zero, with no traceback.
"""


class JaxlensError(Exception):
    """A user-facing error: the message is one sentence naming the file or field at fault."""
