"""moekit: Mixture-of-Experts models, from EM-fitted statistical MoE to sparse layers."""

__version__ = "0.1.0"
