"""A small vision transformer with MoE blocks (V-MoE style) on scikit-learn's 8x8 digits
=====================================================================================

Each 8x8 image becomes 16 tokens of 2x2 pixels. As in V-MoE (Riquelme et al., 2021),
every other block's MLP is a sparse MoE layer (8 experts, top-2): each *patch* is
routed on its own. The dense twin has the same blocks with one MLP of width
``top_k * d_hidden``, so both spend the same compute per patch. Both are trained
with the same seed, batches and steps; the script prints their test accuracy over
a few seeds and draws, for each MoE layer of the first seed, which experts the
patches of each digit class go to.

Takes about three and a half minutes of one CPU core (three seeds, both models).

Run: ``python examples/vision_moe_digits.py [--out DIR] [--seeds N]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from moekit.nn import FeedForward, MoE

D_MODEL, D_HIDDEN, N_EXPERTS, TOP_K, N_BLOCKS, PATCH = 32, 32, 8, 2, 4, 2


class Block(nn.Module):
    """Pre-norm encoder block: every patch attends to every patch, then the MLP."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.attn = nn.MultiheadAttention(D_MODEL, num_heads=4, batch_first=True)
        self.mlp = (
            MoE(D_MODEL, D_HIDDEN, N_EXPERTS, TOP_K, z_loss_coef=1e-3)
            if sparse
            else FeedForward(D_MODEL, TOP_K * D_HIDDEN, "swiglu")  # the same active width
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]  # (B, P, C)
        return x + self.mlp(self.ln_2(x))  # (B, P, C)


class ViT(nn.Module):
    """Patches -> linear embedding + positions -> blocks -> mean pool -> 10 classes."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        n_patches = (8 // PATCH) ** 2
        self.embed = nn.Linear(PATCH * PATCH, D_MODEL)
        self.pos = nn.Parameter(torch.randn(n_patches, D_MODEL) * 0.02)
        # V-MoE: MoE in every other block, the last one included
        self.blocks = nn.ModuleList(Block(sparse and i % 2 == 1) for i in range(N_BLOCKS))
        self.ln = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, 10)

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    def forward(self, images: Tensor) -> Tensor:
        B = images.shape[0]
        p = images.view(B, 8 // PATCH, PATCH, 8 // PATCH, PATCH).transpose(2, 3)
        x = self.embed(p.reshape(B, -1, PATCH * PATCH)) + self.pos  # (B, P, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x).mean(dim=1))  # (B, 10)

    def aux_loss(self) -> Tensor:
        return sum((m.aux_loss for m in self.moe_layers()), torch.zeros(()))


def train(model: ViT, X: Tensor, y: Tensor, seed: int, epochs: int = 60) -> float:
    """AdamW with a cosine schedule; returns the seconds spent."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * ((len(X) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)  # the same batches for both models
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=gen).split(64):
            loss = F.cross_entropy(model(X[idx]), y[idx]) + model.aux_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - start


@torch.no_grad()
def class_routing(model: ViT, X: Tensor, y: Tensor) -> list[Tensor]:
    """Per MoE layer, (10, E): the share of each class's patch assignments per expert."""
    captured: list[Tensor] = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out: captured.append(out.indices))
             for m in model.moe_layers()]  # fmt: skip
    model.eval()(X)
    for h in hooks:
        h.remove()
    shares = []
    for indices in captured:  # (B * P, k), patches of image b together
        per_image = indices.view(len(X), -1)  # (B, P * k)
        counts = torch.zeros(10, N_EXPERTS)
        for c in range(10):
            counts[c] = torch.bincount(per_image[y == c].flatten(), minlength=N_EXPERTS)
        shares.append(counts / counts.sum(dim=1, keepdim=True))
    return shares


def figure(shares: list[Tensor], acc: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shares), figsize=(4.2 * len(shares), 4.2),
                             layout="constrained", squeeze=False)  # fmt: skip
    for i, (ax, share) in enumerate(zip(axes[0], shares, strict=True)):
        percent = 100 * share.numpy()
        im = ax.imshow(percent, cmap="viridis", vmin=0, vmax=max(50.0, float(percent.max())))
        ax.set_xticks(range(N_EXPERTS))
        ax.set_yticks(range(10))
        ax.set_xlabel("expert")
        ax.set_ylabel("digit class")
        ax.set_title(f"MoE layer {i} (block {2 * i + 1})")
        for c in range(10):
            for e in range(N_EXPERTS):
                v = float(percent[c, e])
                ax.text(e, c, f"{v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 30 else "black")  # fmt: skip
    label = "% of the class's patch assignments\n(2 per patch: 50 = every patch of the class)"
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=label)
    dense, moe = (statistics.fmean(acc[k]) for k in ("dense", "MoE"))
    fig.suptitle(f"Which experts the patches of each digit go to (test images, seed 0)\n"
                 f"test accuracy, mean of {len(acc['MoE'])} seeds: MoE {100 * moe:.1f}%, "
                 f"dense twin of the same active size {100 * dense:.1f}%")  # fmt: skip
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description="V-MoE-style digits example")
    parser.add_argument("--out", type=Path, default=Path("examples/output"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting
    digits = load_digits()
    X = torch.tensor(digits.images / 16.0, dtype=torch.float32)  # (n, 8, 8) in [0, 1]
    y = torch.tensor(digits.target)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    acc: dict[str, list[float]] = {"dense": [], "MoE": []}
    for seed in range(args.seeds):
        for name, sparse in (("dense", False), ("MoE", True)):
            torch.manual_seed(seed)
            model = ViT(sparse)
            seconds = train(model, Xtr, ytr, seed, args.epochs)
            with torch.no_grad():
                a = float((model.eval()(Xte).argmax(1) == yte).float().mean())
            acc[name].append(a)
            n_params = sum(p.numel() for p in model.parameters())
            print(f"seed {seed} {name:5s}: test accuracy {100 * a:.2f}% "
                  f"({n_params:,} parameters, {seconds:.0f} s)", flush=True)  # fmt: skip
            if sparse and seed == 0:
                shares = class_routing(model, Xte, yte)
    for name, values in acc.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:5s}: {100 * statistics.fmean(values):.2f}% +- {100 * spread:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    figure(shares, acc, args.out / "vision_moe_digits.png")
    print(f"Wrote {args.out / 'vision_moe_digits.png'}")


if __name__ == "__main__":
    main()
