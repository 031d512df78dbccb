"""Names read from disk that must stay inside their folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def is_plain_file_name(name: Any) -> bool:
    """Whether ``name`` is one file name in its folder (what an index or a checkpoint's metadata may name).

    That is a non-empty string with no path separator, no ``.``/``..`` and no NUL.

    Example:
        >>> [is_plain_file_name(n) for n in ("model-00001.safetensors", "../x", "a/b", "..", 3)]
        [True, False, False, False, False]
    """
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and Path(name).name == name
    )
