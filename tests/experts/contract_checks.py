"""Checks of an object against a ``typing.Protocol``, shared by the contract tests of
the expert and gate families (``test_expert_contract.py``, ``test_gate_contract.py``)
and usable on a family of one's own::

    assert protocol_problems(MyExperts(3), ExpertFamily) == []
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing


def _is_protocol(cls) -> bool:
    return bool(getattr(cls, "_is_protocol", False))


def discover(package, *methods) -> set[type]:
    """Every class defined in ``package``'s modules that has all of ``methods``."""
    found = set()
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (inspect.isclass(obj) and obj.__module__ == module.__name__
                    and not _is_protocol(obj)
                    and all(callable(getattr(obj, m, None)) for m in methods)):  # fmt: skip
                found.add(obj)
    return found


def members(proto) -> tuple[dict[str, typing.Callable], dict[str, type]]:
    """A protocol's methods and its annotated attributes (with their types)."""
    methods = {n: v for n, v in vars(proto).items() if not n.startswith("_") and callable(v)}
    return methods, typing.get_type_hints(proto)


def signature_problem(impl, spec) -> str | None:
    """Why ``impl`` (a bound method) cannot be called as ``spec`` (a protocol method) is.

    Positional parameters must carry the protocol's names in its order (callers pass
    some by keyword); one the protocol gives a default must have one; any extra
    parameter must have a default.
    """
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    want = list(inspect.signature(spec).parameters.values())[1:]  # without self
    got = [p for p in inspect.signature(impl).parameters.values() if p.kind in kinds]
    for i, w in enumerate(want):
        if i >= len(got) or got[i].name != w.name:
            return f"parameters {[p.name for p in got]}, expected {[p.name for p in want]}"
        if w.default is not inspect.Parameter.empty and got[i].default is inspect.Parameter.empty:
            return f"{w.name!r} needs a default"
    extra = [p.name for p in got[len(want) :] if p.default is inspect.Parameter.empty]
    return f"extra parameters without defaults: {extra}" if extra else None


def protocol_problems(obj, proto) -> list[str]:
    methods, attrs = members(proto)
    out = []
    for name, spec in methods.items():
        impl = getattr(obj, name, None)
        if not callable(impl):
            out.append(f"lacks {name}()")
        elif (why := signature_problem(impl, spec)) is not None:
            out.append(f"{name}(): {why}")
    for name, kind in attrs.items():
        if not hasattr(obj, name):
            out.append(f"lacks attribute {name}")
        elif kind in (int, bool, str, type) and not isinstance(getattr(obj, name), kind):
            out.append(f"{name} is not a {kind.__name__}")
    return out


def has_any(obj, proto) -> bool:
    methods, attrs = members(proto)
    return any(hasattr(obj, n) for n in (*methods, *attrs))
