"""What a formula may hold: the checks of its terms and of its stored state.

Formulas are code: formulaic evaluates each term as a Python expression. A formula
read from a model file must not run anything but arithmetic on columns, so every
term is checked first (:func:`check_term`): column names, numbers, strings,
arithmetic and comparisons, and calls of the transforms listed in
:data:`FUNCTIONS` only; anything else (attributes other than ``np.<ufunc>``,
subscripts, lambdas, names of anything but columns) is a ValueError naming the term.
The check runs on fitting, on loading and before every evaluation
(:mod:`moekit.formula`). What formulaic learnt from the data is stored as plain
JSON, and read back only if it is nothing else.
"""

from __future__ import annotations

import ast
import difflib
import math
from typing import Any

import numpy as np

__all__ = ["FUNCTIONS", "NUMPY_FUNCTIONS", "FormulaError", "check_term"]


class FormulaError(ValueError):
    """A formula that cannot be used as written: its syntax, a term it may not hold, or
    a name that is not a column. (Problems of the data, a missing value or a level
    not seen when fitting, are plain ValueErrors.)"""


FUNCTIONS = frozenset(
    {"I", "C", "Q", "center", "scale", "standardize", "bs", "cr", "cs", "cc", "poly",
     "log", "log2", "log10", "exp", "exp2", "exp10", "Treatment", "Sum", "Helmert", "Diff",
     "Poly", "contr"}
)  # fmt: skip
"""Functions a formula's terms may call: formulaic's transforms and contrasts."""

NUMPY_FUNCTIONS = frozenset(
    {"log", "log1p", "log2", "log10", "exp", "expm1", "sqrt", "abs", "square", "sin", "cos",
     "tan", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "floor", "ceil", "round",
     "sign", "power", "maximum", "minimum", "clip", "where"}
)  # fmt: skip
"""NumPy functions a term may call as ``np.<name>(...)``."""

_OPERATORS = (
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd,
    ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
    ast.BitAnd, ast.BitOr,
)  # fmt: skip
_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call, ast.keyword,
    ast.Name, ast.Constant, ast.List, ast.Tuple, ast.Load, ast.Attribute, *_OPERATORS,
)  # fmt: skip


def check_term(expr: str, columns: set[str] | None = None, *, where: str = "formula") -> None:
    """Refuse a term that is anything but arithmetic on columns and allowed transforms.

    Parameters
    ----------
    expr : str
        A term's Python expression, as formulaic evaluates it (``I(x ** 2)``).
    columns : set of str, optional
        The data's column names; when given, every other name is refused with the
        closest column suggested.
    where : str
        The argument's name, for the message.

    Raises
    ------
    ValueError
        Naming the term and what in it is not allowed.
    """
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise FormulaError(f"{where}: cannot read the term {expr!r}: {exc.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _NODES):
            raise FormulaError(
                f"{where}: the term {expr!r} holds {type(node).__name__}, which a formula may "
                "not use (only columns, numbers, arithmetic and transforms such as I(), C(), "
                "np.log(), center(), bs())."
            )
        if isinstance(node, ast.Attribute):
            if not (isinstance(node.value, ast.Name) and node.value.id == "np"
                    and node.attr in NUMPY_FUNCTIONS):  # fmt: skip
                raise FormulaError(
                    f"{where}: the term {expr!r} uses {ast.unparse(node)!r}; of attributes only "
                    f"np.<function> is allowed, for {', '.join(sorted(NUMPY_FUNCTIONS))}."
                )
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id not in FUNCTIONS:
                raise FormulaError(
                    f"{where}: the term {expr!r} calls {f.id}(), which is not a formula "
                    f"transform (allowed: {', '.join(sorted(FUNCTIONS))}, np.<function>)."
                )
            if not isinstance(f, (ast.Name, ast.Attribute)):
                raise FormulaError(f"{where}: the term {expr!r} calls something that is not a "
                                 "named function.")  # fmt: skip
        if isinstance(node, ast.Name) and node.id.startswith("__"):
            raise FormulaError(f"{where}: the term {expr!r} uses the name {node.id!r}.")
    if columns is None:
        return
    for name in sorted(_columns_read(tree)):
        if name not in columns:
            raise FormulaError(_unknown(name, columns, where))


def _columns_read(tree: ast.AST) -> set[str]:
    """The names an expression reads as data: every name but called functions and ``np``."""
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    attrs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in called | attrs}


def _unknown(name: str, columns, where: str) -> str:
    close = difflib.get_close_matches(name, sorted(map(str, columns)), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{where}: {name!r} is not a column of the data{hint}"


def _json_ready(value: Any) -> Any:
    """formulaic's learnt state as plain JSON (NumPy scalars and arrays to numbers, lists)."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a formula's state")


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    """Stored state holds only JSON scalars, lists and dicts of finite numbers."""
    if depth > 6:
        raise ValueError(f"{where}: nested too deeply")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_json(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, where, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: holds a non-finite number")
    elif not (value is None or isinstance(value, (str, bool, int, float))):
        raise ValueError(f"{where}: holds a {type(value).__name__}")


def _split_offsets(rhs, where: str):
    """``rhs`` without its ``offset(expr)`` terms, and the ``expr`` of each (checked).

    formulaic reads ``offset(log(t))`` as a term it cannot evaluate; R's meaning is a
    known part of the linear predictor, so it is taken out of the design here.
    """
    offsets, kept = [], []
    for t in rhs:
        text = str(t)
        if text.startswith("offset(") and text.endswith(")") and len(t.factors) == 1:
            offsets.append(text[len("offset(") : -1].strip())
        else:
            kept.append(text)
    if not offsets:
        return rhs, []
    for expr in offsets:
        check_term(expr, where=where)
    from formulaic import Formula

    return Formula(" + ".join(kept)), offsets
