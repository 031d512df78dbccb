"""A loss function's identity: the part of the cache key that says which loss measured a result.

Two processes that run the same loss must get the same string (the live callback and a
later backfill share cache entries), and a loss that computes something else must get
another. A loss is identified by what it is made of, never by where it lives in memory:

- a function: its module and qualified name, its code (bytecode, constants, names;
  nested code objects too, but not the file name or line numbers), its defaults, the
  values in its closure, and the module-level names its code reads (a constant, another
  function of the same module, recursively; a function of another module by name, code
  and defaults; an imported module by name);
- ``functools.partial``: the function with its arguments; a bound method: the function
  with its object; a callable object: its class's ``__call__`` with its attributes;
- values: ``None``, numbers, strings, bytes, their tuples, lists, sets and dicts, torch
  dtypes and devices, tensors up to :data:`MAX_TENSOR_ELEMENTS` elements (by their
  bytes), classes and modules by name, enums by name; an object by its class and its
  attributes, as long as those are identifiable.

Anything else (a global tokenizer, a large tensor, a generator, an object with no
``__dict__``) makes the loss unidentifiable: :func:`loss_identity` returns ``None`` and
the reason, and the caller measures without a cache. A loss may state its own identity
as a string attribute ``uma_cache_identity`` (then nothing else is inspected).

Example:
    >>> def scaled(model, batch):
    ...     return 10 * model(batch)
    >>> ident, why = loss_identity(scaled)
    >>> len(ident), why
    (64, '')
    >>> loss_identity(lambda m, b: open("x"))[0] == loss_identity(lambda m, b: open("y"))[0]
    False
"""

from __future__ import annotations

import enum
import functools
import hashlib
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

#: Tensors up to this many elements are identified by their bytes; larger ones are refused.
MAX_TENSOR_ELEMENTS = 1 << 20
#: The most values one identity may visit (a loss that reaches a huge object is refused).
MAX_NODES = 20_000
#: The deepest nesting of values followed.
MAX_DEPTH = 12

_SIMPLE = (type(None), bool, int, float, complex, str, bytes)


class _Unidentifiable(Exception):
    """The loss reaches a value with no identity stable across processes (the message says which)."""


def loss_identity(loss_fn: Callable[..., Any] | None) -> tuple[str | None, str]:
    """The identity of a per-sample loss, stable across processes.

    Args:
        loss_fn: the user's ``loss_fn(model, batch)``; ``None`` is the HF default
            (:func:`~uma_callbacks.core.losses.hf_per_sample_loss`).

    Returns:
        ``(64 hex characters, "")``, or ``(None, reason)`` when the loss cannot be identified.
    """
    if loss_fn is None:
        from uma_callbacks.core.losses import hf_per_sample_loss

        loss_fn = hf_per_sample_loss
    return value_identity(loss_fn)


def value_identity(value: Any) -> tuple[str | None, str]:
    """The identity of any value by the rules of :func:`loss_identity`.

    The value is a metric's tensor or callable setting, or a loss.

    Returns:
        ``(64 hex characters, "")``, or ``(None, reason)`` when it cannot be identified.
    """
    own = getattr(value, "uma_cache_identity", None)
    if isinstance(own, str) and own:
        return hashlib.sha256(f"declared|{own}".encode()).hexdigest(), ""
    walker = _Walker(_home(value))
    try:
        text = walker.value(value, 0)
    except _Unidentifiable as err:
        return None, str(err)
    except RecursionError:
        return None, "it is nested too deeply to identify"
    return hashlib.sha256(text.encode()).hexdigest(), ""


class _Walker:
    """Turns a value into a string that names what it computes with (see the module docstring)."""

    def __init__(self, home: str | None) -> None:
        self.home = home  # the loss's own module: its functions are followed into their globals
        self.nodes = 0
        self.active: set[int] = set()

    def value(self, obj: Any, depth: int, where: str = "the loss") -> str:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Unidentifiable(f"it reaches more than {MAX_NODES} values (through {where})")
        if depth > MAX_DEPTH:
            raise _Unidentifiable(f"it reaches values nested deeper than {MAX_DEPTH} (through {where})")
        if isinstance(obj, enum.Enum):
            return f"enum:{_name(type(obj))}.{obj.name}"
        if isinstance(obj, float):
            return f"float:{obj.hex()}"
        if isinstance(obj, _SIMPLE):
            return f"{type(obj).__name__}:{obj!r}"
        if isinstance(obj, (torch.dtype, torch.device, torch.Size, np.dtype)):
            return f"{type(obj).__name__}:{obj!r}"
        if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
            return f"numpy:{obj.dtype}:{obj.tobytes().hex()}"
        if isinstance(obj, types.ModuleType):
            return f"module:{obj.__name__}"
        if isinstance(obj, type):
            return f"class:{_name(obj)}"
        if id(obj) in self.active:  # a function calling itself, an object holding itself
            return f"cycle:{_name(obj) if callable(obj) else type(obj).__name__}"
        self.active.add(id(obj))
        try:
            return self._composite(obj, depth, where)
        finally:
            self.active.discard(id(obj))

    def _composite(self, obj: Any, depth: int, where: str) -> str:
        d = depth + 1
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, where)
        if isinstance(obj, np.ndarray) and obj.dtype != object:
            return self._tensor(torch.from_numpy(np.ascontiguousarray(obj)), where)
        if isinstance(obj, (tuple, list)):
            return f"{type(obj).__name__}[" + ",".join(self.value(v, d, where) for v in obj) + "]"
        if isinstance(obj, (set, frozenset)):  # iteration order varies between processes: sort
            return f"{type(obj).__name__}{{" + ",".join(sorted(self.value(v, d, where) for v in obj)) + "}"
        if isinstance(obj, dict):
            items = sorted(f"{self.value(k, d, where)}={self.value(v, d, where)}" for k, v in obj.items())
            return f"{type(obj).__name__}{{" + ",".join(items) + "}"
        if isinstance(obj, functools.partial):
            return "partial(" + ",".join(
                [self.value(obj.func, d, where), self.value(obj.args, d, where), self.value(obj.keywords, d, where)]
            ) + ")"  # fmt: skip
        if isinstance(obj, types.MethodType):
            return f"method({self.value(obj.__func__, d, where)},{self.value(obj.__self__, d, where)})"
        if isinstance(obj, types.FunctionType):
            return self._function(obj, d)
        if isinstance(obj, (types.BuiltinFunctionType, types.WrapperDescriptorType, types.MethodWrapperType)):
            owner = getattr(obj, "__self__", None)
            bound = (
                "" if owner is None or isinstance(owner, types.ModuleType) else self.value(owner, d, where)
            )
            return f"builtin:{_name(obj)}({bound})"
        if isinstance(obj, types.CodeType):
            return self._code(obj, d, where)
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict) and not isinstance(obj, (types.GeneratorType, types.CoroutineType)):
            call = getattr(type(obj), "__call__", None)  # noqa: B004 (the class's own __call__: its code)
            body = self._function(call, d) if isinstance(call, types.FunctionType) else ""
            what = f"{where} -> {type(obj).__name__}"
            return f"object:{_name(type(obj))}({body}){self.value(attrs, d, what)}"
        raise _Unidentifiable(
            f"it uses a {type(obj).__module__}.{type(obj).__qualname__} (through {where}), which has no stable identity"
        )

    def _tensor(self, t: torch.Tensor, where: str) -> str:
        if t.numel() > MAX_TENSOR_ELEMENTS:
            raise _Unidentifiable(
                f"it uses a tensor of {t.numel()} elements (through {where}); at most {MAX_TENSOR_ELEMENTS} are hashed"
            )
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise _Unidentifiable(f"it uses a {t.layout} tensor on {t.device.type} (through {where})")
        data = t.detach().cpu().contiguous()
        digest = hashlib.sha256(
            memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else b""
        )
        return f"tensor:{data.dtype}:{tuple(data.shape)}:{digest.hexdigest()}"

    def _function(self, fn: types.FunctionType, depth: int) -> str:
        where = _name(fn)
        parts = [f"function:{where}", self._code(fn.__code__, depth, where)]
        parts.append(self.value(fn.__defaults__, depth, f"{where} defaults"))
        parts.append(self.value(fn.__kwdefaults__, depth, f"{where} defaults"))
        if fn.__module__ != self.home:  # another module's function (a library's): name, code, defaults
            return "(" + ";".join(parts) + ")"
        # the loss's own module: the values it closes over and the module names its code reads count
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later)
                parts.append(f"{name}=<empty>")
                continue
            parts.append(f"{name}={self.value(content, depth, f'{where}, closure {name!r}')}")
        scope = fn.__globals__
        for name in sorted(_global_names(fn.__code__)):
            if name in scope:
                parts.append(f"global {name}={self.value(scope[name], depth, f'{where}, global {name!r}')}")
        return "(" + ";".join(parts) + ")"

    def _code(self, code: types.CodeType, depth: int, where: str) -> str:
        consts = ",".join(
            self._code(c, depth + 1, where)
            if isinstance(c, types.CodeType)
            else self.value(c, depth + 1, where)
            for c in code.co_consts
        )
        return (
            f"code:{code.co_name}:{code.co_argcount}:{code.co_kwonlyargcount}:{code.co_flags}:"
            f"{hashlib.sha256(code.co_code).hexdigest()}:[{consts}]:{code.co_names}:{code.co_varnames}:{code.co_freevars}"
        )


def _home(loss_fn: Any) -> str | None:
    """The module whose functions are followed into their closures and globals: the loss's own."""
    inner = loss_fn
    for _ in range(8):
        if isinstance(inner, functools.partial):
            inner = inner.func
        elif isinstance(inner, types.MethodType):
            inner = inner.__func__
        else:
            break
    if not isinstance(inner, (types.FunctionType, types.BuiltinFunctionType)):
        inner = type(inner)
    return getattr(inner, "__module__", None)


def _global_names(code: types.CodeType) -> set[str]:
    """The names a code object (and the code nested in it) may read as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


__all__ = ["MAX_NODES", "MAX_TENSOR_ELEMENTS", "loss_identity", "value_identity"]
