"""Hugging Face MoE models with moekit layers: convert, patch, unpatch (needs transformers).

``convert_block`` turns one MoE block of a transformers model (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, DeepSeek-V3) into an equal :class:`~moekit.nn.MoE`; ``patch_model``
swaps every such block of a model for a moekit layer behind the block's interface and
``unpatch_model`` writes the weights back so that ``save_pretrained`` gives a standard
checkpoint; ``upcycle_model`` turns the MLPs of a dense model (Llama, Mistral, Qwen2)
into MoE layers equal to them at init. This is the only part of moekit that imports
transformers, an optional dependency: ``pip install moekit[hf]``.
"""

try:
    import transformers  # noqa: F401  (only to fail early with advice)
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "moekit.nn.hf needs the transformers package, an optional dependency of moekit; "
        "install it with: pip install moekit[hf]"
    ) from err

from moekit.nn.hf.families import FAMILIES, Family
from moekit.nn.hf.patch import HFMoEBlock, convert_block, patch_model, unpatch_model
from moekit.nn.hf.upcycling import upcycle_model

__all__ = [
    "FAMILIES",
    "Family",
    "HFMoEBlock",
    "convert_block",
    "patch_model",
    "unpatch_model",
    "upcycle_model",
]
