"""Built-in rewrite passes, one module per pass family (imported as ``graphsurgeon.passes``).

Every public module here is imported, and importing it registers its passes; a new family is
a new module, with no list to keep in step. Modules starting with ``_`` are helpers.
"""

from __future__ import annotations

import importlib
import pkgutil

from graphsurgeon.pass_base import GSPass

BUILTIN_PASSES: list[type[GSPass]] = []
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    BUILTIN_PASSES.extend(
        obj
        for obj in vars(_module).values()
        if isinstance(obj, type)
        and issubclass(obj, GSPass)
        and obj.__module__ == _module.__name__
        and "name" in vars(obj)
    )

globals().update({cls.__name__: cls for cls in BUILTIN_PASSES})  # from graphsurgeon.passes import X
__all__ = ["BUILTIN_PASSES", *(cls.__name__ for cls in BUILTIN_PASSES)]
