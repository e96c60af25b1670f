"""The `vfx` command line: a Typer app; one small module per group of commands."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Annotated

import typer

from vfx import log
from vfx.cli.common import DEBUG, OneLineUsageErrors

app = typer.Typer(
    name="vfx",
    cls=OneLineUsageErrors,
    help="Diffusion video editing (TokenFlow) and subject personalization (DreamBooth), as resumable stages "
    "over a project directory. Start with `vfx init DIR --video FILE`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        import vfx

        log.out.print(vfx.__version__)
        raise typer.Exit(0)


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
) -> None:
    """Global options."""
    DEBUG["on"] = DEBUG["on"] or debug
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # vfx downloads nothing; a user's own setting wins
    # diffusers imports bitsandbytes whenever it is installed, and on CPUs with AVX512-BF16 that import tries
    # to fetch a 4-bit CPU kernel from the Hub (through `kernels`, when installed) and warns that it cannot;
    # vfx never uses 4-bit kernels (8-bit Adam needs none).
    for noisy in ("bitsandbytes", "kernels"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Under torchrun or accelerate, one process speaks: rank 0's messages and progress are everyone's,
    # and so are the libraries' warnings, which every rank would otherwise repeat.
    secondary = os.environ.get("RANK", "0") not in {"", "0"}
    if secondary:
        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
    log.set_quiet(quiet or log.quiet_from_env() or secondary)


from vfx.cli import project_cmds, video_cmds  # noqa: E402,F401  (registers the commands)
from vfx.cli import dreambooth_cmds, metrics_cmds  # noqa: E402,F401
from vfx.cli import report_cmds, run_cmds  # noqa: E402,F401


def main() -> None:
    app()
