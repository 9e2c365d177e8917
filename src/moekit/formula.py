"""Wilkinson formulas for mixtures of experts, as R's flexmix takes them.

``accel ~ times + I(times**2)`` names the target and the experts' regressors;
a second, one-sided formula (``~ z1 + z2``, flexmix's concomitant variables) names
the gate's. The formulas are parsed and their design matrices built by
`formulaic <https://matthewwardrop.github.io/formulaic/>`_: interactions ``a:b`` and
``a*b``, transforms ``I(x**2)``, ``np.log(x)``, ``center(x)``, ``bs(x, df=4)``, and
categorical factors ``C(group)`` coded by treatment contrasts (one column per level
but the first). ``~ 1`` for the gate is a constant gate (a mixture of regressions).
``offset(log(hours))`` among the experts' terms is R's offset: a known term added to
the experts' linear predictor with coefficient 1 (log exposure for counts), not a
column of the design.

A fitted :class:`ModelFormula` remembers what it learnt from the data (the levels
of each factor, the centre of ``center(x)``, the knots of ``bs(x)``), so that new
data get the same columns; an estimator fitted through :func:`fit_formula` keeps it
as ``formula_`` and its model file stores it as JSON.

Formulas are code: formulaic evaluates each term as a Python expression, so every
term is checked first (:func:`check_term`, in :mod:`moekit.formula_checks`) on
fitting, on loading and before every evaluation.
"""

from __future__ import annotations

import ast
import copy
import json
import warnings
from typing import Any

import numpy as np

from moekit.formula_checks import (
    FUNCTIONS,
    NUMPY_FUNCTIONS,
    FormulaError,
    _check_json,
    _columns_read,
    _json_ready,
    _split_offsets,
    _unknown,
    check_term,
)

__all__ = [
    "FUNCTIONS", "NUMPY_FUNCTIONS", "FormulaError", "ModelFormula", "check_term", "fit_formula",
]  # fmt: skip


class ModelFormula:
    """A target-and-experts formula and, optionally, the gate's formula.

    Parameters
    ----------
    formula : str
        ``"y ~ x1 + x2"``: the target on the left, the experts' regressors on the
        right. Every expert has an intercept: ``- 1`` or ``+ 0`` is refused.
    gate_formula : str, optional
        ``"~ z1 + z2"``: the gate's regressors (default: the experts'); ``"~ 1"``
        is a constant gate.

    Attributes
    ----------
    response : str
        The left-hand side (``y``, or ``np.log(y)``).
    offset_terms : list of str
        The expressions inside ``offset(...)`` on the right (summed, as R does).
    expert_columns, gate_columns : list of str
        The design columns of the experts and the gate, once fitted (the intercept
        left out: the estimators add their own).
    columns : list of str
        Their union, in order: the columns of the matrix :meth:`transform` returns.

    Examples
    --------
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"y": [1.0, 2.0, 3.5, 4.0], "x": [0.0, 1.0, 2.0, 3.0],
    ...                       "g": ["a", "b", "a", "b"]})
    >>> f = ModelFormula("y ~ x + I(x**2)", gate_formula="~ C(g)").fit(frame)
    >>> f.expert_columns, f.gate_columns
    (['x', 'I(x ** 2)'], ['C(g)[T.b]'])
    >>> f.transform(frame).shape
    (4, 3)
    """

    def __init__(self, formula: str, gate_formula: str | None = None) -> None:
        if not isinstance(formula, str) or "~" not in formula:
            raise FormulaError(f"formula: expected 'target ~ terms'; got {formula!r}.")
        if gate_formula is not None and (
            not isinstance(gate_formula, str) or not gate_formula.strip().startswith("~")
        ):
            raise FormulaError(f"gate_formula: expected '~ terms'; got {gate_formula!r}.")
        self.formula = formula
        self.gate_formula = gate_formula
        self._expert, self._response, self.offset_terms = self._parse(formula, "formula",
                                                                      two_sided=True)  # fmt: skip
        self._gate = None
        if gate_formula is not None:
            self._gate, _, offsets = self._parse(gate_formula, "gate_formula", two_sided=False)
            if offsets:
                raise FormulaError("gate_formula: offset() is a term of the experts' linear "
                                   "predictor; put it in the formula.")  # fmt: skip
        self._state: dict[str, dict] = {}
        self.expert_columns: list[str] = []
        self.gate_columns: list[str] = []

    # ------------------------------------------------------------------ parsing
    @staticmethod
    def _parse(text: str, where: str, two_sided: bool):
        from formulaic import Formula
        from formulaic.errors import FormulaSyntaxError

        try:
            parsed = Formula(text)
        except (FormulaSyntaxError, SyntaxError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid syntax"
            raise FormulaError(f"{where}: cannot read {text!r}: {first}") from None
        if two_sided:
            if not hasattr(parsed, "lhs") or len(list(parsed.lhs)) != 1:
                raise FormulaError(
                    f"{where}: expected one target on the left of '~'; got {text!r}."
                )
            rhs, response = parsed.rhs, str(next(iter(parsed.lhs)))
        else:
            if hasattr(parsed, "lhs"):
                raise FormulaError(f"{where}: the gate's formula has no left side ('~ z'); got "
                                 f"{text!r}.")  # fmt: skip
            rhs, response = parsed, None
        rhs, offsets = _split_offsets(rhs, where)
        terms = [str(t) for t in rhs]
        if "1" not in terms:
            raise FormulaError(
                f"{where}: every expert and gate has an intercept; remove '- 1' / '+ 0' from "
                f"{text!r}."
            )
        for t in rhs:
            for factor in t.factors:
                if factor.eval_method.value == "python":
                    check_term(factor.expr, where=where)
        if response is not None:
            check_term(response, where=where)
        return rhs, response, offsets

    @property
    def response(self) -> str:
        return self._response

    @property
    def constant_gate(self) -> bool:
        """Whether the gate's formula is ``~ 1``: a mixture of regressions."""
        return self._gate is not None and [str(t) for t in self._gate] == ["1"]

    @property
    def variables(self) -> set[str]:
        """The data columns the formulas read, the target's among them."""
        names = self._names_used(self._expert)
        names |= _columns_read(ast.parse(self._response, mode="eval"))
        for term in self.offset_terms:
            names |= _columns_read(ast.parse(term, mode="eval"))
        if self._gate is not None:
            names |= self._names_used(self._gate)
        return names

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys([*self.expert_columns, *self.gate_columns]))

    @staticmethod
    def _names_used(rhs) -> set[str]:
        """The data columns the terms of ``rhs`` read."""
        names = set()
        for t in rhs:
            for factor in t.factors:
                if factor.eval_method.value == "lookup":
                    names.add(factor.expr)
                elif factor.eval_method.value == "python":
                    names |= _columns_read(ast.parse(factor.expr, mode="eval"))
        return names

    def _check_columns(self, frame, parts) -> None:
        columns = {str(c) for c in frame.columns}
        for where, rhs in parts:
            for name in sorted(self._names_used(rhs)):
                if name not in columns:
                    raise FormulaError(_unknown(name, columns, where))
                missing = frame[name].isna().to_numpy()
                if missing.any():
                    row = int(np.flatnonzero(missing)[0])
                    raise ValueError(f"{where}: column {name!r} has a missing value in row "
                                     f"{row + 1}.")  # fmt: skip

    # ------------------------------------------------------------------ designs
    def _matrix(self, spec_or_rhs, frame, where: str, fitted: dict | None):
        from formulaic import ModelSpec
        from formulaic.errors import FactorEvaluationError
        from formulaic.parser.types import Factor

        if fitted is None:
            spec = ModelSpec(formula=spec_or_rhs, materializer="pandas", na_action="raise")
        else:
            # copies: formulaic writes into the state it is given while it evaluates
            fitted = copy.deepcopy(fitted)
            encoder = {k: (Factor.Kind(v[0]), v[1]) for k, v in fitted["encoder_state"].items()}
            spec = ModelSpec(
                formula=fitted["formula"],
                materializer="pandas",
                na_action="raise",
                encoder_state=encoder,
                transform_state=fitted["transform_state"],
            )
        try:
            with warnings.catch_warnings():
                # a level not seen when fitting would silently become the base level
                warnings.simplefilter("error")
                matrix = spec.get_model_matrix(frame)
        except Warning as exc:
            raise ValueError(f"{where}: {exc}".split(" They are being")[0]) from None
        except (FactorEvaluationError, ValueError, TypeError, KeyError) as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{where}: cannot evaluate on the data: {text}") from None
        return matrix

    @staticmethod
    def _learnt(matrix) -> dict:
        spec = matrix.model_spec
        encoder = {
            k: [v[0].value, {kk: _json_ready(vv) for kk, vv in v[1].items() if kk != "contrasts"}]
            for k, v in spec.encoder_state.items()
        }
        return {"formula": str(spec.formula), "encoder_state": encoder,
                "transform_state": _json_ready(spec.transform_state)}  # fmt: skip

    @staticmethod
    def _design(matrix) -> Any:
        import pandas as pd

        columns = [str(c) for c in matrix.columns]
        design = pd.DataFrame(np.asarray(matrix, dtype=np.float64), columns=columns,
                              index=matrix.index)  # fmt: skip
        return design.drop(columns=["Intercept"], errors="ignore")

    def fit(self, frame) -> ModelFormula:
        """Learn the designs' state (factor levels, centres, knots) from ``frame``."""
        parts = [("formula", self._expert)]
        if self._gate is not None:
            parts.append(("gate_formula", self._gate))
        self._check_columns(frame, parts)
        state, columns = {}, {}
        for where, rhs in parts:
            m = self._matrix(rhs, frame, where, None)
            state[where] = self._learnt(m)
            columns[where] = list(self._design(m).columns)
        if not columns["formula"]:
            raise FormulaError(
                f"formula: {self.formula!r} gives the experts no regressor; a mixture of "
                "experts needs at least one term on the right of '~'."
            )
        self._state = state
        self.expert_columns = columns["formula"]
        # a constant gate ("~ 1") reads no column
        self.gate_columns = (
            [] if self.constant_gate else columns.get("gate_formula", self.expert_columns)
        )
        return self

    def estimator_settings(self) -> dict[str, Any]:
        """The estimator's ``expert_features``, ``gate_features`` (and ``gate``) for
        the design :meth:`transform` returns: the experts' and the gate's columns, or
        ``gate="constant"`` for ``~ 1``."""
        if self.constant_gate:
            return {"expert_features": None, "gate_features": None, "gate": "constant"}
        if self.gate_formula is None:
            return {"expert_features": None, "gate_features": None}
        return {"expert_features": self.expert_columns, "gate_features": self.gate_columns}

    def _check_fitted(self) -> None:
        if not self._state:
            raise ValueError("this ModelFormula is not fitted yet: call fit(frame) first.")

    def transform(self, frame):
        """The design (without intercept) of ``frame``: a DataFrame with :attr:`columns`.

        Raises
        ------
        ValueError
            Naming a missing column, a missing value, or a factor level not seen
            when fitting.
        """
        self._check_fitted()
        parts = [("formula", self._expert)]
        if self._gate is not None:
            parts.append(("gate_formula", self._gate))
        self._check_columns(frame, parts)
        designs = [self._design(self._matrix(None, frame, w, self._state[w])) for w, _ in parts]
        import pandas as pd

        design = pd.concat(designs, axis=1)
        design = design.loc[:, ~design.columns.duplicated()]
        return design[self.columns]

    def response_values(self, frame):
        """The target column (or its transform, ``np.log(y)``) of ``frame``, as a Series."""
        return column_expression(frame, self._response, "formula")

    def offset_values(self, frame) -> np.ndarray | None:
        """The offset of ``frame``'s rows, the sum of the ``offset(...)`` terms'
        values, shape (n_samples,); None when the formula has none."""
        if not self.offset_terms:
            return None
        return sum(column_expression(frame, term, "formula").to_numpy(dtype=np.float64)
                   for term in self.offset_terms)  # fmt: skip

    def fit_transform(self, frame):
        """``fit(frame)``, then the design and the target: ``(X, y)``."""
        return self.fit(frame).transform(frame), self.response_values(frame)

    # ------------------------------------------------------------------ files
    def to_state(self) -> dict:
        """What a model file stores: the formulas and the learnt state, plain JSON."""
        self._check_fitted()
        return json.loads(json.dumps({
            "formula": self.formula, "gate_formula": self.gate_formula,
            "expert_columns": self.expert_columns, "gate_columns": self.gate_columns,
            "learnt": self._state,
        }))  # fmt: skip

    @classmethod
    def from_state(cls, state: dict) -> ModelFormula:
        """Rebuild from :meth:`to_state`'s output, checking every part before use.

        The formulas' terms pass :func:`check_term` (they are parsed again), the
        learnt state is plain JSON of finite numbers, and the columns are lists of
        strings; anything else is a ValueError.
        """
        if not isinstance(state, dict):
            raise ValueError("formula: the stored formula is not a JSON object")
        for key in ("expert_columns", "gate_columns"):
            cols = state.get(key)
            if not (isinstance(cols, list) and all(isinstance(c, str) for c in cols)):
                raise ValueError(f"formula: {key!r} must be a list of column names")
        learnt = state.get("learnt")
        wanted = {"formula"} | ({"gate_formula"} if state.get("gate_formula") else set())
        if not isinstance(learnt, dict) or set(learnt) != wanted:
            raise ValueError(f"formula: 'learnt' must hold the state of {sorted(wanted)}")
        for where, part in learnt.items():
            if not (isinstance(part, dict) and isinstance(part.get("formula"), str)
                    and isinstance(part.get("encoder_state"), dict)
                    and isinstance(part.get("transform_state"), dict)):  # fmt: skip
                raise ValueError(f"formula: the learnt state of {where!r} is incomplete")
            _check_json(part, f"formula.{where}")
            for v in part["encoder_state"].values():
                if not (isinstance(v, list) and len(v) == 2 and isinstance(v[1], dict)
                        and v[0] in ("constant", "numerical", "categorical")):  # fmt: skip
                    raise ValueError(f"formula: bad encoder state in {where!r}")
        out = cls(state.get("formula"), state.get("gate_formula"))
        for where, part in learnt.items():
            # the stored right-hand side must be the one the formula parses to
            own = out._expert if where == "formula" else out._gate
            if part["formula"] != str(own):
                raise ValueError(f"formula: the learnt state of {where!r} is of another formula")
        out._state = learnt
        out.expert_columns = list(state["expert_columns"])
        out.gate_columns = list(state["gate_columns"])
        return out

    def __repr__(self) -> str:
        gate = "" if self.gate_formula is None else f", gate_formula={self.gate_formula!r}"
        return f"ModelFormula({self.formula!r}{gate})"

    def __str__(self) -> str:
        gate = "" if self.gate_formula is None else f"; gate: {self.gate_formula}"
        return f"{self.formula}{gate}"


def fit_formula(estimator, formula: str, data, *, gate_formula: str | None = None):
    """Fit ``estimator`` on the columns a formula makes of ``data``, flexmix's way.

    The estimator's ``expert_features`` and ``gate_features`` are set to the two
    formulas' design columns (``gate="constant"`` for ``gate_formula="~ 1"``), it is
    fitted on the design, and it keeps the fitted formula as ``formula_`` (stored in
    its model file), so that ``estimator.predict(estimator.formula_.transform(new))``
    applies the same columns, levels and centres to new data.

    Parameters
    ----------
    estimator : MoERegressor or MoEClassifier (any moekit EM estimator)
    formula : str
        ``"y ~ x + I(x**2) + C(group)"``.
    data : pandas.DataFrame
    gate_formula : str, optional
        ``"~ z"``; the experts' terms by default.

    Returns
    -------
    estimator
        Fitted, with ``formula_``; an ``offset(...)`` term is passed to ``fit`` as
        ``offset=`` (and to ``predict`` as ``offset=formula_.offset_values(new)``).

    Examples
    --------
    >>> from moekit import MoERegressor
    >>> from moekit.datasets import load_mcycle
    >>> frame = load_mcycle(as_frame=True)
    >>> m = fit_formula(MoERegressor(n_experts=2, n_init=2, random_state=0),
    ...                 "accel ~ times", frame, gate_formula="~ times")
    >>> m.formula_.expert_columns
    ['times']
    >>> m.predict(m.formula_.transform(frame.head(3))).shape
    (3,)
    """
    f = ModelFormula(formula, gate_formula)
    X, y = f.fit_transform(data)
    estimator.set_params(**f.estimator_settings())
    offset = f.offset_values(data)
    estimator.fit(X, y, **({} if offset is None else {"offset": offset}))
    estimator.formula_ = f
    return estimator


def column_expression(frame, expr: str, where: str):
    """A column of ``frame`` named ``expr``, or the expression ``expr`` evaluated on
    it (``log(hours)``; checked by :func:`check_term` first), as a float Series."""
    import pandas as pd

    if expr in frame.columns:
        return frame[expr]
    check_term(expr, {str(c) for c in frame.columns}, where=where)
    from formulaic import model_matrix

    values = model_matrix(f"{expr} - 1", frame, na_action="raise")
    return pd.Series(np.asarray(values, dtype=np.float64)[:, 0], index=frame.index, name=expr)
