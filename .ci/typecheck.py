"""Type-check the public API with mypy, as configured in pyproject.toml's ``[tool.mypy]``.

Run from the repository root: ``python .ci/typecheck.py`` (extra arguments go to mypy).

Plain ``mypy`` cannot check ``uma_callbacks.integrations``: its sources live in ``integrations/``
and are installed under that name by ``[tool.setuptools.package-dir]``, which the editable
install implements with an import hook that mypy does not read. Given ``integrations/base.py``,
mypy would call it ``integrations.base``, and every ``from uma_callbacks.integrations import ...``
elsewhere would find nothing. This script runs mypy with the same options and files, naming each
file under a remapped folder by the package it is installed as, so those imports resolve to the
checked files. The exit status is mypy's: 0 clean, 1 type errors, 2 a crash or bad options.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: mypy depends on tomli there
    import tomli as tomllib

from mypy import util
from mypy.fscache import FileSystemCache
from mypy.main import process_options, run_build

ROOT = Path(__file__).resolve().parent.parent


def package_dirs() -> dict[str, str]:
    """Folders installed under another package name, from ``[tool.setuptools.package-dir]``.

    Returns:
        ``{"integrations": "uma_callbacks.integrations"}``: the folder's name as mypy would
        derive it from the path, mapped to the package it is installed as.
    """
    with open(ROOT / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)
    mapping = config.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    return {folder.replace("/", "."): package for package, folder in mapping.items() if package and folder}


def main(args: list[str]) -> int:
    """Run mypy on the configured files with remapped module names; return its exit status."""
    t0 = time.time()
    fscache = FileSystemCache()
    sources, options = process_options(args, fscache=fscache)
    remap = package_dirs()
    for source in sources:
        for derived, package in remap.items():
            if source.module == derived or source.module.startswith(derived + "."):
                source.module = package + source.module[len(derived) :]
                source.base_dir = str(ROOT)
    _, messages, blockers = run_build(sources, options, fscache, t0, sys.stdout, sys.stderr)
    formatter = util.FancyFormatter(sys.stdout, sys.stderr, options.hide_error_codes)
    n_errors, n_notes, n_files = util.count_stats(messages)
    if n_errors:
        print(formatter.format_error(n_errors, n_files, len(sources), blockers=blockers, use_color=False))
    else:
        print(formatter.format_success(len(sources), False))
    sys.stdout.flush()
    if blockers:
        return 2
    return 1 if messages and n_notes < len(messages) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
