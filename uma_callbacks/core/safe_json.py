"""Bounded JSON reading: the one way content read from disk becomes Python objects.

Files and journal lines are data from anywhere (a torn write, a flipped byte, a hand
edit, a hostile copy). ``json.loads`` alone is not safe on them: 200,000 nested ``[``
raise ``RecursionError`` (not a ``ValueError``), a huge file raises ``MemoryError``,
invalid UTF-8 raises ``UnicodeDecodeError``, and ``NaN``/``Infinity``/``1e999`` are
accepted. Here, before anything is parsed:

- the text is at most ``max_bytes`` long (:data:`MAX_LINE_BYTES` for one line,
  :data:`MAX_FILE_BYTES` for a file; a longer one is refused without being read whole);
- its bracket nesting, counted outside strings by a linear scan, is at most
  ``max_depth`` (:data:`MAX_DEPTH`);

and then ``json.loads`` runs with ``NaN``, ``Infinity`` and non-finite numbers refused.
Every failure, of whatever kind, is one :class:`UnreadableJSON` (a ``ValueError``) whose
message says what was wrong; a missing or unopenable file stays an ``OSError``. Files
are opened without blocking and must be regular files (a FIFO planted in a run folder
cannot hang a reader).

Example:
    >>> loads_bounded('{"a": [1, 2]}')
    {'a': [1, 2]}
    >>> loads_bounded("[" * 100_000)
    Traceback (most recent call last):
    ...
    uma_callbacks.core.safe_json.UnreadableJSON: JSON nested deeper than 100 levels
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

#: The deepest bracket nesting accepted (records, results and checkpoint state use < 10).
MAX_DEPTH = 100
#: The longest journal line accepted, in bytes.
MAX_LINE_BYTES = 64 * 2**20
#: The largest JSON file accepted, in bytes (result files hold arrays as lists).
MAX_FILE_BYTES = 512 * 2**20

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


class UnreadableJSON(ValueError):
    """Text that is not bounded, strict JSON (the message says why)."""


def nesting_depth(data: bytes) -> int:
    """The deepest bracket nesting of ``data`` outside JSON strings (a linear scan).

    Brackets inside an unterminated string are counted too, which can only overstate.
    """
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


def _refuse_constant(name: str) -> Any:
    raise UnreadableJSON(f"JSON holds the non-finite constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnreadableJSON(f"JSON holds the number {text[:40]}, which is not a finite float")
    return value


def loads_bounded(text: str | bytes, max_bytes: int = MAX_LINE_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(text)`` for text from disk: bounded in size and depth, strict, one error type.

    Args:
        text: the JSON text (``bytes`` must be UTF-8).
        max_bytes: the longest text accepted, in bytes.
        max_depth: the deepest bracket nesting accepted.

    Raises:
        UnreadableJSON: too long, nested too deep, not UTF-8, not JSON, a non-finite
            number, or the parser failed in any other way (``RecursionError``, ``MemoryError``).
    """
    try:
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        if len(data) > max_bytes:
            raise UnreadableJSON(f"JSON text of {len(data)} bytes is longer than the {max_bytes} accepted")
        if data.count(b"[") + data.count(b"{") > max_depth and nesting_depth(data) > max_depth:
            raise UnreadableJSON(f"JSON nested deeper than {max_depth} levels")
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except UnreadableJSON:
        raise
    except (ValueError, UnicodeError, RecursionError, MemoryError, TypeError, OverflowError) as err:
        raise UnreadableJSON(f"not readable JSON ({type(err).__name__}: {str(err)[:200]})") from None


def read_bytes_bounded(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, opened without blocking.

    Raises:
        OSError: the file is missing or cannot be opened or read.
        UnreadableJSON: not a regular file (a FIFO, a device, a folder), or too large.
    """  # noqa: DOC502 (OSError: from os.open, os.read)
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableJSON(f"{Path(path).name} is not a regular file")
        if st.st_size > max_bytes:
            raise UnreadableJSON(f"{Path(path).name} holds {st.st_size} bytes, more than {max_bytes} accepted")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                raise UnreadableJSON(f"{Path(path).name} is larger than the {max_bytes} bytes accepted")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json(
    path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES, max_depth: int = MAX_DEPTH
) -> Any:
    """The JSON content of the file ``path``, read within bounds (see :func:`loads_bounded`).

    Raises:
        OSError: the file is missing or cannot be opened or read.
        UnreadableJSON: not a regular file, too large, too deep, or not strict JSON; the
            message names the file.
    """  # noqa: DOC502 (OSError: from read_bytes_bounded)
    try:
        return loads_bounded(read_bytes_bounded(path, max_bytes), max_bytes=max_bytes, max_depth=max_depth)
    except UnreadableJSON as err:
        raise UnreadableJSON(f"{Path(path).name}: {err}") from None
    except MemoryError:
        raise UnreadableJSON(f"{Path(path).name}: not readable (MemoryError)") from None
