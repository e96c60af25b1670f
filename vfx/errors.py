"""Errors that reach the user as one line and an exit code (DESIGN section 4)."""

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


class TransientError(VfxError):
    """A failure worth retrying (lock contention, out of memory, disk full)."""

    exit_code = EXIT_TEMPFAIL
