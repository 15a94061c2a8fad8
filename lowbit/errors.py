"""The one exception type that reaches users: its message says what to change."""


class LowbitError(Exception):
    """A problem with the user's input or environment, explained in the message.

    Raised instead of a traceback-worthy crash when lowbit knows what went wrong,
    e.g. ``params.yaml: baseline.epochs: must be >= 1 (got 0)``.
    """


class StagesFailed(LowbitError):
    """Some pipeline stages failed; the others finished and were evaluated and reported.

    `failures` is {stage: why}; `report` is the report written for the variants that exist."""

    def __init__(self, failures: dict[str, str], report: str) -> None:
        self.failures = failures
        self.report = report
        names = ", ".join(failures)
        super().__init__(f"{len(failures)} stage(s) failed: {names}. Every other stage finished; reports/summary.md "
                         "covers the variants that exist and lists the missing ones with their errors. "
                         "`dvc status` shows the failed stages as changed: fix the cause and `lowbit run` reruns only them.")
