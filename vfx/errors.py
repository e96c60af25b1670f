"""Errors that reach the user as one line and an exit code (codes: 0 done, 1 failure, 2 bad input, 75 retry)."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: a job script may requeue


class VfxError(Exception):
    """An error the user can act on; printed without a traceback."""

    exit_code = EXIT_FAILURE


class BadInput(VfxError):
    """Bad usage or bad input: exit 2, nothing on disk touched."""

    exit_code = EXIT_USAGE


class MissingStage(BadInput):
    """An upstream stage has not been run (or is incomplete)."""

    def __init__(self, stage: str, command: str):
        super().__init__(f"stage '{stage}' is missing or incomplete; run `{command}` first")
        self.stage = stage
        self.command = command

