"""Shared CLI plumbing: option types, error reporting, result printing."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable

import click
import typer

from vfx import log
from vfx.errors import EXIT_FAILURE, EXIT_TEMPFAIL, VfxError

DEBUG = {"on": bool(os.environ.get("VFX_DEBUG"))}

ProjectDir = Annotated[Path, typer.Argument(help="Project directory (created by `vfx init`).", show_default=False)]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model: 'tiny' (embedded), 'tiny-v', 'tiny-xl', 'tiny-depth', a diffusers folder (SD 1.x/2.x, SDXL or SD 2 depth, told by its config), a .safetensors file or a cached Hub id. "
        "Default: the project's vfx.toml.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps. Default: vfx.toml (auto).", show_default=False)
]
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="fp32 | fp16 | bf16. Default: fp32 on CPU, fp16 on GPU (the VAE always runs fp32).", show_default=False),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute even when the stage is up to date.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of text.")]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="K/N: run only shard K of N (chunks split into N contiguous blocks). "
        "Default: SLURM_ARRAY_TASK_ID/COUNT when set, else the whole stage.",
        show_default=False,
    ),
]
AllowPickleOpt = Annotated[
    bool, typer.Option("--allow-pickle", help="Allow loading .ckpt/.pt checkpoints (unpickling can run code).")
]
ModelConfigOpt = Annotated[
    str | None,
    typer.Option("--model-config", help="For a single-file checkpoint: a diffusers folder or cached Hub id with its configs.", show_default=False),
]


class OneLineUsageErrors(typer.core.TyperGroup):
    """Usage errors (an unknown option, a missing one, a value that does not parse) print one line and
    exit 2, like every other bad input; `vfx` or a group without arguments still shows its help."""

    def make_context(self, info_name, args, parent=None, **kwargs):
        if parent is None:  # the whole command line: stage records keep it
            from vfx import invocation

            invocation.remember(args)
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **kwargs)

    def invoke(self, ctx):
        with one_line_usage_errors():
            return super().invoke(ctx)


try:  # typer 0.29 and later carry their own click
    from typer._click import exceptions as _usage
except ImportError:
    from click import exceptions as _usage


@contextlib.contextmanager
def one_line_usage_errors():
    try:
        yield
    except getattr(_usage, "NoArgsIsHelpError", ()):
        raise
    except _usage.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) is not None else ""
        log.error(one_line(exc.format_message()) + hint)
        raise typer.Exit(exc.exit_code) from None


def command(app: typer.Typer, name: str | None = None, **kwargs) -> Callable:
    """Register a command whose user errors print one line and exit with their code."""

    def decorate(func: Callable) -> Callable:
        def run(args, kw):
            from vfx import locks

            try:
                check_arguments(kw)
                return func(*args, **kw)
            finally:
                locks.release_all()  # the upstream folders this command held steady

        @functools.wraps(func)
        def wrapper(*args, **kw):
            try:
                return run(args, kw)
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise
            except VfxError as exc:
                if DEBUG["on"]:
                    traceback.print_exc()
                log.error(one_line(str(exc)))
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                log.error("interrupted; rerun the same command to resume")
                raise typer.Exit(130) from None
            except MemoryError:
                log.error("out of memory; lower --batch-size or the frame size, then rerun to resume")
                raise typer.Exit(EXIT_TEMPFAIL) from None
            except OSError as exc:
                if DEBUG["on"]:
                    traceback.print_exc()
                full = exc.errno in {errno.ENOSPC, errno.EDQUOT}
                where = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
                if full:  # retryable: finished chunks are kept, so a rerun after freeing space resumes
                    log.error(f"disk full ({where}); free space, then rerun the same command to resume")
                else:
                    log.error(where)
                raise typer.Exit(EXIT_TEMPFAIL if full else EXIT_FAILURE) from None
            except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback for users
                if _is_oom(exc):
                    log.error("out of device memory; lower --batch-size or the frame size, then rerun to resume")
                    raise typer.Exit(EXIT_TEMPFAIL) from None
                if DEBUG["on"]:
                    traceback.print_exc()
                log.error(f"{type(exc).__name__}: {one_line(str(exc))} (rerun with --debug for the traceback)")
                raise typer.Exit(EXIT_FAILURE) from None

        app.command(name, **kwargs)(wrapper)
        return wrapper

    return decorate


def check_arguments(kw: dict[str, Any]) -> None:
    """Refuse, for every command alike: text that is not valid UTF-8 (Python carries such argv bytes as
    lone surrogates; paths are exempt, a file name may hold any bytes), numbers that are NaN or
    infinite, and negative seeds."""
    from vfx.errors import BadInput

    for name, value in kw.items():
        flag = f"--{name.replace('_', '-')}"
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise BadInput(f"{flag} is not valid UTF-8 text") from None
            elif isinstance(item, float) and not math.isfinite(item):
                raise BadInput(f"invalid {flag} {item}: must be a finite number")
        if name == "seed" and isinstance(value, int) and value < 0:
            raise BadInput(f"invalid --seed {value}: seeds are 0 or more")


def one_line(text: str, limit: int = 500) -> str:
    """An error message as one line: its first line, cut at `limit` characters (--debug shows it all)."""
    lines = text.strip().splitlines() or [""]
    line = lines[0] + (" …" if len(lines) > 1 else "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _is_oom(exc: Exception) -> bool:
    return "out of memory" in str(exc).lower() and type(exc).__name__ in {"OutOfMemoryError", "RuntimeError"}


def emit(result: dict[str, Any], as_json: bool, text: str | None = None) -> None:
    """Print a command's result on stdout: one JSON document, or a line of text."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    elif text:
        log.out.print(text)


def settings_for(root, model=None, device=None, dtype=None, shard=None, force=False, allow_pickle=False, model_config=None,
                 shardable=True):
    """Flags resolved against vfx.toml; stages that do not shard ignore the SLURM array variables."""
    from vfx.settings import Settings

    return Settings.resolve(root, model, device, dtype, shard, force, allow_pickle, model_config, shardable)


def report(result: dict, as_json: bool) -> None:
    state = result.get("state")
    if result.get("up_to_date"):
        text = f"{result['stage']}: up to date"
    elif state == "complete":
        text = f"{result['stage']}: complete ({result.get('computed_units', 0)} chunks computed here)"
    else:
        text = (f"{result['stage']}: shard {result.get('shard')} done; {result.get('done_units')}/{result.get('units')} "
                "chunks complete overall")
    emit(result, as_json, text)
