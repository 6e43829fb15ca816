"""Crash-safe file output: write to a temporary sibling, fsync, rename; and an exclusive run lock.

A reader (or a resumed run) sees either the previous complete directory or the new complete
one, never a half-written one — whatever kills the writer (exception, SIGKILL, full disk).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError, QLoraLiteError

__all__ = ["atomic_directory", "atomic_write_text", "fsync_tree", "RunLock", "OutputExistsError", "DiskFullError",
           "refuse_output_over_inputs", "refuse_existing", "clean_stale_temps"]


class OutputExistsError(QLoraLiteError, FileExistsError):
    pass


class DiskFullError(QLoraLiteError, OSError):
    pass


def fsync_tree(path: Path) -> None:
    """fsync every file below `path` and the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exists_message(target: Path) -> str:
    return (f"{target} already exists; choose another output path, or replace it with --overwrite true "
            "(overwrite=True in Python)")


def refuse_existing(target: str | Path, overwrite: bool) -> None:
    """OutputExistsError if `target` exists and may not be replaced."""
    if Path(target).exists() and not overwrite:
        raise OutputExistsError(_exists_message(Path(target)))


def refuse_output_over_inputs(out: str | Path, inputs: dict[str, str | Path]) -> None:
    """Refuse an output directory that is, contains or lies inside an input: replacing it would delete
    the input (`merge --out <run dir> --overwrite true` deleted the adapter it was merging)."""
    out_path = Path(out).resolve()
    for what, path in inputs.items():
        path = Path(path).resolve()
        relation = ("is" if out_path == path else "contains" if out_path in path.parents
                    else "is inside" if path in out_path.parents else None)
        if relation:
            raise ConfigError(f"the output {out} {relation} the {what} {path}; writing there would replace one "
                              "of the inputs: choose an output directory outside them", "output directory")


def _temp_name(target: Path, kind: str) -> Path:
    # the pid lets a later run tell a killed writer's leftovers from a live one's
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(target: str | Path) -> list[Path]:
    """Remove `.<target>.tmp-<pid>-*` / `.old-<pid>-*` siblings whose writer has died (a killed merge
    leaves a full-size hidden copy otherwise). A live writer's temp directory is never touched."""
    target = Path(target)
    removed = []
    for kind in ("tmp", "old"):
        for stale in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = stale.name[len(f".{target.name}.{kind}-"):].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    return removed


def _disk_full(exc: BaseException, target: Path) -> bool:
    """ENOSPC, also when a writer wraps it (torch.save raises RuntimeError "file write failed")."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    if isinstance(exc, RuntimeError) and "write" in str(exc).lower():
        try:
            return shutil.disk_usage(target.parent).free < 2**20
        except OSError:
            return False
    return False


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `target` in one rename.

    On any exception the temporary directory is removed and `target` is left as it was.
    A full disk becomes a `DiskFullError` that says how to recover. The existence check is repeated at
    the commit, so a target that appeared meanwhile is not replaced without `overwrite`. Temp directories
    that killed writers left beside `target` are removed first.
    """
    target = Path(target)
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp = _temp_name(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists() and not overwrite:
            raise OutputExistsError(_exists_message(target) + " (it appeared while this one was being written)")
        if target.exists():
            old = _temp_name(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc, target) and not isinstance(exc, DiskFullError):
            raise DiskFullError(errno.ENOSPC, f"no space left while writing {target}; nothing was changed there. "
                                "Free disk space (or choose another output directory) and run again") from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RunLock:
    """An exclusive, advisory lock on an output directory, released when the process dies.

    `RunLock(run_dir)` keeps `.qlora-lite.lock` inside the run directory; `RunLock.beside(out)` locks an
    output that is replaced by a rename (merge, quantize) with `.<out>.lock` next to it, removed on release.
    """

    def __init__(self, directory: str | Path, lock_file: str | Path | None = None):
        self.target = Path(directory)
        self.path = Path(lock_file) if lock_file is not None else self.target / ".qlora-lite.lock"
        self._remove = lock_file is not None
        self._fd: int | None = None

    @classmethod
    def beside(cls, target: str | Path) -> RunLock:
        target = Path(target)
        return cls(target, target.parent / f".{target.name}.lock")

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                try:
                    holder = self.path.read_text().strip() or "another process"
                except OSError:
                    holder = "another process"
                raise QLoraLiteError(f"{self.target} is in use by {holder}; wait for it to finish or choose "
                                     "another output directory") from None
            try:  # a releasing holder may have unlinked the file we locked: lock the current one instead
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            if self._remove:  # while still holding it, so no one else holds this file
                self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
