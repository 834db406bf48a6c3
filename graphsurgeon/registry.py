"""The pass registry.

Built-in passes live in :mod:`graphsurgeon.passes`. Other packages add passes through the
entry-point group ``graphsurgeon.passes``; an entry point may name a pass class, an iterable of
pass classes, or a module whose import registers passes with :func:`register`.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import re
import warnings
from collections.abc import Iterable
from types import ModuleType

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.pass_base import GSPass

ENTRY_POINT_GROUP = "graphsurgeon.passes"
_REGISTRY: dict[str, type[GSPass]] = {}
_loaded = False
_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def register(cls: type[GSPass]) -> type[GSPass]:
    """Class decorator adding a pass to the registry under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _KEBAB.match(name):
        raise ValueError(f"pass {cls.__qualname__}: name {name!r} must be kebab-case")
    if cls.kind not in ("exact", "lossy", "surgery"):
        raise ValueError(f"pass {name}: kind must be exact, lossy or surgery, not {cls.kind!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"pass name {name!r} is taken by {existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def _register_loaded(obj: object, source: str) -> None:
    if isinstance(obj, ModuleType):
        return  # importing it registered its passes
    if isinstance(obj, type) and issubclass(obj, GSPass):
        register(obj)
        return
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):  # a str holds strs
        for item in obj:
            _register_loaded(item, source)
        return
    raise TypeError(f"entry point {source} gave {obj!r}, not a pass class, list or module")


def load_plugins() -> None:
    """Import built-ins and every ``graphsurgeon.passes`` entry point (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import graphsurgeon.passes  # noqa: F401  (built-ins register on import)

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            _register_loaded(ep.load(), f"{ep.name} = {ep.value}")
        except Exception as e:  # a broken plugin must not break graphsurgeon
            warnings.warn(
                f"graphsurgeon: pass plugin {ep.value!r} failed to load: {e}", stacklevel=2
            )


def get_pass(name: str) -> type[GSPass]:
    load_plugins()
    cls = _REGISTRY.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise GraphSurgeonError(f"unknown pass {name!r}{hint} (see `graphsurgeon passes`)")
    return cls


def all_passes() -> dict[str, type[GSPass]]:
    load_plugins()
    return dict(sorted(_REGISTRY.items()))
