"""Output folders: written whole or not at all, replaced only when SubFit wrote them, one writer
at a time, and nothing left behind by a writer that died.

* Every folder SubFit writes holds a marker file (``MARKER``); ``overwrite=true`` replaces only a
  folder that has one (or an older SubFit model folder), never anything else.
* A writer holds an exclusive lock (``.NAME.lock`` next to the folder, ``flock``) while it works,
  so a second process aiming at the same folder fails at once instead of silently replacing the
  first one's result.
* A folder is written under a hidden temporary name (``.NAME.tmp-*``, marked as SubFit's) and
  renamed into place. Whoever next takes the lock removes temporary folders of writers that died
  and puts back a folder a dead writer had moved aside (``.NAME.old-*``) without replacing it.
* Folders and files follow the user's umask, like any other file they create.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import SubFitError

MARKER = ".subfit-output"  # in every folder SubFit writes: overwrite replaces only such folders
WRITING = ".subfit-writing"  # in a temporary folder while it is being written
_held: dict[str, int] = {}  # lock files this process holds: path -> fd (claims nest)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def written_by_subfit(folder: Path) -> bool:
    if (folder / MARKER).is_file():
        return True
    try:  # a model folder written before the marker existed
        return "subfit" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def check_output_dir(output_dir: str | Path, overwrite: bool, key: str = "output_dir") -> Path:
    """Refuse, before any work, an output folder that cannot or must not be written."""
    out = Path(output_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise SubFitError(f"{key}: '{out}' exists and is not a folder; choose another path")
        if not overwrite:
            raise SubFitError(f"{key}: '{out}' already exists; choose another or set overwrite=true")
        if not written_by_subfit(out):
            raise SubFitError(f"{key}: '{out}' was not written by SubFit (no {MARKER} in it), so overwrite=true "
                              "will not replace it; choose another folder")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SubFitError(f"{key}: cannot create '{out}': '{ancestor}' is not a writable folder")
    return out


@contextmanager
def claim(target: Path, key: str = "output_dir", wait: float = 0.0, siblings: bool = True):
    """Hold the exclusive lock on ``target`` while the block runs; clean up what dead writers left
    for it (and, with ``siblings``, for other folders next to it whose lock is free).
    ``wait``: seconds to wait for another holder (0: fail at once, naming it)."""
    lock = target.parent / f".{target.name}.lock"
    path = str(lock.absolute())
    if path in _held:
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise SubFitError(f"{key}: '{target}' is being written by another SubFit process (pid {holder}); "
                              "wait for it to finish or choose another folder") from None
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder we waited for removed this lock file: take the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = fd
    try:
        clean_leftovers(target)
        if siblings:
            clean_siblings(target)
        yield
    finally:
        del _held[path]
        lock.unlink(missing_ok=True)
        os.close(fd)


def clean_leftovers(target: Path) -> list[Path]:
    """Under ``target``'s lock: remove its temporary folders (their writers are dead, or they would
    hold the lock) and put back a folder moved aside by a writer that died before replacing it."""
    removed = []
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        if (tmp / WRITING).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    for old in target.parent.glob(f".{target.name}.old-*"):
        if not old.is_dir() or not written_by_subfit(old):
            continue
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)
        removed.append(old)
    return removed


def clean_siblings(target: Path) -> None:
    """Leftovers of dead writers of other folders in ``target``'s parent, cleaned under their own
    locks (a folder whose writer is alive keeps its lock, and is skipped)."""
    names = {p.name[1:].rsplit(".tmp-", 1)[0] for p in target.parent.glob(".*.tmp-*") if (p / WRITING).is_file()}
    for name in sorted(names - {target.name}):
        try:
            with claim(target.parent / name, siblings=False):
                pass
        except (SubFitError, OSError):
            continue


def atomic_dir(target: Path, write, wait: float = 0.0) -> None:
    """Call ``write(tmp_dir)`` and move the result to ``target`` only if it succeeds (``wait``: as
    for ``claim``)."""
    with claim(target, wait=wait):
        if target.exists() and not (target.is_dir() and written_by_subfit(target)):
            raise SubFitError(f"output_dir: '{target}' exists and was not written by SubFit; it is not replaced")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            (tmp / WRITING).touch()
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private
            write(tmp)
            (tmp / MARKER).write_text(json.dumps({"written_by": "subfit"}) + "\n")
            follow_umask(tmp)  # some writers (safetensors) create private files
            (tmp / WRITING).unlink()
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def follow_umask(folder: Path) -> None:
    mask = umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_atomic(path: Path, text: str) -> None:
    """One file, written under a temporary name and renamed into place (mode from the umask)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
