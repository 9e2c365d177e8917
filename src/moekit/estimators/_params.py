"""Estimator parameters declared once, at class level.

scikit-learn reads an estimator's parameters from the signature of its ``__init__``,
which may only store them. Writing that ``__init__`` out for every estimator repeats
twenty-odd assignments per class; here a class declares its parameters and their
defaults in one ordered mapping, ``_defaults``, and gets the ``__init__`` scikit-learn
expects: the first parameter positional, the rest keyword-only, each stored as it is
given (validation happens at fit time, against ``_parameter_constraints``).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

EM_DEFAULTS = {
    "init": "auto",
    "n_init": 10,
    "max_iter": 200,
    "tol": 1e-6,
    "init_max_iter": 30,
    "init_sample_size": 20_000,
}
"""The EM loop's settings, the same default in every EM-fitted estimator."""

RUN_DEFAULTS = {
    "warm_start": False,
    "random_state": None,
    "verbose": 0,
    "verbose_interval": 10,
    "device": "cpu",
    "expert_features": None,
    "gate_features": None,
}
"""Where and how a fit runs, and which columns its experts and gate see."""

_POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def _make_init(defaults: dict[str, Any]):
    names = list(defaults)
    params = [inspect.Parameter("self", _POSITIONAL)]
    params += [
        inspect.Parameter(name, _POSITIONAL if i == 0 else _KEYWORD, default=value)
        for i, (name, value) in enumerate(defaults.items())
    ]
    signature = inspect.Signature(params, return_annotation=None)

    def __init__(self, *args, **kwargs) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as err:  # name the class, as a written __init__ would
            raise TypeError(f"{type(self).__name__}(): {err}") from None
        bound.apply_defaults()
        for name in names:
            setattr(self, name, bound.arguments[name])

    __init__.__signature__ = signature
    return __init__


class DeclaredParams:
    """Mixin: builds ``__init__`` from the class's ``_defaults`` (see the module).

    A subclass that declares ``_defaults`` in its own body gets a new ``__init__``;
    one that does not inherits its parent's. Mutable defaults are not allowed (they
    would be shared between instances): use None, or a tuple.
    """

    _defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "_defaults" not in cls.__dict__ or "__init__" in cls.__dict__:
            return
        for name, value in cls._defaults.items():
            if isinstance(value, (list, dict, set)):
                raise TypeError(f"{cls.__name__}: the default of {name!r} is mutable.")
        init = _make_init(cls._defaults)
        init.__qualname__ = f"{cls.__qualname__}.__init__"
        init.__module__ = cls.__module__
        cls.__init__ = init
