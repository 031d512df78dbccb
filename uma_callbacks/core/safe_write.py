"""Writing files into a folder without following links, and without leaving partial files.

What is on disk may have been planted: a ``step-<N>`` folder that is a symbolic link to
``/etc``, a result name that is a link to a file outside. :func:`open_folder` walks from
a trusted root to a subfolder one component at a time, each opened relative to its parent's
descriptor with ``O_NOFOLLOW | O_DIRECTORY`` (created when missing), so the descriptor it
returns is a real folder inside the root whatever the paths point to. :func:`put_file`
writes into that descriptor: a fresh temporary name (``O_CREAT | O_EXCL | O_NOFOLLOW``),
``fsync``, then a rename over the target, which replaces a directory entry and never
writes through one (a hard link at the target name loses that name; its other names keep
their content). A target name that is a symbolic link or not a regular file is refused.

A write that fails (disk full, quota, I/O error) removes its temporary file: no empty or
partial file is left, and the target keeps what it held before.

:func:`write_atomically` is the same for a plain path whose folder the caller trusts
(figures of ``uma report``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class RefusedPath(OSError):
    """A write refused: a symbolic link, or not a folder/regular file, where one is written."""


def open_folder(root: str | os.PathLike[str], parts: Sequence[str]) -> int:
    """A descriptor of ``root/parts[0]/parts[1]/...``; the caller closes it.

    Each part is created when missing and opened without following a link.

    ``root`` itself is opened as given (the journal's root is the caller's choice).

    Raises:
        RefusedPath: a part is a symbolic link (to anywhere) or not a folder.
        OSError: creating or opening failed (disk full, permissions).
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    walked = Path(root)
    try:
        for part in parts:
            if not part or part in (".", "..") or "/" in part:
                raise RefusedPath(errno.EINVAL, f"{part!r} is not a plain folder name", str(walked))
            walked = walked / part
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise RefusedPath(err.errno, "a symbolic link or not a folder", str(walked)) from None
                raise
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def identity(data: bytes) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file's content: what a record keeps of each file it wrote."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def put_file(folder_fd: int, name: str, data: bytes) -> dict[str, Any]:
    """Write ``data`` as ``name`` in the folder ``folder_fd`` (temporary file, fsync, rename).

    Returns:
        The file's :func:`identity`.

    Raises:
        RefusedPath: ``name`` exists as a symbolic link or as something other than a regular file.
        OSError: the write failed; the temporary file is removed, ``name`` is as it was.
    """
    try:
        st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise RefusedPath(errno.EEXIST, f"{kind} is in the way", name)
    tmp = f".{name[:100]}.{secrets.token_hex(6)}.tmp"
    fd = os.open(
        tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644, dir_fd=folder_fd
    )
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=folder_fd)
        except OSError:
            pass
        raise
    return identity(data)


def write_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in its folder, renamed over it.

    The folder is taken as it is (links in it followed); the file name itself is written
    with :func:`put_file` (a link there is refused). On failure nothing is left behind.

    Raises:
        RefusedPath: ``path`` exists as a symbolic link or as something other than a regular file.
        OSError: the folder cannot be opened, or the write failed (nothing is left behind).
    """  # noqa: DOC502 (from put_file and os.open)
    path = Path(path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        put_file(fd, path.name, data)
    finally:
        os.close(fd)
    return path
