"""A two-link robot arm: which joint angles put the hand at a target point?
========================================================================

The forward map (angles to hand position) is easy; its inverse has two answers for
most points, elbow up and elbow down. A mixture density network learns the
density of the angles given the hand position. Angles sampled from it reach the
target; the mean of the two answers (what a least-squares regressor predicts) is
a half-bent arm that points somewhere else.

The script fits the MDN, prints how far the sampled and the mean angles put the
hand from held-out targets, and draws, for one target, sampled arm
configurations beside the predictive density of the angles with its modes.

Run: ``python examples/inverse_robot_arm.py [--out examples/output/]``
"""

import argparse
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning

from moekit import MDNRegressor, MixturePrediction
from moekit.datasets import make_robot_arm


def joints(prob, angles):
    """Shoulder, elbow and hand positions for angles (n, 2): shape (n, 3, 2)."""
    l1 = prob.forward.l1
    t1 = angles[:, 0]
    elbow = np.stack([l1 * np.cos(t1), l1 * np.sin(t1)], axis=1)
    return np.stack([np.zeros_like(elbow), elbow, prob.forward(angles)], axis=1)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train = make_robot_arm(5000, random_state=0)
    test = make_robot_arm(500, random_state=1)
    mdn = MDNRegressor(
        3, hidden_layer_sizes=(64, 64), activation="relu", learning_rate=3e-3, random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mdn.fit(train.X, train.y)
    print(f"trained {mdn.n_iter_} epochs; held-out log-likelihood "
          f"{mdn.log_likelihood(test.X, test.y):.3f} nats per sample")  # fmt: skip

    samples = mdn.predict_distribution(test.X).sample(50, random_state=0)  # (n, 50, 2)
    reached = train.forward(samples.reshape(-1, 2)).reshape(samples.shape)
    err_samples = np.linalg.norm(reached - test.X[:, None], axis=2)
    err_mean = np.linalg.norm(train.forward(mdn.predict(test.X)) - test.X, axis=1)
    print(f"median distance from the target: sampled angles {np.median(err_samples):.3f}, "
          f"mean angles {np.median(err_mean):.3f} (noise sd {train.noise})")  # fmt: skip

    target = np.array([[0.3, 0.9]])
    d = mdn.predict_distribution(target)
    arm_samples = d.sample(40, random_state=1)[0]  # (40, 2)
    mean_angles = d.mean()

    fig, (ax_arm, ax_dens, ax_ray) = plt.subplots(1, 3, figsize=(18, 5.5), constrained_layout=True)
    ax_arm.scatter(*train.X[:1500].T, s=2, color="0.85", label="hand positions in the data")
    for s, pts in zip(arm_samples, joints(train, arm_samples), strict=True):
        color = "tab:blue" if s[1] > 0 else "tab:orange"
        ax_arm.plot(*pts.T, "-o", color=color, alpha=0.35, ms=3, lw=2)
    ax_arm.plot([], [], color="tab:blue", lw=2, label="sampled, elbow up (theta2 > 0)")
    ax_arm.plot([], [], color="tab:orange", lw=2, label="sampled, elbow down (theta2 < 0)")
    ax_arm.plot(*joints(train, mean_angles)[0].T, "--o", color="red", lw=2,
                label="mean prediction E[theta | h]")  # fmt: skip
    ax_arm.scatter(*target.T, marker="*", s=250, color="black", zorder=5, label="target")
    ax_arm.set_aspect("equal")
    ax_arm.set_title("Arm configurations for one target")
    ax_arm.legend(loc="lower left", fontsize=8)

    t1 = np.linspace(-0.3, np.pi + 0.3, 200)
    t2 = np.linspace(-np.pi, np.pi, 200)
    g1, g2 = np.meshgrid(t1, t2)
    grid = np.stack([g1.ravel(), g2.ravel()], axis=1)
    # log scale: the two peaks are a hundredth of a radian wide
    logd = np.log(d[np.zeros(len(grid), dtype=int)].pdf(grid) + 1e-300).reshape(g1.shape)
    mesh = ax_dens.pcolormesh(t1, t2, logd, shading="auto", cmap="magma",
                              vmin=logd.max() - 25, vmax=logd.max())  # fmt: skip
    fig.colorbar(mesh, ax=ax_dens, label="log p(theta | h = target)")
    modes, dens_at = d.modes(return_density=True)[0]
    modes = modes[dens_at >= 0.02 * dens_at.max()]
    ax_dens.scatter(*modes.T, s=80, facecolor="none", edgecolor="white", lw=2,
                    label="modes of the predictive density")  # fmt: skip
    exact = train.forward.solutions(target)[0]
    ax_dens.scatter(*exact.T, marker="x", s=40, color="cyan", label="exact solutions")
    ax_dens.scatter(*mean_angles.T, marker="s", s=50, color="red", label="mean prediction")
    ax_dens.set_xlabel("theta1 (shoulder)")
    ax_dens.set_ylabel("theta2 (elbow)")
    ax_dens.set_title("Predictive density of the angles at the target")
    ax_dens.legend(loc="lower left", fontsize=8)

    # the elbow angle's marginal density along a ray of targets, from near to far
    r = np.linspace(0.25, 1.38, 200)
    ray = np.stack([r * np.cos(1.25), r * np.sin(1.25)], axis=1)
    dr = mdn.predict_distribution(ray)
    elbow = MixturePrediction(dr.weights, dr.means[..., 1], dr.stds[..., 1])
    t2s = np.linspace(-np.pi, np.pi, 300)
    dens = np.stack([elbow.pdf(np.full(len(r), v)) for v in t2s])
    mesh = ax_ray.pcolormesh(r, t2s, dens, shading="auto", cmap="magma",
                             vmax=np.quantile(dens, 0.995))  # fmt: skip
    fig.colorbar(mesh, ax=ax_ray, label="p(theta2 | h)")
    truth = train.forward.solutions(ray)[..., 1]  # (n, 2): +/- the elbow angle
    ax_ray.plot(r, truth, color="cyan", ls=":", lw=1)
    ax_ray.plot(r, elbow.mean(), color="lime", ls="--", lw=1.5, label="mean E[theta2 | h]")
    ax_ray.plot([], [], color="cyan", ls=":", label="exact elbow up / down")
    ax_ray.set_xlabel("distance of the target from the shoulder (along a ray at 72 degrees)")
    ax_ray.set_ylabel("theta2 (elbow)")
    ax_ray.set_title("Elbow angle over targets: two branches, the mean between them")
    ax_ray.legend(loc="lower left", fontsize=8)
    path = out / "inverse_robot_arm.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "moekit example").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/output"),
                        help="folder for the figure (default: examples/output/)")  # fmt: skip
    main(parser.parse_args().out)
