"""Sparse Mixture-of-Experts layers for PyTorch.

``MoE`` is the layer and ``MoETransformer`` a small language model built from it; the
routers, the expert bank and the balancing losses are exported for users who build
their own, and ``upcycle`` turns a trained dense MLP into an equal MoE layer.
``MultiGateMoE`` (with ``SharedBottom`` beside it) is the dense multi-task
mixture of experts of recommender systems: one gate and one tower per task.
"""

from moekit.nn.config import MoEConfig
from moekit.nn.experts import ExpertBank, FeedForward
from moekit.nn.functional import importance_loss, load_balancing_loss, router_z_loss
from moekit.nn.layer import MoE, MoEStats, update_router_biases
from moekit.nn.multitask import MultiGateMoE, MultiTaskStats, SharedBottom, StackedMLP
from moekit.nn.routers import (
    ExpertChoiceRouter,
    NoisyTopKRouter,
    Router,
    Routing,
    SwitchRouter,
    TopKRouter,
)
from moekit.nn.sigmoid_router import SigmoidBiasRouter
from moekit.nn.train import train_lm
from moekit.nn.train_config import TrainConfig
from moekit.nn.transformer import MoETransformer, TransformerConfig
from moekit.nn.upcycle import upcycle

__all__ = [
    "ExpertBank",
    "ExpertChoiceRouter",
    "FeedForward",
    "MoE",
    "MoEConfig",
    "MoEStats",
    "MoETransformer",
    "MultiGateMoE",
    "MultiTaskStats",
    "NoisyTopKRouter",
    "Router",
    "Routing",
    "SharedBottom",
    "SigmoidBiasRouter",
    "StackedMLP",
    "SwitchRouter",
    "TopKRouter",
    "TrainConfig",
    "TransformerConfig",
    "importance_loss",
    "load_balancing_loss",
    "router_z_loss",
    "train_lm",
    "upcycle",
    "update_router_biases",
]
