"""The one exception type that reaches users: its message says what to change."""


class LowbitError(Exception):
    """A problem with the user's input or environment, explained in the message.

    Raised instead of a traceback-worthy crash when lowbit knows what went wrong,
    e.g. ``params.yaml: baseline.epochs: must be >= 1 (got 0)``.
    """
