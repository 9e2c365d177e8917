"""Choosing the number of experts, as flexmix's stepFlexmix does."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd
from sklearn.base import clone

from moekit._core.validation import Options, validate_params

CRITERIA = ("bic", "aic", "icl", "elbo")
HIGHER_IS_BETTER = ("elbo",)


def icl(model, X, y, **fit_params) -> float:
    """Integrated completed likelihood (Biernacki, Celeux and Govaert, 2000), ICL-BIC form.

    .. math::  \\mathrm{ICL} = \\mathrm{BIC} + 2\\, \\mathrm{EN}, \\qquad
               \\mathrm{EN} = -\\sum_i w_i \\sum_k r_{ik} \\log r_{ik},

    BIC penalised by the entropy of the responsibilities: it prefers experts whose
    regions are well separated (lower is better). ``fit_params`` are the rows'
    ``sample_weight`` (frequency weights w_i: n is their sum), ``offset`` and
    ``y_upper``/``truncation`` (the responsibilities of censored rows' intervals), as
    the fit took them.
    """
    given = {k: v for k, v in fit_params.items() if v is not None}
    w = given.pop("sample_weight", None)
    offset = given.pop("offset", None)
    r = model.responsibilities(X, y, offset, **given) if (offset is not None or given) \
        else model.responsibilities(X, y)  # fmt: skip
    terms = r * np.log(np.clip(r, 1e-300, None))
    entropy = -float(np.sum(terms if w is None else np.asarray(w, dtype=float)[:, None] * terms))
    if w is None and offset is None and not given:
        return model.bic(X, y) + 2.0 * entropy
    n = len(r) if w is None else float(np.sum(w))
    loglik = model.log_likelihood(X, y, w, offset, **given) * n
    return -2.0 * loglik + model.n_parameters() * np.log(n) + 2.0 * entropy


def _fitted_experts(model) -> int:
    """The number of experts the fitted model has (fewer than asked after min_share)."""
    return len(model.expert_sizes_)


def _parent(model, k: int):
    """The K - 1 fit as a start of the K fit, when it kept its K - 1 experts."""
    if model is None or _fitted_experts(model) != k - 1:
        return None
    return model


def _family_params(estimator, k: int) -> dict:
    """``expert=`` for k experts when the template lists a family per expert: the list,
    then its last family repeated (``['zero', 'poisson']`` at K = 3 is
    ``['zero', 'poisson', 'poisson']``, a zero-inflated mixture of two Poissons)."""
    names = getattr(estimator, "expert", None)
    if not isinstance(names, (list, tuple)):
        return {}
    if k < len(names):
        raise ValueError(
            f"n_experts must hold numbers >= {len(names)} with expert={list(names)!r} (a "
            f"family per expert, the last repeated for more experts); got {k}."
        )
    return {"expert": [*names, *[names[-1]] * (k - len(names))]}


def select_n_experts(
    estimator,
    X,
    y,
    n_experts: Iterable[int] = range(1, 8),
    criterion: str = "bic",
    n_init: int | None = None,
    verbose: int = 0,
    fit_params: dict | None = None,
):
    """Fit the estimator for every number of experts and keep the best by a criterion.

    The numbers of experts are fitted in increasing order, and each fit also starts
    from the fit with one expert fewer (``fit(..., start_from=...)``), so the
    log-likelihood in the table never decreases as K grows, among the fits that kept
    every expert (see ``min_share``).

    Parameters
    ----------
    estimator : MoERegressor, MoEClassifier or BayesianMoERegressor
        A template; it is cloned for every K with ``n_experts=K`` (and ``n_init``).
    X : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,) or (n_samples, n_outputs)
    n_experts : iterable of int, default=range(1, 8)
        With a list of families (``expert=['zero', 'poisson']``), every K is at
        least the list's length, and larger K repeat its last family; each K then
        runs its own starts only (no start from the fit with one expert fewer).
    criterion : {'bic', 'aic', 'icl', 'elbo'}, default='bic'
        Lower is better for the first three (``-2 log L`` plus a penalty). ``'elbo'``
        (a :class:`BayesianMoERegressor` only) takes the K of the highest evidence
        lower bound: the total ELBO of the training data, in the data's units.
    n_init : int or None, default=None
        Starts per K; None keeps the estimator's own ``n_init``.
    verbose : int, default=0
        1 prints one line per K.
    fit_params : dict, optional
        The rows' ``sample_weight``, ``offset`` (and ``y_upper``, ``truncation``),
        passed to every ``fit``, ``log_likelihood`` and ``responsibilities``. The
        criteria then count n as the sum of the weights, and ICL's entropy weighs each
        row by its weight.

    Returns
    -------
    best : estimator
        The fitted estimator with the best criterion (lowest; highest ELBO).
    table : pandas.DataFrame
        One row per K: ``n_experts``, ``n_experts_fitted`` (fewer when experts below
        ``min_share`` were removed; such rows are not chosen while a fit that kept
        every expert is), ``log_likelihood`` (total), ``n_parameters``,
        ``bic``, ``aic``, ``icl``, (``elbo``,) ``n_iter``, ``converged``; ``best`` marks
        the choice.
        ``moekit.plotting.plot_criterion(table, criterion)`` draws it.

    Examples
    --------
    >>> from moekit import MoERegressor, select_n_experts
    >>> from moekit.datasets import make_moe_regression
    >>> X, y, _ = make_moe_regression(2000, n_features=2, n_experts=2, random_state=0)
    >>> best, table = select_n_experts(MoERegressor(random_state=0), X, y, n_experts=[1, 2, 3])
    >>> best.n_experts
    2
    """
    validate_params(
        "select_n_experts", {"criterion": criterion}, {"criterion": [Options(CRITERIA)]}
    )
    if criterion == "elbo" and not hasattr(type(estimator), "elbo_"):
        raise ValueError(
            "criterion='elbo' needs an estimator fitted by variational EM "
            f"(BayesianMoERegressor); got {type(estimator).__name__}."
        )
    ks = [int(k) for k in n_experts]
    if not ks or min(ks) < 1:
        raise ValueError(f"n_experts must hold positive ints; got {ks}.")
    _family_params(estimator, min(ks))  # a K the list cannot give fails before any fit
    rows, models = [], {}
    for k in sorted(set(ks)):
        family = _family_params(estimator, k)
        params = {"n_experts": k, **family}
        if n_init is not None:
            params["n_init"] = n_init
        model = clone(estimator).set_params(**params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence and collapse are in the table
            # K + 1 experts start (besides their own starts) from the K fit with one
            # expert split, so the log-likelihood never drops as K grows
            # (not with a family per expert, whose fits the starts do not nest).
            # The fits of simpler models each fit makes as starting points are not
            # carried from K to K + 1: each level of nesting halves the starts, so the
            # K + 1 fit meets a model one level deeper, with fewer starts, than the K fit
            # did (its K-expert constant-gate fit has n_init // 4 starts, the K fit's
            # n_init // 2), and always from another state of the generator: the same
            # model is never the same computation twice
            parent = None if family else _parent(models.get(k - 1), k)
            model.fit(X, y, start_from=parent, **(fit_params or {}))
        n, p = len(X), model.n_parameters()
        if fit_params:  # frequency weights: the rows they stand for
            w = fit_params.get("sample_weight")
            n = n if w is None else float(np.sum(w))
            ll = model.log_likelihood(X, y, **fit_params) * n
            bic, aic = -2.0 * ll + p * np.log(n), -2.0 * ll + 2.0 * p
            icl_ = icl(model, X, y, **fit_params)
        else:
            ll = model.log_likelihood(X, y) * n
            bic, aic, icl_ = model.bic(X, y), model.aic(X, y), icl(model, X, y)
        rows.append(
            {
                "n_experts": k,
                "n_experts_fitted": _fitted_experts(model),
                "log_likelihood": ll,
                "n_parameters": p,
                "bic": bic,
                "aic": aic,
                "icl": icl_,
                **({"elbo": model.elbo_ * n} if hasattr(model, "elbo_") else {}),
                "n_iter": model.n_iter_,
                "converged": model.converged_,
            }
        )
        models[k] = model
        if verbose:
            r = rows[-1]
            left = r["n_experts_fitted"]
            shed = (
                (
                    f" ({left} expert{'s' * (left != 1)} left: the others held less than "
                    f"min_share of the rows, so this is a K = {left} fit)"
                )
                if left < k
                else ""
            )
            print(
                f"K = {k}: log-likelihood {ll:.2f}, {criterion.upper()} {r[criterion]:.2f}" + shed
            )
    table = pd.DataFrame(rows)
    # a K fit that shed experts below min_share is a smaller model, which its own K
    # fits too: only fits that kept every expert compete, so that model choice never
    # picks a K whose extra experts sat on a handful of rows (a spurious maximum)
    whole = table[table["n_experts_fitted"] == table["n_experts"]]
    whole = whole if len(whole) else table
    scores = whole[criterion]
    pick = scores.idxmax() if criterion in HIGHER_IS_BETTER else scores.idxmin()
    best_k = int(table.loc[pick, "n_experts"])
    table["best"] = table["n_experts"] == best_k
    return models[best_k], table
