"""Per-row derivatives of a family's log-terms in its local parameters.

The observed information of a mixture (:mod:`moekit.estimators._information`) is
built from them; expert and gate families that give them declare the capability
(:class:`moekit.experts.base.AnalyticExperts`, :class:`moekit.gates.base.AnalyticGate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LocalDerivatives:
    """Derivatives of per-row log-terms in a family's local parameters, for each component.

    A family's log-terms (log p_k(y_i | x_i) of an expert, log g_k(x_i) of a gate)
    depend on its reported parameters only through L local parameters per row: linear
    predictors eta = beta^T z_i on the standardised design z_i (their parameters are
    coefficient vectors, in the data's units) and scalars (a scale, a shape). The
    observed information is built from these (:mod:`moekit.estimators._information`).

    Attributes
    ----------
    d1 : Tensor of shape (K, L, c)
        d log-term_k / d local parameter, per row (or broadcastable to it).
    d2 : Tensor of shape (K, L, L, c)
        The second derivatives, symmetric in the middle two axes (leading or trailing
        axes of size 1 broadcast).
    n_linear : int
        How many of the L (the first ones) are linear predictors; the rest are scalars.
    """

    d1: torch.Tensor
    d2: torch.Tensor
    n_linear: int
