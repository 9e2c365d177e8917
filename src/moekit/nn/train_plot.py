"""The figure of a language-model training run: losses and the experts' loads."""

from __future__ import annotations

import torch

from moekit.nn.train_config import TrainLog

__all__ = ["plot_training"]


def plot_training(log: TrainLog | dict, title: str | None = None):
    """Training and held-out loss, the auxiliary loss, and each MoE layer's expert load.

    Left: the language-model loss (nats per byte, without auxiliary losses) per
    step and at each evaluation, and below it the auxiliary loss. Right, one panel per
    MoE layer: the share of the routed tokens each expert took between evaluations,
    stacked; even bands are a balanced layer.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt  # after expert_colors, which picks a headless backend

    from moekit.plotting import expert_colors

    log = log if isinstance(log, dict) else log.as_dict()
    loads = torch.tensor(log["tokens_per_expert"], dtype=torch.float64)  # (evals, L, E)
    n_layers = max(loads.shape[1] if loads.dim() == 3 else 0, 1)
    fig = plt.figure(figsize=(11, max(4.0, 1.8 * n_layers)), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.6, 1])
    ax, ax_aux = left.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot(log["step"], log["train_loss"], color="0.65", lw=0.8, label="train")
    ax.plot(log["eval_step"], log["val_loss"], "o-", color="tab:red", ms=3, label="held out")
    ax.set_ylabel("language-model loss\n(nats per byte)")
    ax.legend()
    ax.set_title(title or "training")
    ax_aux.plot(log["step"], log["aux_loss"], color="tab:blue", lw=0.8)
    ax_aux.set_ylabel("auxiliary loss")
    ax_aux.set_xlabel("step")
    axes = right.subplots(n_layers, 1, sharex=True, squeeze=False)[:, 0]
    if loads.dim() == 3 and loads.shape[1] > 0:
        share = loads / loads.sum(-1, keepdim=True).clamp_min(1.0)  # (evals, L, E)
        colors = expert_colors(share.shape[2])
        for layer, axl in enumerate(axes):
            axl.stackplot(log["eval_step"], share[:, layer].T.numpy(), colors=colors, lw=0)
            axl.set_ylim(0, 1)
            axl.set_ylabel(f"MoE layer {layer}")
        right.suptitle(f"share of the routed tokens per expert\n(experts 0-{share.shape[2] - 1}, "
                       "bottom to top)", fontsize="medium")  # fmt: skip
        axes[-1].set_xlabel("step")
    else:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no MoE layer", ha="center", va="center")
    return fig
