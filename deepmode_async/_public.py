"""Public names that look public: classes named by the module users import them from
(as httpx does), and a `dir()` that shows the public names only."""

import types
from collections.abc import Callable, Mapping

import attrs


def publish(module: str, namespace: Mapping[str, object]) -> Callable[[], list[str]]:
    """Give the classes in `namespace`'s `__all__` the `__module__` `module`, so that
    reprs, tracebacks and pickles say `deepmode_async.NotFoundError`, not the private
    module it is defined in (a pickle then loads through the public module); return the
    module's `__dir__`: its `__all__` and its public submodules, without what its own
    imports left behind (`annotations`, private modules)."""
    public = list(namespace["__all__"])  # type: ignore[call-overload]
    # A class exported from two modules is named by the package, which comes last.
    renamed = [
        value
        for value in (namespace[name] for name in public)
        if isinstance(value, type) and value.__module__.startswith(f"{module}.")
    ]
    for value in renamed:  # all before any is renamed: a subclass's hints include its bases'
        if attrs.has(value):
            # Its string annotations are resolved in the module it is defined in, which
            # cattrs could no longer find by `__module__`.
            attrs.resolve_types(value)
    for value in renamed:
        value.__module__ = module

    def names() -> list[str]:
        submodules = [
            name
            for name, value in namespace.items()
            if isinstance(value, types.ModuleType)
            and not name.startswith("_")
            and value.__name__ == f"{module}.{name}"
        ]
        return sorted({*public, *submodules})

    return names
