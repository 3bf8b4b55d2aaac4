# -*- test-case-name: tests.test_fast_paths -*-
"""Build instances of frozen, slotted attrs classes without their `__init__`.

The `__init__` that attrs writes for a frozen class stores each field through
``object.__setattr__`` (the class's own `__setattr__` raises), a C call per
field that costs several times a plain attribute store. The codec builds one
command and one row per received line, so that cost shows.

`fast_constructor(cls)` returns a "builder": a private twin of `cls` with the
same slots and the same base, whose `__init__` stores the fields as plain
attributes and then turns the object into a `cls` instance by assigning
``self.__class__`` (CPython allows this between classes with the same layout).
The object it returns is a `cls` instance like any other, frozen, with attrs'
`__eq__`, `__hash__` and `__repr__`; only the way it was filled differs.

With the optional C module (`synapse_replication._speedups`), the builder is
its ``Builder`` instead, which allocates the instance and stores each argument
in the slot of its field, with no Python frame at all; it is used only for the
classes the pure-Python builder accepts, so both give the same objects.

The builder is used only where the arguments are already validated (the parsers
check every field first), and only for classes it can provably handle: attrs
classes with slots, single inheritance, no validators, converters, defaults,
keyword-only or non-init fields, no `__attrs_pre_init__`/`__attrs_post_init__`
and no cached hash. For any other class, or if the interpreter refuses the
class assignment, `fast_constructor` returns `cls` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, ParamSpec, TypeVar, cast

import attrs

from synapse_replication._accel import SPEEDUPS

__all__ = ["fast_constructor"]

P = ParamSpec("P")
T = TypeVar("T")


def _eligible(cls: type[Any]) -> bool:
    if not attrs.has(cls) or len(cls.__bases__) != 1:
        return False
    slots = cls.__dict__.get("__slots__")
    if not isinstance(slots, tuple) or "__dict__" in slots:
        return False
    if "__attrs_cached_hash__" in slots:
        return False
    if hasattr(cls, "__attrs_pre_init__") or hasattr(cls, "__attrs_post_init__"):
        return False
    own = set(slots) - {"__weakref__"}
    names = set()
    for field in attrs.fields(cls):
        if (
            not field.init
            or field.kw_only
            or field.validator is not None
            or field.converter is not None
            or field.default is not attrs.NOTHING
            or field.alias != field.name
            or not field.name.isidentifier()
        ):
            return False
        names.add(field.name)
    # Every field is a slot of `cls` itself (none inherited from a base that
    # the builder would share but fill differently).
    return own == names


def fast_constructor(
    cls: Callable[P, T], *, speedups: ModuleType | None = SPEEDUPS
) -> Callable[P, T]:
    """A callable that builds `cls` instances exactly as ``cls(*args)`` does,
    but faster; `cls` itself if that cannot be done safely (see the module
    docstring). Positional arguments only, in field order.

    With the C `speedups`, the builder is its ``Builder``, which allocates the
    instance and fills its slots directly: the same object again, for less.
    """
    if not isinstance(cls, type) or not _eligible(cls):
        return cls
    names = [field.name for field in attrs.fields(cls)]
    args = ", ".join(f"_{i}" for i in range(len(names)))
    body = "".join(f"    self.{name} = _{i}\n" for i, name in enumerate(names))
    source = f"def __init__(self, {args}):\n{body}    self.__class__ = _cls\n"
    namespace: dict[str, Any] = {}
    # The source holds only field names, checked to be identifiers above.
    exec(source, {"_cls": cls}, namespace)
    builder = type(
        f"_{cls.__name__}Builder",
        (cls.__bases__[0],),
        {
            "__slots__": cls.__dict__["__slots__"],
            "__init__": namespace["__init__"],
            # Undo an inherited frozen __setattr__/__delattr__ (attrs puts both
            # on a frozen base); with both plain, attribute stores are the fast
            # slot stores.
            "__setattr__": object.__setattr__,
            "__delattr__": object.__delattr__,
            "__module__": cls.__module__,
            "__qualname__": f"_{cls.__qualname__}Builder",
        },
    )
    # A twin of a subclass of an abstract base (`Command`) inherits the
    # abstract methods that `cls` implements: it is never used as such.
    type.__setattr__(builder, "__abstractmethods__", frozenset())
    probe: Any = object.__new__(builder)
    try:
        probe.__class__ = cls
    except TypeError:  # layouts differ after all: use the real constructor
        return cls
    if speedups is not None:
        return cast(Callable[P, T], speedups.Builder(cls, tuple(names)))
    return cast(Callable[P, T], builder)
