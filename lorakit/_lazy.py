"""Names of a package that load on first use (PEP 562), for ``lorakit`` and ``lorakit.train``.

Importing torch takes seconds; the ``lorakit`` command imports these packages before it can install its Ctrl-C
handler or print ``--help``, so their public names are looked up only when first used.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable


def lazy_attributes(package: str, names: dict[str, str], namespace: dict[str, Any]
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's module-level ``__getattr__`` and ``__dir__``.

    ``names`` maps a public name to the module that defines it; once loaded, the value is kept in ``namespace`` (the
    package's globals), so later lookups are plain attributes. A submodule's name (``lorakit.io``: an attribute an
    eager import used to set as a side effect) imports that submodule alone, as ``from lorakit import io`` does:
    loading every public name there would re-enter modules half way through their own import. Anything else (a
    tool's probe: IPython's ``_repr_html_``) is an AttributeError, without importing anything.
    """

    def __getattr__(name: str) -> Any:
        module_name = names.get(name)
        if module_name is not None:
            value = getattr(importlib.import_module(module_name), name)
            namespace[name] = value
            return value
        if name.isidentifier() and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
