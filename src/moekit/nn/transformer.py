"""A small decoder-only MoE language model in the style of nanoGPT.

Pre-norm blocks ``x + attn(ln(x))`` then ``x + ffn(ln(x))``, where the feed-forward
block is a sparse :class:`~moekit.nn.MoE` (every ``moe_every``-th block; dense
elsewhere), learned position embeddings, and an output head tied to the token
embedding. ``forward(idx, targets)`` returns ``(logits, loss)``; the loss adds the
auxiliary losses of every MoE layer from the same forward pass.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit._core.validation import Interval, InvalidParameterError, Options, validate_params
from moekit.io import register_model
from moekit.nn._checks import POSITIVE_INT
from moekit.nn.config import ROUTERS
from moekit.nn.experts import ACTIVATIONS, FeedForward
from moekit.nn.layer import MoE
from moekit.nn.sharding import sharded_parameters

__all__ = ["MoETransformer", "TransformerConfig", "check_state", "expected_state"]

_CONSTRAINTS = {
    "vocab_size": [POSITIVE_INT],
    "block_size": [POSITIVE_INT],
    "n_layer": [POSITIVE_INT],
    "n_head": [POSITIVE_INT],
    "d_model": [POSITIVE_INT],
    "d_hidden": [POSITIVE_INT],
    "n_experts": [POSITIVE_INT],
    "top_k": [POSITIVE_INT],
    "moe_every": [POSITIVE_INT],
    # expert choice looks at the whole batch, so a token would see later tokens
    "router": [Options(r for r in ROUTERS if r != "expert_choice")],
    "activation": [Options(ACTIVATIONS)],
    "dropout": [Interval(numbers.Real, 0, 1, closed="left")],
}


@dataclass
class TransformerConfig:
    """Shape of a :class:`MoETransformer`; the MoE fields are those of :class:`MoE`."""

    vocab_size: int = 256  # bytes
    block_size: int = 128  # longest context
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_hidden: int = 256  # width of each expert
    n_experts: int = 8
    top_k: int = 2
    router: str = "topk"  # any token-choice router: the model must stay causal
    capacity_factor: float | None = None
    n_shared_experts: int = 0
    activation: str = "swiglu"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    moe_every: int = 1  # 1: every block is MoE; 2: every other block
    dropout: float = 0.0
    routed_scaling_factor: float = 1.0  # g for a model upcycled from g slices (nn.upcycle)

    def __post_init__(self) -> None:
        params = dataclasses.asdict(self)
        validate_params(type(self).__name__, params, _CONSTRAINTS)
        if self.d_model % self.n_head:
            raise InvalidParameterError(
                f"The 'n_head' parameter of {type(self).__name__} must divide "
                f"d_model={self.d_model}. Got {self.n_head!r} instead."
            )
        # the remaining MoE arguments are checked by MoE itself, under its own name

    def moe_kwargs(self) -> dict:
        return {
            "router": self.router,
            "capacity_factor": self.capacity_factor,
            "n_shared_experts": self.n_shared_experts,
            "activation": self.activation,
            "aux_loss_coef": self.aux_loss_coef,
            "z_loss_coef": self.z_loss_coef,
            "routed_scaling_factor": self.routed_scaling_factor,
        }


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` sees positions ``<= t``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=drop, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class Block(nn.Module):
    """Pre-norm transformer block with a MoE (or dense) feed-forward."""

    def __init__(self, config: TransformerConfig, sparse: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        if sparse:
            self.ffn = MoE(
                config.d_model,
                config.d_hidden,
                config.n_experts,
                config.top_k,
                **config.moe_kwargs(),
            )
        else:  # a dense block with the active width of the sparse one
            self.ffn = FeedForward(
                config.d_model, config.top_k * config.d_hidden, config.activation
            )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))  # (B, T, C)
        return x + self.drop(self.ffn(self.ln_2(x)))  # (B, T, C)


@register_model
class MoETransformer(nn.Module):
    """Decoder-only language model whose feed-forward blocks are sparse MoE layers.

    Parameters
    ----------
    config : TransformerConfig, optional
        Shape of the model; keyword arguments override its fields.

    Attributes
    ----------
    aux_loss : Tensor
        Sum of the MoE layers' ``aux_loss`` from the last forward (also in ``loss``).

    Examples
    --------
    >>> import torch
    >>> from moekit.nn import MoETransformer
    >>> model = MoETransformer(vocab_size=32, block_size=16, n_layer=2, d_model=32,
    ...                        d_hidden=32, n_experts=4)
    >>> idx = torch.randint(0, 32, (2, 16))
    >>> logits, loss = model(idx, targets=idx)
    >>> logits.shape
    torch.Size([2, 16, 32])
    >>> model.generate(idx[:, :4], max_new_tokens=5).shape
    torch.Size([2, 9])
    """

    def __init__(self, config: TransformerConfig | None = None, **overrides) -> None:
        super().__init__()
        base = config if config is not None else TransformerConfig()
        config = dataclasses.replace(base, **overrides) if overrides else base
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, sparse=(i % config.moe_every == config.moe_every - 1))
            for i in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight"):  # scaled residual init, per GPT-2
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))
        self.aux_loss: Tensor = torch.zeros(())

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def moe_layers(self) -> list[MoE]:
        """The sparse layers, first block first."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def _check_idx(self, idx: Tensor) -> None:
        cfg = self.config
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"MoETransformer expects token ids as an integer tensor of shape (B, T); "
                f"got {type(idx).__name__ if not isinstance(idx, Tensor) else idx.dtype}."
            )
        if idx.dim() != 2 or not 0 < idx.shape[1] <= cfg.block_size:
            raise ValueError(
                f"MoETransformer expects idx of shape (B, T) with 1 <= T <= "
                f"block_size={cfg.block_size}; got shape {tuple(idx.shape)}."
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cfg.vocab_size):
            raise ValueError(
                f"Token ids must lie in [0, vocab_size={cfg.vocab_size}); got values in "
                f"[{int(idx.min())}, {int(idx.max())}]."
            )

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Next-token logits, and with ``targets`` the loss.

        Parameters
        ----------
        idx : Tensor of shape (B, T)
            Token ids.
        targets : Tensor of shape (B, T), optional
            Next tokens; -1 is ignored.

        Returns
        -------
        logits : Tensor of shape (B, T, vocab_size)
        loss : Tensor or None
            Mean cross-entropy plus the MoE auxiliary losses.
        """
        self._check_idx(idx)
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        self.aux_loss = sum((m.aux_loss for m in self.moe_layers()), logits.new_zeros(()))
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, ce + self.aux_loss

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write the model to ``path`` (safetensors + JSON config, no pickle)."""
        from moekit.io import save_model

        if sharded_parameters(self):  # the file must hold every expert
            raise ValueError(
                "This model is expert parallel: each process holds part of the experts. "
                "Call moekit.nn.sharding.gather_experts(model) on every process first, then "
                "save from one."
            )

        save_model(self, path)

    def _to_state(self) -> tuple[dict, dict, dict]:
        # the head shares the embedding's weight (tied): store it once
        tensors = {
            k: v.detach().clone() for k, v in self.state_dict().items() if k != "lm_head.weight"
        }
        return (
            dataclasses.asdict(self.config),
            {"training": getattr(self, "training_log", {})},
            tensors,
        )

    @classmethod
    def _from_state(cls, params: dict, state: dict, tensors: dict) -> MoETransformer:
        config = TransformerConfig(**params)
        check_state(config, tensors)  # before the model is allocated
        model = cls(config)
        model.load_state_dict(tensors, strict=False)  # lm_head.weight is tied to wte
        model.training_log = state.get("training", {})
        return model.eval()

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` of shape (B, T); returns (B, T + n).

        ``temperature`` 0 picks the most likely token; ``top_k`` samples among the
        ``k`` most likely only.
        """
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]  # (B, <=block_size)
            logits = self(context)[0][:, -1, :]  # (B, vocab)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = logits.softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def expected_state(config: TransformerConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name, shape and dtype of every tensor a model file of ``config`` holds.

    The model is built on the meta device, so nothing is allocated: a file can be
    checked against its stored configuration before any of its tensors is read.
    The output head is tied to the token embedding and is not stored.
    """
    with torch.device("meta"):
        model = MoETransformer(config)
    return {
        name: (tuple(t.shape), t.dtype)
        for name, t in model.state_dict().items()
        if name != "lm_head.weight"
    }


def check_state(config: TransformerConfig, tensors: dict[str, Tensor]) -> None:
    """Check the weights of a model file against its configuration.

    Raises
    ------
    ValueError
        Naming the first tensor that is missing, unexpected, of another dtype or
        shape than ``config`` implies, or that holds NaN or infinite values.
    """
    expected = expected_state(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the weights do not match the configuration (missing {missing}, "
            f"unexpected {unexpected})"
        )
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if t.dtype != dtype:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}; the model needs {dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(t.shape)}; the configuration implies {shape}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} holds NaN or infinite values")
