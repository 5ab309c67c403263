"""The ``phiflash`` command line."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys

from .errors import PhiflashError
from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phiflash",
        description="Phi-4-mini-flash-reasoning (SambaY) on MLX, with a NumPy reference oracle.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"phiflash_mlx.commands.{name}").register(sub)
    return parser


_interrupted = False


def _on_sigint(signum, frame):
    """Python's own Ctrl-C behaviour, remembered: an interrupt inside a C extension's import can come
    out as an ImportError with no KeyboardInterrupt in its chain (numpy's "could not import module")."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _import_extensions() -> None:
    """Import NumPy and MLX with Ctrl-C held back until they are in: an interrupt that lands while
    MLX's extension builds its enums aborts the process from inside the extension ("Critical
    nanobind error" and a traceback, whatever Python does with it). A Ctrl-C pressed meanwhile is
    delivered right after, as KeyboardInterrupt."""
    block = getattr(signal, "pthread_sigmask", None)
    if block is None or "mlx.core" in sys.modules:
        return
    previous = block(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        import numpy  # noqa: F401
        import mlx.core  # noqa: F401
    finally:
        block(signal.SIG_SETMASK, previous)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 success, 1 a one-line error, 2 a usage error, 130 interrupted (Ctrl-C), 141 the
    reader of the output went away (`| head`): quietly, as other command-line tools do."""
    command = "command"
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        _import_extensions()
        parser = build_parser()                  # imports the command modules (and MLX): Ctrl-C may land here
        args = parser.parse_args(argv)
        command = args.command
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        status = int(args.func(args) or 0)
        sys.stdout.flush()                       # a full disk or a closed pipe shows up here, not at exit
        return status
    except PhiflashError as exc:
        print(f"phiflash {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except ImportError as exc:
        cause = exc
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__cause__ or cause.__context__      # MLX's extension wraps Ctrl-C in ImportError
        if cause is None and not _interrupted:
            print(f"phiflash {command}: error: {exc}; reinstall phiflash-mlx and its dependencies",
                  file=sys.stderr)
            return 1
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC)) and not exc.filename:
            _silence_stdout()
            print(f"phiflash {command}: error: cannot write the output: {exc.strerror}", file=sys.stderr)
        else:
            where = f" ({exc.filename})" if exc.filename else ""
            print(f"phiflash {command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
