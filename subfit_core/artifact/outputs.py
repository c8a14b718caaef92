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
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from subfit_core.errors import SubFitError

MARKER = ".subfit-output"  # in every folder SubFit writes: overwrite replaces only such folders
WRITING = ".subfit-writing"  # in a temporary folder while it is being written
_held: dict[str, int] = {}  # lock files this process holds: path -> fd (claims nest)
CLAIM_WAIT_S = 2.0
LEFTOVER = re.compile(r"\.(.+)\.(tmp|old|trash)-[^/]+")


def umask() -> int:
    try:  # read it where the system tells it: setting it to read it races with other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def written_by_subfit(folder: Path) -> bool:
    if (folder / MARKER).is_file():
        return True
    try:  # a model folder written before the marker existed (format 1; later ones carry the marker)
        info = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("subfit")
        return isinstance(info, dict) and info.get("format") == 1
    except (OSError, ValueError, TypeError, AttributeError):
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
def claim(target: Path, key: str = "output_dir", wait: float = CLAIM_WAIT_S, siblings: bool = True):
    """Hold the exclusive lock on ``target`` while the block runs; clean up what dead writers left
    for it (and, with ``siblings``, for other folders next to it whose lock is free).
    ``wait``: seconds to wait for another holder before failing with its pid (the default covers a
    cleaner that holds a lock for a rename, not a writer)."""
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
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
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


def leftovers(parent: Path) -> dict[str, dict[str, list[Path]]]:
    """SubFit's hidden work folders in ``parent`` by the folder they belong to: ``.NAME.tmp-*`` (a
    folder being written), ``.NAME.old-*`` (a previous result moved aside), ``.NAME.trash-*`` (on its
    way out). Names are matched exactly, never as patterns."""
    found: dict[str, dict[str, list[Path]]] = {}
    try:
        entries = os.listdir(parent)
    except OSError:
        return found
    for entry in entries:
        m = LEFTOVER.fullmatch(entry)
        if m and (parent / entry).is_dir() and not (parent / entry).is_symlink():
            found.setdefault(m.group(1), {}).setdefault(m.group(2), []).append(parent / entry)
    return found


def discard(folder: Path, target: Path) -> None:
    """Remove a work folder: first renamed to a trash name (instant, so a lock is held only for the
    rename), then deleted; a trash folder left by a kill is deleted by the next cleaner."""
    trash = target.with_name(f".{target.name}.trash-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.replace(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(target: Path) -> list[Path]:
    """Under ``target``'s lock: remove its temporary folders (their writers are dead, or they would
    hold the lock) and put back a previous result that a writer who died had moved aside."""
    mine = leftovers(target.parent).get(target.name, {})
    removed = []
    for tmp in mine.get("tmp", []):
        if (tmp / WRITING).is_file() or (tmp / MARKER).is_file():
            discard(tmp, target)
            removed.append(tmp)
    for old in mine.get("old", []):
        if not written_by_subfit(old):
            continue
        if target.exists():
            discard(old, target)
        else:
            os.replace(old, target)
        removed.append(old)
    for trash in mine.get("trash", []):
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(trash)
    return removed


def clean_siblings(target: Path) -> None:
    """Leftovers of dead writers of other folders in ``target``'s parent, cleaned under their own
    locks (a folder whose writer is alive keeps its lock, and is skipped; the lock is held only for
    renames, the deleting happens after)."""
    for name in sorted(set(leftovers(target.parent)) - {target.name}):
        try:
            with claim(target.parent / name, siblings=False):
                pass
        except (SubFitError, OSError):
            continue


def atomic_dir(target: Path, write, wait: float = CLAIM_WAIT_S) -> None:
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
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old)  # onto the empty folder just made: a name no one else has
                os.replace(tmp, target)
                discard(old, target)
            else:
                os.replace(tmp, target)
            (target / WRITING).unlink(missing_ok=True)  # kept until here: a writer killed before is cleaned
        except BaseException:
            if tmp.exists():
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
