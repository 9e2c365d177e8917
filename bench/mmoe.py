"""The MMoE paper's synthetic experiment: shared-bottom vs one-gate MoE vs MMoE.

    python bench/mmoe.py             # writes bench/results/mmoe.md and mmoe.png

Ma et al. (KDD 2018, section 4) train three multi-task models on two regression tasks
whose relatedness they control, and find that MMoE suffers least when the tasks are
less related (their Figure 4, 200 runs per setting). Here, on one CPU thread:

- Data: :func:`moekit.datasets.make_multitask_regression` with the paper's settings,
  d = 100, c = 1, m = 10 sines, alpha_i, beta_i ~ N(0, 1), noise N(0, 0.01) (read as a
  variance). What is set is the cosine p of the two weight vectors (0.5, 0.9, 1.0);
  the labels' Pearson correlation it gives is reported beside it, exact (closed form)
  and measured on the training labels. Seed ``s`` draws the same directions, sines and
  inputs at every p, so the correlations are compared on common random numbers.
- Models of the paper's sizes, with parameter counts made equal within 0.5% (each
  count includes every weight, bias and gate): MMoE, 8 experts of one ReLU layer of 16
  units and one bias-free softmax gate per task; one-gate MoE (OMoE), 8 experts of 17
  units, which pays for the gate it lacks; shared-bottom, one ReLU layer of 126 units.
  Every model has one tower per task with one hidden layer of 8 units.
- Training: Adam, the same learning rate, steps and mini-batches (rows drawn with
  replacement) for all three models; the loss is the mean over the two tasks of the
  mean squared error, and the test loss the same on held-out rows of the same tasks.
  Every seed's models start from ``torch.manual_seed(seed)``.

Many seeds are trained at once: the models of one kind for a chunk of seeds are stacked
with :func:`torch.func.stack_module_state` and run under :func:`torch.vmap`, each seed
on its own data. The loss is the sum over seeds of each seed's loss, so each seed gets
its own gradient, and Adam is elementwise, so the stacked run is exactly independent
runs (checked at start-up against two models trained one by one).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, stack_module_state

from moekit.datasets import make_multitask_regression
from moekit.nn import MultiGateMoE, SharedBottom

RESULTS = Path(__file__).resolve().parent / "results"
CORRELATIONS = (0.5, 0.9, 1.0)
D_IN = 100

MODELS = {
    "shared-bottom": lambda: SharedBottom(D_IN, 126, 2, tower_hidden=8),
    "OMoE": lambda: MultiGateMoE(D_IN, 8, 2, 17, tower_hidden=8, n_gates=1),
    "MMoE": lambda: MultiGateMoE(D_IN, 8, 2, 16, tower_hidden=8),
}
COLOURS = {"shared-bottom": "tab:gray", "OMoE": "tab:blue", "MMoE": "tab:red"}


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_data(seeds, p: float, n_train: int, n_test: int) -> dict:
    """Training and test rows of every seed, stacked: X (S, n, d), y (S, n, 2)."""
    out = {"X": [], "y": [], "X_test": [], "y_test": [], "exact": [], "sampled": []}
    for s in seeds:
        X, y, truth = make_multitask_regression(n_train, D_IN, p, random_state=s)
        X_test, y_test = truth.sample(n_test, random_state=1_000_000 + s)
        out["X"].append(X)
        out["y"].append(y)
        out["X_test"].append(X_test)
        out["y_test"].append(y_test)
        out["exact"].append(truth.label_correlation())
        out["sampled"].append(np.corrcoef(y.T)[0, 1])
    arrays = ("X", "y", "X_test", "y_test")
    data = {k: torch.tensor(np.stack(out[k]), dtype=torch.float32) for k in arrays}
    return {**data, "exact": np.array(out["exact"]), "sampled": np.array(out["sampled"])}


class Stack:
    """``len(seeds)`` models of one kind, stacked, trained together under vmap."""

    def __init__(self, make, seeds) -> None:
        models = []
        for s in seeds:
            torch.manual_seed(s)
            models.append(make())
        self.base = models[0]
        self.params, self.buffers = stack_module_state(models)
        self.opt_params = list(self.params.values())

    def _one(self, params, buffers, x):
        return torch.cat(functional_call(self.base, (params, buffers), (x,)), dim=-1)  # (B, 2)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """X (S, B, d) -> predictions (S, B, 2), seed s by model s."""
        return torch.vmap(self._one)(self.params, self.buffers, X)

    def loss(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-seed loss (S,): the mean over tasks of the mean squared error."""
        return (self.predict(X) - y).pow(2).mean(dim=(1, 2))

    def model(self, i: int) -> torch.nn.Module:
        """Seed ``i``'s trained model as an ordinary module."""
        model = copy.deepcopy(self.base)
        model.load_state_dict({k: v[i].detach() for k, v in self.params.items()})
        return model


def train(stack: Stack, data: dict, args, rng_seed: int) -> tuple[np.ndarray, float]:
    """Adam on the same batches for every model kind; returns the test curve (E, S)."""
    opt = torch.optim.Adam(stack.opt_params, lr=args.lr)
    gen = torch.Generator().manual_seed(rng_seed)  # the same batches for every model kind
    X, y = data["X"], data["y"]
    curve = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, X.shape[1], (args.batch_size,), generator=gen)
        loss = stack.loss(X[:, idx], y[:, idx]).sum()  # seeds independent: sum of losses
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                curve.append(stack.loss(data["X_test"], data["y_test"]).numpy())
    return np.array(curve), time.perf_counter() - start


def check_stacked_equals_separate() -> float:
    """Two seeds trained stacked agree with the same two trained one by one."""
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(2, 64, D_IN, generator=gen), torch.randn(2, 64, 2, generator=gen)
    stack = Stack(MODELS["MMoE"], [0, 1])
    opt = torch.optim.Adam(stack.opt_params, lr=3e-3)
    for _ in range(5):
        opt.zero_grad()
        stack.loss(X, y).sum().backward()
        opt.step()
    worst = 0.0
    for i in range(2):
        torch.manual_seed(i)
        model = MODELS["MMoE"]()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(5):
            opt.zero_grad()
            (torch.cat(model(X[i]), -1) - y[i]).pow(2).mean().backward()
            opt.step()
        for name, p in model.named_parameters():
            worst = max(worst, float((p - stack.params[name][i]).detach().abs().max()))
    assert worst < 1e-5, f"stacked training differs from separate training by {worst}"
    return worst


def gate_use(stack: Stack, data: dict) -> dict:
    """How differently MMoE's two gates use the experts on the test rows, per seed.

    ``tv_rows``: total variation between the two tasks' gate weights, per input, then
    averaged (0: the gates agree on every input; 1: no expert in common).
    ``tv_mean``: the same between the tasks' mean expert use,
    ``stats.task_expert_weights``. ``n_eff``: exp(entropy) of each task's mean use,
    averaged over tasks (1 to 8 experts).
    """
    tv_rows, tv_mean, n_eff = [], [], []
    with torch.no_grad():
        for i in range(data["X_test"].shape[0]):
            model = stack.model(i)
            x = data["X_test"][i]
            model(x)
            use = model.stats.task_expert_weights  # (2, E)
            gates = model.gate_weights(x)  # (2, n, E)
            tv_rows.append(float(0.5 * (gates[0] - gates[1]).abs().sum(-1).mean()))
            tv_mean.append(float(0.5 * (use[0] - use[1]).abs().sum()))
            entropy = -(use * use.clamp_min(1e-12).log()).sum(-1)
            n_eff.append(float(entropy.exp().mean()))
    return {"tv_rows": np.array(tv_rows), "tv_mean": np.array(tv_mean), "n_eff": np.array(n_eff)}


def run(args) -> dict:
    seeds = list(range(args.seeds))
    chunks = [seeds[i : i + args.chunk] for i in range(0, len(seeds), args.chunk)]
    out: dict = {"curves": {}, "seconds": {}, "labels": {}, "gates": {}}
    for p in CORRELATIONS:
        curves = {name: [] for name in MODELS}
        labels, gates = {"exact": [], "sampled": []}, []
        for chunk in chunks:
            data = make_data(chunk, p, args.n_train, args.n_test)
            labels["exact"].append(data["exact"])
            labels["sampled"].append(data["sampled"])
            for name, make in MODELS.items():
                stack = Stack(make, chunk)
                curve, seconds = train(stack, data, args, rng_seed=chunk[0])
                curves[name].append(curve)
                out["seconds"][name] = out["seconds"].get(name, 0.0) + seconds
                if name == "MMoE":
                    gates.append(gate_use(stack, data))
            last = {n: float(np.concatenate([c[-1] for c in curves[n]]).mean()) for n in MODELS}
            print(f"p={p} seeds {chunk[0]}-{chunk[-1]}: " + ", ".join(
                f"{n} {v:.4f}" for n, v in last.items()), flush=True)  # fmt: skip
        out["curves"][p] = {n: np.concatenate(c, axis=1) for n, c in curves.items()}  # (E, S)
        out["labels"][p] = {k: np.concatenate(v) for k, v in labels.items()}
        out["gates"][p] = {k: np.concatenate([g[k] for g in gates]) for k in gates[0]}
    out["eval_steps"] = [
        s for s in range(1, args.steps + 1) if s % args.eval_every == 0 or s == args.steps
    ]
    return out


def mean_se(a: np.ndarray) -> tuple[float, float]:
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0


def fmt(a: np.ndarray, digits: int = 4) -> str:
    m, se = mean_se(a)
    return f"{m:.{digits}f} ± {se:.{digits}f}"


def render(res: dict, args, counts: dict, load_before, load_after, check: float) -> str:
    load = " / ".join(f"{x:.2f}" for x in load_before)
    load_end = " / ".join(f"{x:.2f}" for x in load_after)
    total = sum(res["seconds"].values())
    final = {p: {n: c[-1] for n, c in res["curves"][p].items()} for p in CORRELATIONS}
    lines = [
        "# MMoE vs one-gate MoE vs shared-bottom on the MMoE paper's synthetic tasks (CPU)",
        "",
        f"torch {torch.__version__}, 1 thread, float32, {platform.machine()}. "
        f"Load average (1/5/15 min) before: {load}; after: {load_end} (a shared machine; "
        "the run adds about 1 itself).",
        "",
        f"{args.seeds} seeds per correlation (the paper used 200), each with its own tasks, "
        f"{args.n_train:,} training rows and {args.n_test:,} test rows; d = {D_IN}, c = 1, "
        "m = 10 sines, label noise N(0, 0.01) read as a variance. "
        f"Adam, learning rate {args.lr}, {args.steps} steps of {args.batch_size} rows "
        f"({args.steps * args.batch_size / args.n_train:.0f} passes over the training rows), "
        "the same batches for the three models of a seed. Loss: the mean over the two tasks "
        "of the mean squared error (the noise alone gives 0.01). "
        f"Training time, all seeds and correlations: {total:.0f} s "
        f"({', '.join(f'{n} {s:.0f} s' for n, s in res['seconds'].items())}); stacked "
        f"training matched separate training to {check:.1e}.",
        "",
        "| model | parameters | architecture |",
        "|---|---:|---|",
        f"| shared-bottom | {counts['shared-bottom']:,} | ReLU layer of 126, towers 126-8-1 |",
        f"| OMoE | {counts['OMoE']:,} | 8 experts of 17, one softmax gate, towers 17-8-1 |",
        f"| MMoE | {counts['MMoE']:,} | 8 experts of 16, a softmax gate per task, towers 16-8-1 |",
        "",
        "## Label correlation",
        "",
        "p sets the cosine of the two weight vectors; the labels' Pearson correlation follows "
        "(mean ± sd over seeds; exact: the closed form of `MultiTaskTruth.label_correlation`, "
        "sampled: on the training labels).",
        "",
        "| p | exact | sampled |",
        "|---:|---:|---:|",
    ]
    for p in CORRELATIONS:
        lab = res["labels"][p]
        lines.append(
            f"| {p} | {lab['exact'].mean():.3f} ± {lab['exact'].std(ddof=1):.3f} "
            f"| {lab['sampled'].mean():.3f} ± {lab['sampled'].std(ddof=1):.3f} |"
        )
    lines += [
        "",
        f"## Final test loss after {args.steps} steps (mean ± standard error over seeds)",
        "",
        "| p | shared-bottom | OMoE | MMoE | median SB / OMoE / MMoE | 90th percentile "
        "SB / OMoE / MMoE |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in CORRELATIONS:
        f = final[p]
        med = " / ".join(f"{np.median(f[n]):.4f}" for n in MODELS)
        q90 = " / ".join(f"{np.quantile(f[n], 0.9):.4f}" for n in MODELS)
        lines.append(
            f"| {p} | {fmt(f['shared-bottom'])} | {fmt(f['OMoE'])} | {fmt(f['MMoE'])} "
            f"| {med} | {q90} |"
        )
    lines += [
        "",
        "## MMoE's advantage, seed by seed",
        "",
        "Baseline loss minus MMoE loss on the same seed (positive: MMoE better), mean ± "
        "standard error, and the share of seeds where MMoE was better. The last row is the "
        "advantage at p = 0.5 minus that at p = 1.0, seed by seed: positive means the "
        "advantage grows as the tasks become less related.",
        "",
        "| p | SB - MMoE | MMoE better than SB | OMoE - MMoE | MMoE better than OMoE |",
        "|---:|---:|---:|---:|---:|",
    ]
    adv = {}
    for p in CORRELATIONS:
        f = final[p]
        adv[p] = {b: f[b] - f["MMoE"] for b in ("shared-bottom", "OMoE")}
        sb, om = adv[p]["shared-bottom"], adv[p]["OMoE"]
        lines.append(
            f"| {p} | {fmt(sb)} | {np.mean(sb > 0):.0%} | {fmt(om)} | {np.mean(om > 0):.0%} |"
        )
    grow = {b: adv[0.5][b] - adv[1.0][b] for b in ("shared-bottom", "OMoE")}
    lines.append(f"| 0.5 minus 1.0 | {fmt(grow['shared-bottom'])} | | {fmt(grow['OMoE'])} | |")
    steps = res["eval_steps"]
    mid = min(range(len(steps)), key=lambda i: abs(steps[i] - args.steps // 4))
    lines += [
        "",
        "The same advantages during training (the curves of the figure): "
        f"at step {steps[mid]} (a quarter of the run) and averaged over all "
        f"{len(steps)} evaluations (every {args.eval_every} steps; the area under the "
        "test-loss curve divided by its length).",
        "",
        f"| p | SB - MMoE, step {steps[mid]} | OMoE - MMoE, step {steps[mid]} "
        "| SB - MMoE, curve mean | OMoE - MMoE, curve mean |",
        "|---:|---:|---:|---:|---:|",
    ]
    during = {}
    for p in CORRELATIONS:
        c = res["curves"][p]
        during[p] = {
            (b, k): (c[b][mid] - c["MMoE"][mid]) if k == "mid" else (c[b] - c["MMoE"]).mean(0)
            for b in ("shared-bottom", "OMoE")
            for k in ("mid", "mean")
        }
        d = during[p]
        lines.append(
            f"| {p} | {fmt(d['shared-bottom', 'mid'])} | {fmt(d['OMoE', 'mid'])} "
            f"| {fmt(d['shared-bottom', 'mean'])} | {fmt(d['OMoE', 'mean'])} |"
        )
    g = {key: during[0.5][key] - during[1.0][key] for key in during[0.5]}
    lines.append(
        f"| 0.5 minus 1.0 | {fmt(g['shared-bottom', 'mid'])} | {fmt(g['OMoE', 'mid'])} "
        f"| {fmt(g['shared-bottom', 'mean'])} | {fmt(g['OMoE', 'mean'])} |"
    )
    lines += [
        "",
        "## How differently MMoE's two gates use the experts (test rows, after training)",
        "",
        "Total variation between the two tasks' gate weights, per input then averaged; the "
        "same between their mean expert use (`stats.task_expert_weights`); and the effective "
        "number of experts each task uses, exp(entropy) of its mean use (of 8). "
        "Mean ± standard error over seeds.",
        "",
        "| p | TV per input | TV of mean use | effective experts per task |",
        "|---:|---:|---:|---:|",
    ]
    for p in CORRELATIONS:
        g = res["gates"][p]
        lines.append(
            f"| {p} | {fmt(g['tv_rows'], 3)} | {fmt(g['tv_mean'], 3)} | {fmt(g['n_eff'], 2)} |"
        )
    lines += ["", "Figure: `mmoe.png`, test loss against training step, mean over seeds.", ""]
    return "\n".join(lines)


def figure(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = res["eval_steps"]
    fig, axes = plt.subplots(1, len(CORRELATIONS), figsize=(12, 3.8), sharey=True)
    for ax, p in zip(axes, CORRELATIONS, strict=True):
        for name, curve in res["curves"][p].items():
            mean = curve.mean(axis=1)
            se = curve.std(axis=1, ddof=1) / math.sqrt(curve.shape[1])
            ax.plot(steps, mean, label=name, color=COLOURS[name])
            ax.fill_between(steps, mean - se, mean + se, color=COLOURS[name], alpha=0.2)
        rho = res["labels"][p]["exact"].mean()
        ax.set_title(f"p = {p} (label correlation {rho:.2f})")
        ax.set_xlabel("training step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test loss (mean MSE over tasks)")
    axes[0].legend()
    n = res["curves"][CORRELATIONS[0]]["MMoE"].shape[1]
    fig.suptitle(f"Synthetic tasks of Ma et al. (2018): mean over {n} seeds, band ± 1 s.e.")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=25, help="seeds trained together")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = {name: n_parameters(make()) for name, make in MODELS.items()}
    print("parameters:", counts, flush=True)
    check = check_stacked_equals_separate()
    load_before = os.getloadavg()
    res = run(args)
    load_after = os.getloadavg()
    text = render(res, args, counts, load_before, load_after, check)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mmoe.md").write_text(text)
    figure(res, args.out / "mmoe.png")
    print(text)


if __name__ == "__main__":
    main()
