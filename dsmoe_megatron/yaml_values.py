"""YAML values -> typed Python values, checked against a dataclass field's annotation.

``convert(value, annotation)`` returns the value (a number read from a string such as ``1e-3``,
an enum member from its name) or raises ``Mismatch`` saying what was expected, e.g.
``expected an integer, got 'four' (a string)``. Ranges are checked afterwards (field_ranges).
"""

from __future__ import annotations

import enum
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin

__all__ = ["Mismatch", "convert", "describe", "yamlable"]


class Mismatch(ValueError):
    """A value that does not fit the annotation; str(): "expected ..., got ..."."""


def convert(value, tp):
    """``value`` checked against annotation ``tp`` (converted where YAML is ambiguous)."""
    try:
        return _convert(value, tp, lenient=True)
    except _Mismatch as err:
        raise Mismatch(f"expected {err.expected}, got {describe(value)}") from None


def yamlable(tp) -> bool:
    """Whether a value of this annotation can be written in YAML (no callables, dtypes...)."""
    if tp in (int, float, bool, str, type(None), Any, list, dict):
        return True
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return True
    origin = get_origin(tp)
    if origin is Literal:
        return True
    if origin in (Union, types.UnionType):
        return any(yamlable(a) for a in get_args(tp) if a is not type(None))
    if origin in (list, tuple, Sequence, typing.List, typing.Tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return all(yamlable(a) for a in args) if args else True
    return False


class _Mismatch(Exception):
    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


def describe(value) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value),
                                                                       type(value).__name__)
    return f"{value!r} ({kind})"


def _convert(value, tp, lenient: bool):
    """``value`` checked (and converted) against annotation ``tp``; _Mismatch if it does not fit.

    ``lenient`` also accepts a string holding a number for a float field: YAML 1.1 (PyYAML)
    reads ``1e-3`` without a dot as a string.
    """
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch("null")
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if yamlable(a)]
        # Exact matches in any arm first, then the lenient conversions.
        for attempt in ((False, True) if lenient else (False,)):
            for arm in arms:
                try:
                    return _convert(value, arm, attempt)
                except _Mismatch:
                    pass
        raise _Mismatch(" or ".join(dict.fromkeys(_expected(a) for a in arms)))
    if origin is Literal:
        for choice in get_args(tp):
            if type(choice) is type(value) and choice == value:
                return value
        raise _Mismatch(_expected(tp))
    if origin in (list, Sequence, typing.List):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_expected(tp))
        (arg,) = get_args(tp) or (Any,)
        return [_convert(v, arg, lenient) for v in value]
    if origin in (tuple, typing.Tuple):
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_expected(tp))
        if args and args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], lenient) for v in value)
        if args and len(args) != len(value):
            raise _Mismatch(_expected(tp))
        return tuple(_convert(v, a, lenient) for v, a in zip(value, args or [Any] * len(value)))
    if tp in (list, dict):
        if isinstance(value, tp):
            return value
        raise _Mismatch("a list" if tp is list else "a mapping")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if lenient and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
        raise _Mismatch("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("a string")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if value == member.name or (isinstance(value, str) and value == str(member.value)):
                return member
        raise _Mismatch(_expected(tp))
    raise _Mismatch(f"a {getattr(tp, '__name__', tp)} (not settable from YAML)")


def _expected(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    if origin in (list, Sequence, typing.List):
        (arg,) = get_args(tp) or (Any,)
        return f"a list of {_plural(arg)}"
    if origin in (tuple, typing.Tuple):
        return "a list of " + ", ".join(_expected(a) for a in get_args(tp) if a is not Ellipsis)
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(a) for a in get_args(tp) if yamlable(a))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(m.name for m in tp)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null", Any: "any value", list: "a list", dict: "a mapping"
            }.get(tp, str(tp))


def _plural(tp) -> str:
    return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(
        tp, _expected(tp))
