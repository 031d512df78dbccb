"""The package's docstring examples run as tests (STYLE.md: every ``Example:`` doctests on CPU).

Each module of ``uma_callbacks`` (``uma_callbacks.integrations`` included, which lives in
the ``integrations/`` folder) is imported by its installed name and its examples are run
with :mod:`doctest`; a module without examples is skipped.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import uma_callbacks


def _module_names() -> list[str]:
    import uma_callbacks.integrations as integrations  # mapped from another folder: walked on its own

    names = ["uma_callbacks", "uma_callbacks.integrations"]
    for package in (uma_callbacks, integrations):
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            names.append(info.name)
    return sorted(set(names))


def _modules_with_examples() -> list[str]:
    """The modules whose source holds a ``>>>`` prompt, found without importing them: every test
    worker collects this module, and importing the whole package pulls in lightning, Ray and
    the trackers (seconds each). A module whose prompts are no docstring example runs none."""
    out = []
    for name in _module_names():
        origin = importlib.util.find_spec(name).origin
        with open(origin, encoding="utf-8") as source:
            if ">>> " in source.read():
                out.append(name)
    return out


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    """A regression guard: the walk finds the package's examples (65 when this test was written)."""
    assert len(MODULES) >= 20
    assert "uma_callbacks.integrations.base" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} holds a '>>> ' prompt but no docstring example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (run it with -s)"
