"""``summary()``: the coefficient table of a fitted model, and the rows it is taken on.

The standard errors themselves come from :mod:`moekit.estimators.inference` (the
observed information), imported only when a summary is asked for: it needs pandas.
"""

from __future__ import annotations

from sklearn.utils.validation import check_is_fitted


class SummaryMixin:
    """``summary()`` and the training rows it defaults to (mixed into :class:`BaseMoE`).

    A fit keeps a reference (not a copy) to the rows it validated, ``_summary_data``;
    it is dropped when the model is pickled or saved, and a data-parallel fit, whose
    rows are spread over processes, keeps none.
    """

    def summary(self, X=None, y=None, *, sample_weight=None, offset=None,
                gate_reference: int = 0, information_rows: int | None = None):  # fmt: skip
        """Coefficients with standard errors, z-values and p-values.

        Standard errors come from the observed information, the negative Hessian
        of the log-likelihood at the fitted parameters, as R's flexmix ``refit()``
        gives them: from the families' analytic scores and Hessian blocks (Louis'
        identity, :mod:`moekit.estimators._information`) where both the experts and
        the gate have them, else by torch autograd; see :mod:`moekit.estimators.inference` for
        the parametrisation (data units; gate relative to expert 0).

        Parameters
        ----------
        X, y : array-like, optional
            The data to compute the information on; by default the data of the last
            ``fit`` (not kept in pickles or model files).
        sample_weight : array-like of shape (n_samples,), optional
            Frequency weights: the information is that of the rows repeated w_i
            times, and n is sum_i w_i. By default those of the last ``fit`` when X
            and y are its data.
        offset : array-like of shape (n_samples,), optional
            The experts' known term of each row, as in ``fit`` (by default that of
            the last ``fit`` when X and y are its data).
        gate_reference : int, default=0
            The expert the gate's coefficients are relative to.
        information_rows : int, optional
            Estimate the observed information from this many random rows, scaled by
            n / m, where X has more (the note says so). The analytic information
            costs about a sixth of the fit (K = 3 linear experts, 20 features, 1e6
            rows, bench/summary_speed.py); the autograd one, for families without
            analytic derivatives, about one pass over the data per parameter, and
            there an estimate from a few hundred thousand rows has a small
            Monte-Carlo error.
            Default: every row.

        Returns
        -------
        Summary
            ``.table`` is a pandas DataFrame; ``print(summary)`` shows the text form.
        """
        from moekit.estimators.inference import observed_information_summary

        check_is_fitted(self)
        if X is None or y is None:
            if getattr(self, "_summary_data", None) is None:
                raise ValueError(
                    "summary() needs X and y: the training data is not kept after pickling "
                    "or loading a model file, nor by a data-parallel fit (distributed=True), "
                    "whose standard errors summary(X, y) computes on the rows it is given."
                )
            X, y = self._held_rows()
            sample_weight, offset = getattr(self, "_summary_rows", (None, None))
        if information_rows is not None and (
            not isinstance(information_rows, int) or information_rows < 1
        ):
            raise ValueError(f"information_rows must be a positive int; got {information_rows!r}")
        return observed_information_summary(self, X, y, gate_reference, information_rows,
                                            sample_weight, offset)  # fmt: skip

    def _held_rows(self):
        """The rows the model was fitted on, as the fit validated them, under their names.

        The fit keeps a reference to its validated X (no copy); a frame's column names
        are given back (again without a copy) so that its own checks see the frame
        it was fitted on.
        """
        X, y = self._summary_data
        names = getattr(self, "feature_names_in_", None)
        if names is not None and not hasattr(X, "columns"):
            import pandas as pd

            X = pd.DataFrame(X, columns=names, copy=False)
        return X, y

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_summary_data", None)
        state.pop("_summary_rows", None)
        return state
