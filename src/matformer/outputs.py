"""Safe outputs, the one owner of the disk: directories are written through
:func:`atomic_output`, files through :func:`atomic_file` / :func:`write_text_atomic` /
:func:`write_bytes_atomic` / :func:`save_figure`, folders made by :func:`make_dir`, and a log
appended to by :func:`append_line` (a run's ``metrics.jsonl``, rewritten atomically when a
resume truncates it). Inside the temporary
folder of an :func:`atomic_output`, writers write as they like: nothing there is in place
until the whole folder is renamed.

One rule: never delete or overwrite what the user did not ask to replace.

- A writer fills a fresh temporary directory beside its target (``.NAME.tmp-<random>``) and renames
  it into place only when everything is written and flushed to disk, so a crash, a full disk or
  an exception leaves the previous content where it was.
- An existing target (a file or a non-empty directory) is refused unless the caller asks to
  replace it (``overwrite``, the CLI's ``--force``); it is then replaced as a whole: moved aside
  (``.NAME.old-<random>``), the new one renamed in, the old one removed. Stale files never survive.
- A command's input is never its output, ``--force`` or not.
- :func:`clean_leftovers` removes what an interrupted write left beside its target.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class OutputError(ValueError):
    """An output cannot be written (a full disk, a read-only folder): nothing was replaced."""


class OutputExistsError(OutputError):
    """An output path already holds something, or is (or holds) the command's own input."""


def check_output(target: str | Path, *, overwrite: bool = False,
                 sources: Iterable[str | Path] = ()) -> Path:
    """Refuse an output path whose writing would lose data the user did not ask to replace.

    ``target`` may not be any of ``sources``, a folder holding one, nor an existing file or
    folder inside one, whatever ``overwrite`` says (a new path inside a source is fine). An existing file or non-empty directory is refused unless ``overwrite`` (an empty
    directory holds nothing to lose and is reused).

    Raises:
        OutputExistsError: Naming the path and what to do instead.
    """
    target = Path(target)
    real = target.resolve()
    sources = [(source, Path(source).resolve()) for source in sources]
    for source, s in sources:
        if real == s or real in s.parents:
            raise OutputExistsError(f"output {target} is the input {source} (or holds it): "
                                    "writing it would destroy the input; choose another output "
                                    "path (overwrite=True does not allow this)")
    for source, s in sources:
        if s in real.parents and _exists(target):
            raise OutputExistsError(f"output {target} is part of the input {source}: replacing "
                                    "it would corrupt the input; choose another output path "
                                    "(overwrite=True does not allow this)")
    if _exists(target) and not _empty_dir(target) and not overwrite:
        what = "a non-empty directory" if target.is_dir() else "a file"
        raise OutputExistsError(f"output {target} already exists ({what}); choose a new path, "
                                "or pass overwrite=True to replace it")
    return target


def _exists(path: Path) -> bool:
    return path.is_symlink() or path.exists()


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def remove_output(path: Path) -> None:
    """Remove a file or folder this package wrote (a replaced output, a pruned checkpoint);
    what cannot be removed is left."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask_modes(folder: Path) -> None:
    """Give every file below ``folder`` the mode an ordinary new file gets under the umask:
    some writers (safetensors) create their files private (0600), and a server or a teammate
    running as another user could not read them."""
    mask = os.umask(0)
    os.umask(mask)
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o666 & ~mask)


def _fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` (then the folders) to disk before it is renamed."""
    for p in [*sorted(folder.rglob("*"), reverse=True), folder]:
        fd = os.open(p, os.O_RDONLY | (os.O_DIRECTORY if p.is_dir() else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing target is first moved aside, then removed."""
    if not _exists(target) or _empty_dir(target):
        os.replace(tmp, target)  # fails, losing nothing, if a non-empty target appeared since
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    remove_output(old)


def make_temp(target: Path, *, directory: bool) -> Path:
    """A fresh ``.NAME.tmp-*`` file or folder beside ``target``, with the permissions an
    ordinary one gets under the current umask (``tempfile`` makes them private, 0600 / 0700,
    and a rename would keep that: a server running as another user could not read them)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~mask)
    return tmp


#: Below this many free bytes, a failed write is taken for a full disk (writers such as
#: numpy's ``tofile`` report a short write without an errno).
NEARLY_FULL = 1 << 16


def disk_full(e: BaseException, target: Path) -> bool:
    """Whether the failed write of ``target`` ran out of disk space: ENOSPC, a library's
    message for it (safetensors: "No space left on device (os error 28)"), or a short write
    on a file system with (almost) no space left."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    if os.strerror(errno.ENOSPC) in str(e) or f"os error {errno.ENOSPC}" in str(e):
        return True
    if not isinstance(e, OSError | RuntimeError):
        return False
    try:
        st = os.statvfs(target.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < NEARLY_FULL


def _failed(e: BaseException, target: Path) -> OutputError | None:
    """The error to raise in place of ``e`` when the disk is full (naming ``target``); None
    for other errors, and for a ValueError (already a message of ours)."""
    if not isinstance(e, ValueError) and disk_full(e, target):
        return OutputError(f"no space left on device writing {target}: nothing was replaced "
                           "(free some space and run again)")
    return None


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """A temporary file beside ``target`` (:func:`make_temp`), renamed to ``target`` when the
    block succeeds and removed when it fails, so a crash never leaves a half-written file.
    A full disk is an :class:`OutputError` naming ``target``."""
    target = Path(target)
    tmp = make_temp(target, directory=False)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as e:
        full = _failed(e, target)  # before the temporary file's space is given back
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise


@contextmanager
def atomic_output(target: str | Path, *, overwrite: bool = False,
                  sources: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Write a directory atomically: yield a fresh temporary directory beside ``target``;
    when the block ends without an error it is flushed and renamed to ``target``, otherwise
    removed.

    The target is checked first (:func:`check_output`). A crash at any moment leaves the old
    target or the new one in place, plus at most a ``.NAME.tmp-*`` or ``.NAME.old-*`` leftover
    beside it.

    Raises:
        OutputExistsError: The target is refused.
        OutputError: An OS error (a full disk, a read-only folder) while creating or renaming.
    """
    target = check_output(target, overwrite=overwrite, sources=sources)
    try:
        tmp = make_temp(target, directory=True)
    except OSError as e:
        raise OutputError(f"cannot create {target}: {e}") from e
    try:
        yield tmp
        _umask_modes(tmp)
        _fsync_tree(tmp)
        _into_place(tmp, target)
    except BaseException as e:
        full = _failed(e, target)  # before the temporary folder's space is given back
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from e
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {target}: {e}; nothing was replaced") from e
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace the file ``path`` with ``text`` atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace the file ``path`` with ``data`` atomically (a temporary file beside it, flushed,
    then renamed): a crash leaves the old content or the new one, never a torn file."""
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log file (a run's ``metrics.jsonl``), flushed; a kill can tear at
    most this line, which readers skip. A full disk is an :class:`OutputError` naming it."""
    path = Path(path)
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
    except OSError as e:
        raise _failed(e, path) or OutputError(f"cannot append to {path}: {e}") from e


def make_dir(path: str | Path) -> Path:
    """Create the folder ``path`` and its missing parents (an existing folder is fine); an OS
    error is an :class:`OutputError` naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _failed(e, path) or OutputError(f"cannot create the folder {path}: {e}") from e
    return path


def save_figure(fig: Any, path: str | Path, **kw: Any) -> None:
    """Save a matplotlib figure to ``path`` atomically (the format from its suffix)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kw)


def clean_leftovers(folder: str | Path, pattern: str = ".*") -> list[str]:
    """Remove what interrupted atomic writes left in ``folder``; return the names handled.

    ``.NAME.tmp-*`` (a write that never finished) is deleted. ``.NAME.old-*`` (a replaced
    target not yet removed) is deleted when ``NAME`` exists, and renamed back to ``NAME``
    otherwise (the crash fell between the two renames: it is the only copy). Only entries
    matching the glob ``pattern`` (e.g. ``.step_*``) are considered.
    """
    folder, done = Path(folder), []
    if not folder.is_dir():
        return done
    for p in sorted(folder.glob(pattern)):
        if ".tmp-" in p.name:
            remove_output(p)
        elif ".old-" in p.name:
            dest = folder / p.name[1:].rsplit(".old-", 1)[0]
            if _exists(dest):
                remove_output(p)
            else:
                os.replace(p, dest)
        else:
            continue
        done.append(p.name)
    if done:
        log.info("cleaned leftovers of interrupted writes in %s: %s", folder, done)
    return done
