"""Reporting parametrisations: a family's parameters in the data's units.

The families fit on a standardised design (features centred and scaled, then a row
of ones for the intercept) and, for continuous targets, a standardised target. A
statistician reads coefficients in the data's units. Each family that can be
reported says how its parameters look there (:meth:`report`) and maps them back,
differentiably, to its own free parametrisation (:meth:`from_report`), so that
standard errors can be taken by autograd directly in the reported coordinates.

The maps of a coefficient vector are affine. With z = (x - mean) / scale, a linear
predictor on the standardised design, b^T z + c, equals a + beta^T x with

.. math::  \\beta = b / \\text{scale}, \\qquad
           a = c - \\sum_j b_j\\, \\text{mean}_j / \\text{scale}_j,

and a standardised target, y = y_mean + y_scale u, multiplies (a, beta) by y_scale
and adds y_mean to the intercept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Scaling:
    """How a family's standardised design and target relate to the data's units.

    Attributes
    ----------
    x_mean, x_scale : Tensor of shape (p - 1,)
        Centre and scale of the design's columns (the intercept row excluded).
    y_mean, y_scale : Tensor of shape (m,)
        Centre and scale of a standardised target (0 and 1 when it is not).
    feature_names : list of str
        Names of the design's columns, p - 1 of them.
    output_names : list of str
        Names of the target's columns, or of the classes for a classifier.
    """

    x_mean: torch.Tensor
    x_scale: torch.Tensor
    y_mean: torch.Tensor
    y_scale: torch.Tensor
    feature_names: list[str]
    output_names: list[str]


@dataclass
class Report:
    """A family's parameters in the data's units.

    Attributes
    ----------
    values : dict of str to Tensor
        Named blocks of reported parameters; flattened in order, they form theta.
    blocks, labels : list of str
        For every entry of theta: the table block ("expert 0", "gate: expert 1 vs 0")
        and the parameter's label ("intercept", a feature name, "sigma").
    tested : list of bool
        Whether a z-test against zero means something: False for scales and degrees
        of freedom, whose zero lies on the boundary of the parameter space.
    fixed : dict of str to Tensor
        Parameters held fixed (not in theta) that ``from_report`` needs back, such as
        degrees of freedom fitted at the edge of their range.
    """

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    tested: list[bool] = field(default_factory=list)

    def add(self, name: str, value: torch.Tensor, blocks, labels, tested: bool = True) -> None:
        value = value.detach()
        if len(blocks) != value.numel() or len(labels) != value.numel():
            raise ValueError(f"report block {name!r}: {value.numel()} values, {len(labels)} labels")
        self.values[name] = value
        self.blocks += list(blocks)
        self.labels += list(labels)
        self.tested += [tested] * value.numel()

    def extend(self, other: Report) -> None:
        for name, value in other.values.items():
            if name in self.values:
                raise ValueError(f"report block {name!r} appears twice")
            self.values[name] = value
        self.fixed.update(other.fixed)
        self.blocks += other.blocks
        self.labels += other.labels
        self.tested += other.tested

    def flat(self) -> torch.Tensor:
        if not self.values:  # a family without parameters (point masses at zero)
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([v.reshape(-1) for v in self.values.values()])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, value in self.values.items():
            out[name] = theta[i : i + value.numel()].reshape(value.shape)
            i += value.numel()
        return out


def coef_to_data(coef: torch.Tensor, scaling: Scaling) -> torch.Tensor:
    """Standardised-design coefficients (..., p) -> [intercept, slopes] (..., p) in x's units."""
    slopes = coef[..., :-1] / scaling.x_scale
    intercept = coef[..., -1] - (slopes * scaling.x_mean).sum(-1)
    return torch.cat([intercept.unsqueeze(-1), slopes], -1)


def coef_from_data(ab: torch.Tensor, scaling: Scaling) -> torch.Tensor:
    """Inverse of :func:`coef_to_data`: [intercept, slopes] (..., p) -> design coefficients."""
    intercept, slopes = ab[..., 0], ab[..., 1:]
    last = intercept + (slopes * scaling.x_mean).sum(-1)
    return torch.cat([slopes * scaling.x_scale, last.unsqueeze(-1)], -1)


def coef_labels(scaling: Scaling) -> list[str]:
    return ["intercept", *scaling.feature_names]
