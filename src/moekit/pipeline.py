"""The predictive distribution of a scikit-learn ``Pipeline`` that ends in a mixture.

A pipeline's ``predict`` runs X through its transformers, then its last step; a
mixture's predictive distribution p(y | x) is a method scikit-learn does not know, so
``pipe.predict_distribution`` does not exist. :func:`predict_distribution` is that
route in one call.
"""

from __future__ import annotations

from typing import Any

__all__ = ["predict_distribution"]


def predict_distribution(estimator: Any, X) -> Any:
    """p(y | x) of a fitted estimator, or of a fitted ``Pipeline`` ending in one.

    For a ``Pipeline``, X goes through every step but the last (``pipe[:-1]``,
    exactly as ``pipe.predict`` sends it) and the last step's ``predict_distribution``
    is applied to the result.

    Parameters
    ----------
    estimator : fitted estimator or sklearn.pipeline.Pipeline
        A moekit estimator (anything with ``predict_distribution``), or a pipeline
        whose last step is one.
    X : array-like of shape (n_samples, n_features)
        The rows as the pipeline's first step takes them.

    Returns
    -------
    MixturePrediction

    Raises
    ------
    TypeError
        When the estimator, or the pipeline's last step, has no
        ``predict_distribution``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from moekit import MoERegressor, predict_distribution
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 2)); y = np.abs(X[:, 0]) + 0.1 * rng.normal(size=200)
    >>> pipe = make_pipeline(StandardScaler(), MoERegressor(2, random_state=0)).fit(X, y)
    >>> predict_distribution(pipe, X[:3]).weights.shape
    (3, 2)
    """
    from sklearn.pipeline import Pipeline

    final, Xt = estimator, X
    if isinstance(estimator, Pipeline):
        final = estimator.steps[-1][1]
        if len(estimator.steps) > 1:
            Xt = estimator[:-1].transform(X)
    if not hasattr(final, "predict_distribution"):
        where = "the pipeline's last step, " if final is not estimator else ""
        raise TypeError(
            f"predict_distribution: {where}{type(final).__name__}, has no predict_distribution; "
            "it needs a moekit estimator (MoERegressor, MDNRegressor, ...) as the last step."
        )
    return final.predict_distribution(Xt)
