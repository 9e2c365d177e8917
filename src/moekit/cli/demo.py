"""``moekit demo``: a guided tour of three mixtures of experts, into one report.

A regression MoE on the motorcycle crash data (K chosen by BIC), an MoE classifier
on handwritten digits and a mixture density network on Bishop's inverse problem.
The command fits them, writes their figures and model files, and hands each
chapter's sections to :func:`moekit.report.tour_page`, which assembles the page.
"""

from __future__ import annotations

from pathlib import Path

from moekit.cli.fit import regression_report

DIGITS_STARTS = 2
"""Starts of the demo's digits classifier (the tour should take seconds, not minutes)."""

MDN_EPOCHS = 300
"""Most epochs of the demo's mixture density network."""


def cmd_demo(args) -> int:
    """The guided tour: a regression MoE, an MoE classifier and an MDN, one report."""
    import warnings

    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split

    from moekit import MDNRegressor, MoEClassifier, MoERegressor, select_n_experts
    from moekit.datasets import load_mcycle, make_bishop_inverse
    from moekit.plotting import plot_criterion, plot_regression_fit
    from moekit.report import mdn_sections, report_sections, tour_page

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = {}  # each chapter's sections of the page, by the chapter's id

    print("moekit demo: a guided tour of three mixtures of experts, into one report\n")
    print("1. Motorcycle crash data (mcycle): head acceleration against time")
    frame = load_mcycle(as_frame=True)
    X, y = frame[["times"]], frame["accel"]
    print(f"   MoERegressor with K = 2..6 experts, {args.n_init} starts each ...")
    template = MoERegressor(max_iter=1000, random_state=0)
    model, table = select_n_experts(template, X, y, range(2, 7), "bic", n_init=args.n_init)
    best_k = model.n_experts
    shown = table.drop(columns=["best", "converged"])
    print("   " + shown.to_string(index=False, float_format=lambda v: f"{v:.1f}")
          .replace("\n", "\n   "))  # fmt: skip
    print(f"   BIC picks K = {best_k}.\n")
    print(regression_report(model, X, y))
    fig = plot_regression_fit(
        model, X, y, xlabel="time after impact (ms)", ylabel="head acceleration (g)",
        title=f"Mixture of {best_k} linear experts (softmax gate), mcycle data",
    )  # fmt: skip
    fig.savefig(out / "mcycle_fit.png", dpi=120)
    plot_criterion(table, "bic").savefig(out / "mcycle_bic.png", dpi=120)
    model.save(out / "mcycle.moe")
    table.to_csv(out / "mcycle_bic.csv", index=False)
    sections["mcycle"] = report_sections(model, X, y, table=table, target="accel",
                                         source="mcycle (R's MASS)", prefix="mcycle_",
                                         level=3)  # fmt: skip

    print("\n2. Handwritten digits: an MoE classifier")
    Xd, yd = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(Xd, yd, test_size=0.25, random_state=0, stratify=yd)
    n_init = min(args.n_init, DIGITS_STARTS)
    clf = MoEClassifier(n_experts=3, n_init=n_init, random_state=0).fit(Xtr, ytr)
    print(f"   MoEClassifier, 3 experts, {n_init} starts: held-out accuracy "
          f"{clf.score(Xte, yte):.4f} on {len(yte)} images; {clf.n_iter_} EM iterations, "
          f"{'converged' if clf.converged_ else 'not converged'}")  # fmt: skip
    clf.save(out / "digits.moe")
    sections["digits"] = report_sections(clf, Xtr, ytr, X_test=Xte, y_test=yte, target="digit",
                                         source="scikit-learn's digits (UCI)", prefix="digits_",
                                         level=3)  # fmt: skip

    print("\n3. Bishop's inverse problem: a mixture density network")
    train = make_bishop_inverse(1000, random_state=0)
    test = make_bishop_inverse(1000, random_state=1)
    mdn = MDNRegressor(3, hidden_layer_sizes=(32, 32), learning_rate=1e-2, batch_size=250,
                       max_iter=MDN_EPOCHS, random_state=0)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the epoch budget is a choice
        mdn.fit(train.X, train.y)
    held_out = mdn.log_likelihood(test.X, test.y)
    print(f"   MDNRegressor, 3 components: held-out log-likelihood {held_out:.3f} per row "
          f"after {mdn.n_iter_} epochs")  # fmt: skip
    mdn.save(out / "bishop_mdn.moe")
    t = np.linspace(0.0, 1.0, 400)
    sections["bishop"] = mdn_sections(mdn, train.X, train.y, X_test=test.X, y_test=test.y,
                                      target="t", source="make_bishop_inverse(1000)",
                                      prefix="bishop_", level=3,
                                      truth=(train.forward(t)[:, 0], t))  # fmt: skip

    page = tour_page(sections)
    (out / "report.html").write_text(page, encoding="utf-8")
    print(f"\nWrote {out / 'report.html'} (open it in a browser), the figures and the three "
          "model files (mcycle.moe, digits.moe, bishop_mdn.moe).")  # fmt: skip
    return 0
