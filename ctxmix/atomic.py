"""File output: atomic, through links, and never over a device or the run's own input.

What a path names is what gets written:

- A symbolic link is followed: the file it points to is replaced (atomically, by a temp file beside
  that file), and the link itself stays as it was. A link to a missing file creates that file. A link
  into ``/proc`` (``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``) names an open file descriptor, not a
  file: it is refused, whatever the descriptor is open on.
- Anything that is not a regular file (a device such as ``/dev/stdout`` or ``/dev/null``, a FIFO, a
  socket, a directory) is refused: a rename would replace the device node itself, which is never what
  was meant.
- A path that is one of the run's inputs (the same file, by device and inode: also through a link or a
  hard link) is refused, so ``compress x -o x`` cannot destroy ``x``.

Nothing half-written ever carries the final name: the data goes to a temp file in the target's
directory, is flushed to disk, then renamed over the target. A replaced file keeps its permission bits.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Iterator, BinaryIO

from .errors import CtxmixError

_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}
PROC = "/proc"
MAX_LINKS = 40  # as the kernel's own limit on links followed in one lookup


def _on_proc(path: str) -> bool:
    """Is ``path`` inside procfs, whose links (fd/N, self) stand for open descriptors, not for files?"""
    if path == PROC or path.startswith(PROC + "/"):
        return True
    try:
        return os.stat(os.path.dirname(path)).st_dev == os.stat(PROC).st_dev
    except OSError:
        return False


def _resolve(name: str) -> str:
    """``name`` with every link followed (its directories' too), as an absolute path; CtxmixError for a
    link into procfs or a chain of more than MAX_LINKS links."""
    path = os.path.abspath(name)
    for _ in range(MAX_LINKS):
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if _on_proc(path):
            raise CtxmixError(f"cannot write {name}: it leads to {path}, an open file descriptor, not a file; "
                              "give the name of a file")
        if not os.path.islink(path):
            return path
        path = os.path.join(os.path.dirname(path), os.readlink(path))  # an absolute target replaces the join
    raise CtxmixError(f"cannot write {name}: more than {MAX_LINKS} links to follow")


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def output_target(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The regular file that writing ``path`` replaces: ``path`` with its links resolved.

    Raises CtxmixError (naming ``path``) when it names something other than a regular file or a file
    that does not exist yet, or the same file as one of ``inputs``. Inputs that cannot be read are
    ignored here (reading them fails on its own).
    """
    name = os.fspath(path)
    resolved = _resolve(name)
    try:
        found = os.stat(resolved)
    except FileNotFoundError:
        found = None
    except OSError as exc:
        raise CtxmixError(f"cannot write {name}: {exc.strerror}") from None
    if found is not None and not stat.S_ISREG(found.st_mode):
        kind = _KINDS.get(stat.S_IFMT(found.st_mode), "not a regular file")
        raise CtxmixError(f"cannot write {name}: it is {kind}; ctxmix writes regular files only")
    if found is not None:
        for item in inputs:
            try:
                if _same_file(found, os.stat(item)):
                    raise CtxmixError(f"cannot write {name}: it is the input {os.fspath(item)}; "
                                      "choose another output, the input would be destroyed")
            except OSError:
                continue
    return Path(resolved)  # for a link whose target does not exist yet: that target, which is created


def check_outputs(outputs: Iterable[str | os.PathLike | None], inputs: Iterable[str | os.PathLike] = ()) -> None:
    """``output_target`` for each given output (None skipped), before any work: a bad ``-o`` fails at once."""
    inputs = list(inputs)
    for out in outputs:
        if out is not None:
            output_target(out, inputs)


def _mode_for(target: Path) -> int:
    """mkstemp creates 0600: a replaced file keeps its mode, a new one gets what open() would give
    (0666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[BinaryIO]:
    """Open a temp file beside the file ``path`` names for binary writing; on success fsync it and rename
    it over that file (see the module docstring for links, devices and ``inputs``).

    On any exception the temp file is removed and the target is left as it was.
    """
    target = output_target(path, inputs)
    directory = target.parent
    if not directory.is_dir():
        raise CtxmixError(f"cannot write {os.fspath(path)}: directory {directory} does not exist")
    mode = _mode_for(target)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CtxmixError(f"cannot write {os.fspath(path)}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, inputs: Iterable[str | os.PathLike] = ()) -> None:
    with atomic_output(path, inputs) as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, inputs: Iterable[str | os.PathLike] = ()) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), inputs)
