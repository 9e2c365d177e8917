"""Bundled real data and generators of problems with known experts."""

from moekit.datasets._bundled import load_mcycle, mcycle_path
from moekit.datasets.synthetic import MoETruth, make_moe_regression, make_moe_truth

__all__ = ["MoETruth", "load_mcycle", "make_moe_regression", "make_moe_truth", "mcycle_path"]
