"""How an estimator's target is coded for EM, in one object per kind of target.

EM works on a coded target: a regression's y standardised per output, a
classification's labels as class indices. A *target coding* owns everything about
that: it checks the training target and learns its coding (the fitted attributes
named in ``attrs``: ``_y_mean``, ``classes_``...), checks and encodes any later
target with a learnt coding, decodes what the experts predict back into the user's
units, and gives the log-Jacobian of the coding, which turns likelihoods of the
coded target into likelihoods of y.

Every method reads the coding from a mapping of attribute names, the pending fit's
state or ``vars(estimator)`` after it, so that a coding object holds no fitted state
of its own and a failed fit leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets

from moekit._core.engine import EM_DTYPE, to_numpy

Coding = Mapping[str, Any]


class TargetCoding:
    """The coding of a target (not for direct use; see the module docstring).

    Attributes
    ----------
    attrs : tuple of str
        The fitted attributes that hold the coding; a warm fit keeps them.
    validation : dict
        The arguments of scikit-learn's ``validate_data`` for y.
    """

    attrs: ClassVar[tuple[str, ...]] = ()
    validation: ClassVar[dict] = {}

    def fit(self, y, weight=None) -> tuple[np.ndarray, dict[str, Any]]:  # pragma: no cover
        """Check the training target; return it and its coding (``attrs``).

        ``weight`` (n,) holds the rows' frequency weights, or None.
        """
        raise NotImplementedError

    def fit_shard(self, y) -> tuple[np.ndarray, dict[str, Any]]:
        """:meth:`fit` on one process's shard of a data-parallel fit: only the checks
        a shard can make alone (no collective: any may fail on one shard)."""
        return self.fit(y)

    def reduce(self, y, coding: Coding, comm, n: int, weight=None) -> dict[str, Any]:
        """The coding of the whole target from the shards' codings (collectives, the
        same on every process); ``n`` is the total number of rows, ``weight`` this
        shard's frequency weights (n_shard,) or None."""
        return dict(coding)

    def check(self, y, coding: Coding) -> np.ndarray:  # pragma: no cover - abstract
        """A target checked against a learnt coding, as an array."""
        raise NotImplementedError

    def encode(self, y, coding: Coding, device) -> torch.Tensor:  # pragma: no cover
        """The coded target EM works on, of a target that :meth:`fit` or :meth:`check`
        has passed (it is not checked again)."""
        raise NotImplementedError

    def log_jacobian(self, coding: Coding) -> float:
        """log |d y_coded / d y| per row: converts likelihoods to the user's units."""
        return 0.0


class RealTarget(TargetCoding):
    """Real targets of shape (n,) or (n, m), standardised per output where the
    expert family asks for it: z = (y - mean) / scale, so that
    log p(y) = log p(z) - sum_j log scale_j.

    The family declares its target (:class:`moekit.experts.base.TargetExperts`):
    ``standardize_target`` says whether y is standardised (a Poisson rate is
    modelled on the counts' own scale); ``check_target``, where it has one, refuses
    targets it cannot model (negative counts, y <= 0 for Gamma experts) and says
    how many columns y has (two for binomial experts, successes and failures, which
    predict one output, the probability of success).

    Parameters
    ----------
    family : type
        The expert family's class.
    """

    attrs = ("_y_mean", "_y_scale", "_y_2d")
    validation: ClassVar[dict] = {"multi_output": True, "y_numeric": True}

    def __init__(self, family: type) -> None:
        self.family = family

    def fit(self, y, weight=None):
        y = np.asarray(y, dtype=np.float64)
        y2 = y.reshape(len(y), -1)
        check = getattr(self.family, "check_target", None)
        if check is not None:
            y2 = check(y2)
        if self.family.standardize_target:
            # weighted: the moments of the rows repeated w_i times
            mean = np.average(y2, axis=0, weights=weight)
            sd = np.sqrt(np.average((y2 - mean) ** 2, axis=0, weights=weight))
            coding = {"_y_mean": mean, "_y_scale": self._scales(sd)}
        else:
            m = self._n_outputs(y2)
            coding = {"_y_mean": np.zeros(m), "_y_scale": np.ones(m)}
        # a target of several columns that the family reads as one output (successes
        # and failures) is predicted as a 1-d target
        coding["_y_2d"] = y.ndim == 2 and len(coding["_y_mean"]) == y2.shape[1]
        return y, coding

    def _scales(self, sd: np.ndarray) -> np.ndarray:
        # one scale for every column where the family's covariance is spherical in
        # y's units (the root mean variance), else each column's own
        if getattr(self.family, "common_target_scale", False):
            sd = np.full_like(sd, np.sqrt(np.mean(sd**2)))
        return np.where(sd > 0, sd, 1.0)

    def _n_outputs(self, y2: np.ndarray) -> int:
        # the outputs predicted: one for a family reading several columns as one
        return 1 if getattr(self.family, "target_columns", 1) > 1 else y2.shape[1]

    def reduce(self, y, coding, comm, n, weight=None):
        # the standardisation of all the shards' targets, as one process computes it
        if not self.family.standardize_target:
            return dict(coding)
        y2 = torch.as_tensor(np.asarray(y, dtype=np.float64).reshape(len(y), -1))
        w = None if weight is None else torch.as_tensor(weight, dtype=torch.float64)
        mean, sd = comm.moments(y2, n, w)
        return {**coding, "_y_mean": mean.numpy(), "_y_scale": self._scales(sd.numpy())}

    def check(self, y, coding):
        y = np.asarray(y, dtype=np.float64)
        m = len(coding["_y_mean"])
        cols = max(m, getattr(self.family, "target_columns", 1))
        if y.ndim == 1 and cols == 1:
            y = y.reshape(-1, 1)
        if y.ndim != 2 or y.shape[1] != cols:
            what = "output(s)" if cols == m else "columns"
            raise ValueError(f"y must have {cols} {what}; got an array of shape {y.shape}.")
        if not np.isfinite(y).all():
            raise ValueError("Input y contains NaN or infinity.")
        check = getattr(self.family, "check_target", None)
        return y if check is None else check(y)

    def encode(self, y, coding, device):
        y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        z = (y - coding["_y_mean"]) / coding["_y_scale"]
        return torch.as_tensor(z.T.copy(), dtype=EM_DTYPE, device=device)  # (m, n)

    def log_jacobian(self, coding):
        return -float(np.log(coding["_y_scale"]).sum())

    @staticmethod
    def decode(means: torch.Tensor, stds: torch.Tensor, coding: Coding):
        """Experts' means and scales of the coded target, (..., m), in y's units."""
        scale = torch.as_tensor(coding["_y_scale"], dtype=means.dtype, device=means.device)
        shift = torch.as_tensor(coding["_y_mean"], dtype=means.dtype, device=means.device)
        return means * scale + shift, stds * scale

    @staticmethod
    def shape(t: torch.Tensor, coding: Coding) -> np.ndarray:
        """A prediction (..., m) as the user gave y: without the output axis for a 1-d y."""
        a = to_numpy(t)
        return a if coding["_y_2d"] else a[..., 0]


class ClassTarget(TargetCoding):
    """Class labels, coded as indices into the sorted labels ``classes_``."""

    attrs = ("classes_",)
    validation: ClassVar[dict] = {}

    def __init__(self, family: type | None = None) -> None:
        self.family = family

    def fit(self, y, weight=None):
        check_classification_targets(y)
        enc = LabelEncoder().fit(y)
        if len(enc.classes_) < 2:
            raise ValueError(
                "MoEClassifier needs samples of at least 2 classes in the data, but the data "
                f"contains only one class: {enc.classes_[0]!r}."
            )
        return y, {"classes_": enc.classes_}

    def fit_shard(self, y):
        # one shard may hold a single class: the check of two classes waits for all
        check_classification_targets(y)
        return y, {"classes_": np.unique(y)}

    def reduce(self, y, coding, comm, n, weight=None):
        classes = np.unique(np.concatenate(comm.gather_objects(coding["classes_"])))
        if len(classes) < 2:
            raise ValueError(
                "MoEClassifier needs samples of at least 2 classes in the data, but the data "
                f"of every process contains only one class: {classes[0]!r}."
            )
        return {"classes_": classes}

    def check(self, y, coding):
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise ValueError(f"y must be one-dimensional; got shape {y.shape}.")
        return y

    def encode(self, y, coding, device):
        y = np.asarray(y).reshape(len(y))
        classes = coding["classes_"]
        codes = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
        unknown = classes[codes] != y
        if unknown.any():
            raise ValueError(
                f"y contains labels not seen in fit: {np.unique(y[unknown])[:5].tolist()}."
            )
        return torch.as_tensor(codes, dtype=torch.long, device=device)

    @staticmethod
    def decode(codes: np.ndarray, coding: Coding) -> np.ndarray:
        """Class indices back to the labels."""
        return coding["classes_"][codes]
