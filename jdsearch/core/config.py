"""The config layer: YAML files and plain mappings → frozen dataclasses, with dotted-field errors.

Every spec (detector, study, pool, training and distillation settings) is read through here, so
every mistake gets the same one line naming the file, the dotted field and the value::

    studies/s.yaml: fast_eval.schedule: must be 'cosine' or 'step', got 'cosin'

Torch-free: only the standard library and PyYAML (``safe_load``: a YAML file cannot run code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any, NoReturn, TypeVar

import yaml

from jdsearch.core.errors import JDSearchError, SpecError
from jdsearch.core.files import read_text
from jdsearch.core.limits import MAX_ANCHOR_SIZE, MAX_POOL_SIZE, MAX_SIZE_DIVISIBLE, MAX_WIDTH
from jdsearch.core.resolution import Resolution

__all__ = [
    "MAX_ANCHOR_SIZE",
    "MISSING",
    "FieldError",
    "Fields",
    "cache_key",
    "check",
    "env_number",
    "is_int",
    "is_number",
    "plain",
    "preset_dir",
    "read_dataclass",
    "read_yaml",
    "shown",
]

T = TypeVar("T")
_PACKAGE = Path(__file__).resolve().parent.parent  # jdsearch/

#: Every integer a config holds must fit in 64 bits: torch and NumPy take them as ``int64``.
INT_LIMIT = 2**63 - 1
#: Upper bounds the dataclasses themselves do not check, by ``(dataclass, field)``: ``(limit,
#: unit)``; every value of a list field is checked.
FIELD_LIMITS: dict[tuple[str, str], tuple[int, str]] = {
    ("RPNSpec", "anchor_sizes"): (MAX_ANCHOR_SIZE, "pixels"),
    ("RoISpec", "representation_size"): (MAX_WIDTH, "channels"),
    ("RoISpec", "pool_size"): (MAX_POOL_SIZE, "cells a side"),
    ("InputSpec", "size_divisible"): (MAX_SIZE_DIVISIBLE, "pixels"),
}


def preset_dir(kind: str) -> Path:
    """The folder of the bundled ``detectors`` or ``studies`` presets.

    An installed wheel carries them inside the package (``jdsearch/presets/<kind>``, mapped from
    the project's top-level folders by ``pyproject.toml``); a source checkout or an editable
    install reads the top-level folders themselves.
    """
    if kind not in ("detectors", "studies"):
        raise ValueError(f"no preset kind {kind!r}")
    bundled = _PACKAGE / "presets" / kind
    return bundled if bundled.is_dir() else _PACKAGE.parent / kind


MISSING: Any = dataclasses.MISSING
_NO_VALUE = object()


class FieldError(SpecError):
    """One field of a config dataclass holds an invalid value (raised by its ``__post_init__``).

    Built directly in Python it reads ``TrainConfig.lr: must be a positive number, got 0``; read
    from a file, :meth:`Fields.build` reports it at the field's dotted path in that file.
    """

    def __init__(self, owner: str, name: str, why: str, value: Any = _NO_VALUE) -> None:
        self.owner, self.name = owner, name
        self.why = why if value is _NO_VALUE else f"{why}, got {value!r}"
        super().__init__(f"{owner}.{name}: {self.why}")


def check(ok: bool, owner: object, name: str, why: str) -> None:
    """Raise :class:`FieldError` for field ``name`` of ``owner`` (a dataclass) unless ``ok``."""
    if not ok:
        value = getattr(owner, name)
        shown = str(value) if isinstance(value, PurePath) else value  # as the file wrote it
        raise FieldError(type(owner).__name__, name, why, shown)


def is_int(v: Any) -> bool:
    """An integer that is not a bool (YAML's ``true`` is not a count)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool (an integer beyond float range is not finite)."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters; a huge integer by its size (its
    digits would fill the line, or be refused by Python's int-to-str limit)."""
    if isinstance(value, int) and value.bit_length() > 200:
        return f"<integer of about {int(value.bit_length() * 0.30103)} digits>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_yaml(path: Path) -> Any:
    """Parse a YAML file safely; a syntax error is one :class:`SpecError` with its line number.

    Raises:
        SpecError: the file is not valid YAML.
    """
    try:
        text = read_text(path)
    except UnicodeDecodeError as e:
        raise SpecError(
            f"{path}: not a YAML text file (byte {e.start} is not UTF-8; a binary file?)"
        ) from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise SpecError(f"{path}: invalid YAML: nested too deeply") from None


class Fields:
    """The keys of one mapping being read: typed takes, dotted-field errors, unknown keys.

    ``source`` names the file (or the stored spec) and ``path`` the mapping's dotted position in
    it; every error reads ``SOURCE: PATH.KEY: WHY``. Each key is taken at most once, and
    :meth:`done` reports whatever nobody took as an unknown key.
    """

    def __init__(self, data: Any, source: str = "", path: str = "") -> None:
        self.source, self.path = source, path
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            self.fail("", f"expected a mapping, got {type(data).__name__}")
        self.data = dict(data)
        self.known: set[str] = set(self.data)

    # -- where and failing
    def where(self, key: str = "") -> str:
        """``SOURCE: PATH.KEY`` (whichever parts exist)."""
        dotted = ".".join(part for part in (self.path, key) if part)
        if self.source and dotted:
            return f"{self.source}: {dotted}"
        return self.source or dotted or "<config>"

    def fail(self, key: str, why: str) -> NoReturn:
        """Raise :class:`SpecError` naming ``key`` of this mapping."""
        raise SpecError(f"{self.where(key)}: {why}")

    # -- taking keys
    def has(self, key: str) -> bool:
        """Whether ``key`` is present and not yet taken."""
        return key in self.data

    def require(self, *keys: str) -> None:
        """Fail on the first of ``keys`` that is missing."""
        for key in keys:
            if key not in self.data:
                self.fail(key, "required field is missing")

    def raw(self, key: str, default: Any = MISSING) -> Any:
        """The value of ``key`` as written (``default`` when absent; required without one)."""
        if key not in self.data:
            if default is MISSING:
                self.fail(key, "required field is missing")
            return default
        return self.data.pop(key)

    def take(self, key: str, kind: Any, default: Any = MISSING) -> Any:
        """The value of ``key`` converted to the type ``kind`` (see :meth:`convert`)."""
        if key not in self.data:
            return self.raw(key, default)
        return self.convert(key, self.data.pop(key), kind)

    def sub(self, key: str) -> Fields:
        """The mapping under ``key`` (empty when absent) as its own :class:`Fields`."""
        return Fields(self.data.pop(key, None), self.source, self._child(key))

    def each(self, key: str) -> list[Fields]:
        """The non-empty list of mappings under ``key`` (required), one :class:`Fields` each."""
        items = self.raw(key)
        if not isinstance(items, list) or not items:
            self.fail(key, f"expected a non-empty list of mappings, got {shown(items)}")
        return [
            Fields(item, self.source, self._child(f"{key}[{i}]")) for i, item in enumerate(items)
        ]

    def _child(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def done(self, known: Iterable[str] = ()) -> None:
        """Fail on the first key nobody took, listing the keys this mapping knows."""
        if self.data:
            key = sorted(self.data)[0]
            listed = sorted(set(known)) or sorted(self.known - set(self.data))
            hint = f" (known: {', '.join(listed)})" if listed else ""
            self.fail(key, f"unknown key{hint}")

    def build(self, make: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``make(*args, **kwargs)``, with a :class:`FieldError` reported at its dotted field."""
        try:
            return make(*args, **kwargs)
        except FieldError as e:
            self.fail(e.name, e.why)

    # -- conversion by type hint
    def convert(self, key: str, value: Any, kind: Any) -> Any:
        """``value`` as the type ``kind``: bool, int, float, str, Path, Resolution, ``X | None``,
        ``tuple[X, ...]`` (from a list) or a dataclass (from a mapping: :func:`read_dataclass`)."""
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return self.convert(key, value, inner)
        if origin is tuple:
            if not isinstance(value, list | tuple):
                self.fail(key, f"expected a list, got {shown(value)}")
            return tuple(self.convert(key, v, args[0]) for v in value)
        if kind in _PARSED:  # before dataclasses: Resolution is one
            what, parse = _PARSED[kind]
            if not isinstance(value, str):
                self.fail(key, f"expected {what}, got {shown(value)}")
            try:
                return parse(value)
            except SpecError as e:
                self.fail(key, str(e))
        if dataclasses.is_dataclass(kind):
            return read_dataclass(Fields(value, self.source, self._child(key)), kind)
        ok, what = _SCALARS[kind]
        if not ok(value):
            self.fail(key, f"expected {what}, got {shown(value)}")
        if kind is int and abs(value) > INT_LIMIT:
            self.fail(key, f"{shown(value)} does not fit in 64 bits")
        return float(value) if kind is float else value

    def limit(self, key: str, value: Any, bound: tuple[int, str]) -> None:
        """Fail unless ``value`` (each value of a tuple) is at most ``bound = (limit, unit)``."""
        top, unit = bound
        for v in value if isinstance(value, tuple) else (value,):
            if is_number(v) and v > top:
                self.fail(key, f"{shown(v)} is larger than {top} {unit}")


_SCALARS: dict[Any, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (is_int, "an integer"),
    float: (is_number, "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}
_PARSED: dict[Any, tuple[str, Callable[[str], Any]]] = {
    Path: ("a string", Path),
    Resolution: ("a size like '1333x800'", Resolution.parse),
}


def _defaults(cls: type, base: Any) -> dict[str, Any]:
    if base is None:
        return {}
    if isinstance(base, Mapping):
        return dict(base)
    return {fd.name: getattr(base, fd.name) for fd in dataclasses.fields(cls)}


def read_dataclass(f: Fields, cls: type[T], base: Any = None, *, exclude: Iterable[str] = ()) -> T:
    """Fill the frozen dataclass ``cls`` from the keys of ``f``, typed by its annotations.

    A field whose type is itself a dataclass is read from the nested mapping, starting from the
    field's default value; its ``metadata["exclude"]`` names the nested keys a file may not set.
    A dataclass with a classmethod ``from_fields(f)`` reads itself (a custom layout).

    Args:
        f: the mapping to read; every key must be a field of ``cls`` not in ``exclude``.
        cls: the dataclass. Its ``__post_init__`` validates values and raises
            :class:`FieldError`, reported here at the dotted field.
        base: an instance of ``cls`` (or a mapping of field values) whose values stand for the
            keys ``f`` leaves out; otherwise the dataclass defaults do.
        exclude: fields a file may not set (the caller sets them).

    Returns:
        The new instance.

    Raises:
        SpecError: an unknown key, a missing required field, a wrong type or an invalid value.

    Example:
        ``read_dataclass(Fields({"epochs": 2}, "s.yaml", "fast_eval"), TrainConfig).epochs``
        is ``2.0``; ``{"epochs": "two"}`` raises ``s.yaml: fast_eval.epochs: expected a number,
        got 'two'``.
    """
    excluded = set(exclude)
    fields = [fd for fd in dataclasses.fields(cls) if fd.init]  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs = _defaults(cls, base)
    for fd in fields:
        if fd.name in excluded or not f.has(fd.name):
            continue
        nested = _nested(hints[fd.name], f.data[fd.name])
        if nested is None:
            kwargs[fd.name] = f.take(fd.name, hints[fd.name])
            bound = FIELD_LIMITS.get((cls.__name__, fd.name))
            if bound is not None:
                f.limit(fd.name, kwargs[fd.name], bound)
            continue
        sub = f.sub(fd.name)
        custom = getattr(nested, "from_fields", None)
        if custom is not None:
            kwargs[fd.name] = custom(sub)
        else:
            start = kwargs.get(fd.name, _default(fd))
            start = None if start is MISSING else start
            skip = fd.metadata.get("exclude", ())
            kwargs[fd.name] = read_dataclass(sub, nested, start, exclude=skip)
    for fd in fields:
        if fd.name not in kwargs and _default(fd) is MISSING:
            f.fail(fd.name, "required field is missing")
    f.done([fd.name for fd in fields if fd.name not in excluded])
    return f.build(cls, **kwargs)


def _default(fd: dataclasses.Field[Any]) -> Any:
    if fd.default is not MISSING:
        return fd.default
    if fd.default_factory is not MISSING:
        return fd.default_factory()
    return MISSING


def _nested(kind: Any, value: Any) -> type | None:
    """The dataclass a mapping ``value`` fills for a field of type ``kind`` (``None``: not one).

    An empty YAML section (``kd:``) reads as ``None``: for a field that cannot be ``None`` it means
    "all defaults", as an empty mapping would."""
    args = typing.get_args(kind)
    optional = type(None) in args
    candidates = [a for a in args if a is not type(None)] if optional else [kind]
    if len(candidates) != 1 or kind in _PARSED or candidates[0] in _PARSED:
        return None
    (inner,) = candidates
    if not (dataclasses.is_dataclass(inner) and isinstance(inner, type)):
        return None
    if isinstance(value, Mapping) or (value is None and not optional):
        return inner
    return None


def plain(value: Any) -> Any:
    """A config value as plain YAML/JSON data: dataclasses become mappings, tuples lists, and
    paths and resolutions strings (what :func:`read_dataclass` reads back)."""
    if isinstance(value, Path | Resolution):  # before the dataclass case: Resolution is one
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        pairs = ((fd.name, getattr(value, fd.name)) for fd in dataclasses.fields(value))
        return {k: plain(v) for k, v in pairs}
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def cache_key(fields: Mapping[str, Any]) -> str:
    """The hash of the spec parts (dotted study fields → plain values) that made a cache."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def env_number(
    name: str,
    default: float,
    *,
    low: float = 0.0,
    above: bool = False,
    high: float | None = None,
    integer: bool = False,
) -> float:
    """The environment variable ``name`` read as a number (``default`` when it is unset): finite,
    at least ``low`` (more than it, with ``above``), at most ``high``, an integer with
    ``integer``. Anything else (``nan``, ``inf``, a negative number, a word) is one
    :class:`JDSearchError` naming the variable and its value, as a CLI float flag's is."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(int(raw)) if integer else float(raw)
    except ValueError:
        value = math.nan
    within = (value > low if above else value >= low) and (high is None or value <= high)
    if not (math.isfinite(value) and within):
        kind = "an integer" if integer else "a finite number"
        bounds = f"{'>' if above else '≥'} {_bound(low)}"
        bounds += "" if high is None else f" and ≤ {_bound(high)}"
        raise JDSearchError(f"{name}: must be {kind} {bounds}, got {raw!r}")
    return value


def _bound(x: float) -> str:
    """A bound for a message: ``2592000``, not ``2.592e+06``."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
