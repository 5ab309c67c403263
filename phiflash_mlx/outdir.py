"""Output directories that cannot destroy: `convert` and `golden` write here.

The rules (README, "What convert does with an existing destination"):

* the destination must not be, contain, or lie inside a source directory, must not be a file, a symbolic
  link or below a file;
* an existing directory is replaced only when it is empty or was written by the same tool (its marker is
  there); any other directory is refused whatever the flags;
* the new contents are written into a temporary sibling (`.NAME.partial-PID-XXXX`) and renamed into place
  only when complete; the old directory is removed only after that. An interrupted run leaves at most a
  hidden partial sibling, which does not load (config.json is written last) and does not block the next
  run (which removes partial siblings of dead processes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable

from .errors import PhiflashError


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_destination(dst: str, sources: Iterable[str], is_ours: Callable[[Path], bool], tool: str,
                      force: bool | None, option: str = "destination") -> Path:
    """Validate an output directory before anything is written; returns it as an absolute path.

    force=None: an existing directory of ours is replaced without asking (golden sets are regenerated);
    force=False: it is refused with a hint to pass --force; force=True: it is replaced."""
    path = Path(os.path.abspath(os.path.expanduser(dst)))
    if path.is_symlink():
        raise PhiflashError(f"{option} {dst} is a symbolic link; give the real directory it points to, or a new one")
    # the first existing ancestor must be a directory
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise PhiflashError(f"{option} {dst} lies below {parent}, which is a file, not a directory; "
                                    "choose another destination")
            break
    real = os.path.realpath(path)
    for src in sources:
        rsrc = os.path.realpath(os.path.expanduser(str(src)))
        if real == rsrc:
            raise PhiflashError(f"{option} {dst} is the source {src}; choose a new directory for the output")
        if _inside(real, rsrc):
            raise PhiflashError(f"{option} {dst} lies inside the source {src}; choose a directory outside it")
        if _inside(rsrc, real):
            raise PhiflashError(f"{option} {dst} contains the source {src}; choose a directory that does not")
    if not os.path.lexists(path):
        return path
    if not path.is_dir():
        raise PhiflashError(f"{option} {dst} is a file, not a directory; choose another destination "
                            "(phiflash does not replace files)")
    try:
        empty = not any(os.scandir(path))
    except OSError as exc:
        raise PhiflashError(f"cannot read {option} {dst}: {exc.strerror or exc}; choose another destination") from None
    if not empty and not is_ours(path):
        raise PhiflashError(f"{option} {dst} exists and is not a directory written by {tool}; phiflash never "
                            "replaces it: choose another destination, or move it away yourself")
    if force is False:
        raise PhiflashError(f"{option} {dst} already exists; choose another destination, or pass --force to "
                            f"replace it (it holds {'nothing' if empty else 'an earlier output of ' + tool})")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale(parent: Path, name: str) -> None:
    """Partial siblings of runs that died (SIGKILL, power loss) are removed by the next run."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        for tag in (".partial-", ".old-"):
            prefix = f".{name}{tag}"
            if entry.name.startswith(prefix):
                pid = entry.name[len(prefix):].split("-", 1)[0]
                if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                    shutil.rmtree(entry.path, ignore_errors=True)


def temporary_sibling(dst: Path) -> Path:
    """A new empty hidden directory beside `dst` (same file system, so the final rename is atomic)."""
    parent = dst.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent, dst.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)          # mkdtemp makes 0700; the output gets the usual mode
        return tmp
    except OSError as exc:
        raise PhiflashError(f"cannot create the output beside {dst}: {exc.strerror or exc}; check that "
                            f"{parent} is writable") from None


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM for the two renames, so an interrupt cannot fall between them."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot, and the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def place(tmp: Path, dst: Path) -> Path:
    """Move the finished `tmp` to `dst`, replacing an existing `dst` only now that `tmp` is whole."""
    trash = None
    with _signals_deferred():
        try:
            if not os.path.lexists(dst):
                os.rename(tmp, dst)
            elif _exchange(tmp, dst):                # one atomic step; tmp now holds the old directory
                trash = tmp
            else:
                trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-{os.getpid()}-", dir=dst.parent))
                os.rename(dst, trash / dst.name)
                try:
                    os.rename(tmp, dst)
                except OSError:
                    os.rename(trash / dst.name, dst)
                    shutil.rmtree(trash, ignore_errors=True)
                    raise
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PhiflashError(f"cannot move the finished output into {dst}: {exc.strerror or exc}") from None
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return dst


@contextlib.contextmanager
def atomic_directory(dst: Path):
    """Yields a temporary sibling to write into; on success it becomes `dst`, on any failure or interrupt
    it is removed and `dst` is left as it was."""
    tmp = temporary_sibling(dst)
    try:
        yield tmp
        place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
