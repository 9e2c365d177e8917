"""Bundled real data and generators of problems with known experts."""

from moekit.datasets._bundled import library_text, load_austen, load_mcycle, mcycle_path
from moekit.datasets.inverse import InverseProblem, make_bishop_inverse, make_robot_arm
from moekit.datasets.multitask import (
    MultiTaskTruth,
    make_multitask_regression,
    make_multitask_truth,
)
from moekit.datasets.synthetic import MoETruth, make_moe_regression, make_moe_truth

__all__ = [
    "InverseProblem",
    "MoETruth",
    "MultiTaskTruth",
    "library_text",
    "load_austen",
    "load_mcycle",
    "make_bishop_inverse",
    "make_moe_regression",
    "make_moe_truth",
    "make_multitask_regression",
    "make_multitask_truth",
    "make_robot_arm",
    "mcycle_path",
]
