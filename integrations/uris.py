"""Tracker URIs from filesystem paths: a local store opens exactly where its path says.

SQLAlchemy (which MLflow's SQLite store goes through) percent-decodes the database part
of ``sqlite:///<path>`` and ends it at the first ``?`` (the query). A run folder named
``a%41b`` therefore opened ``aAb`` (a folder that does not exist: MLflow retried for about
100 s per call), and one named ``a?b`` put the store in ``a``, outside the run folder.

:func:`sqlite_uri` escapes exactly what SQLAlchemy would misread (``%``, ``?`` and control
characters such as a newline) and nothing else: spaces, ``#``, ``@``, ``:``, ``;`` and
non-ASCII letters are read literally, and MLflow makes the store's parent folder from the
URI's raw text (not decoded), so a character escaped needlessly would make it create a
stray folder. Where escaping is needed that stray folder cannot be avoided;
:func:`no_stray_folders` removes it again when MLflow created it empty.

A path that is not valid UTF-8 (a Linux file name of arbitrary bytes) cannot be written as
a URL that decodes back to it: :func:`sqlite_uri` refuses it with a message that says what
to do instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

SQLITE_PREFIX = "sqlite:///"


def _needs_escape(ch: str) -> bool:
    return ch in "%?" or ord(ch) < 32 or ord(ch) == 127


def sqlite_uri(path: str | os.PathLike[str]) -> str:
    """``sqlite:///<absolute path>`` that SQLAlchemy and MLflow open at exactly ``path``.

    Args:
        path: the database file (made absolute; symlinks resolved).

    Raises:
        ValueError: the path is not valid UTF-8 (no URL decodes back to it).

    Example:
        >>> sqlite_uri("/runs/a%41b?c #1/mlflow.db")
        'sqlite:////runs/a%2541b%3Fc #1/mlflow.db'
    """
    text = str(Path(path).resolve())
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"the SQLite tracking store path {text!r} is not valid UTF-8, so no sqlite:/// URL reaches it; "
            "give the tracker a tracking_uri (or set MLFLOW_TRACKING_URI), or use an output_dir with a UTF-8 name"
        ) from err
    escaped = "".join("".join(f"%{b:02X}" for b in ch.encode()) if _needs_escape(ch) else ch for ch in text)
    return SQLITE_PREFIX + escaped


def sqlite_path(uri: str) -> Path | None:
    """The file a ``sqlite:///`` URI opens (what SQLAlchemy reads), ``None`` for other URIs."""
    if not isinstance(uri, str) or not uri.startswith(SQLITE_PREFIX):
        return None
    from urllib.parse import unquote

    database = uri[len(SQLITE_PREFIX) :].split("?", 1)[0]
    return Path(unquote(database))


@contextlib.contextmanager
def no_stray_folders(uri: str | None) -> Iterator[None]:
    """Remove, on exit, the folders MLflow made from the raw text of an escaped ``uri`` (if empty).

    MLflow creates ``Path(<text after sqlite:///>).parent`` before opening a SQLite store;
    for ``.../a%2541b/uma/mlflow.db`` that is a folder ``a%2541b`` beside the run folder.
    Only folders that did not exist before the block and are empty after it are removed.
    """
    missing: list[Path] = []
    if isinstance(uri, str) and uri.startswith(SQLITE_PREFIX) and "%" in uri:
        folder = Path(uri[len(SQLITE_PREFIX) :]).parent
        if folder != sqlite_path(uri).parent:  # type: ignore[union-attr]
            while not folder.exists() and folder != folder.parent:
                missing.append(folder)
                folder = folder.parent
    try:
        yield
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty, not ours, already gone
                break
