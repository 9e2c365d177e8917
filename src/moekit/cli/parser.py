"""The ``moekit`` command line: its subcommands, their flags and help.

Each subcommand's function comes from its own module, which imports its heavy
dependencies (pandas, PyTorch, scikit-learn) only when it runs: ``moekit --help``
starts in the time Python does.
"""

from __future__ import annotations

import argparse

from moekit.cli.demo import cmd_demo
from moekit.cli.fit import cmd_fit
from moekit.cli.inspect import cmd_inspect
from moekit.cli.lm import cmd_lm_generate, cmd_lm_train, cmd_lm_upcycle
from moekit.cli.predict import cmd_predict


def _names(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated column names")
    return names


def _experts(text: str) -> tuple[int, ...]:
    """'3' -> (3,); '1-8' -> (1, ..., 8)."""
    try:
        lo, _, hi = text.partition("-")
        ks = tuple(range(int(lo), int(hi) + 1)) if hi else (int(lo),)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or a range A-B, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers of experts, got {text!r}")
    return ks


class _Families(list):
    """The family names ``--expert`` takes; a comma-separated list of them (one family
    per expert, such as ``zero,poisson``) is among the choices too, and there ``zero``
    (a point mass at 0, which alone would model nothing) joins them."""

    def __contains__(self, value) -> bool:
        if not isinstance(value, list):
            return list.__contains__(self, value)
        return all(name == "zero" or list.__contains__(self, name) for name in value)


EXPERT_CHOICES = _Families(["linear", "poisson", "student_t", "mlp", "binomial", "gamma",
                            "lognormal", "weibull", "negative_binomial"])  # fmt: skip
"""The expert families ``moekit fit --expert`` takes (alone or as a comma-separated list)."""


def _expert_names(text: str) -> str | list[str]:
    """'poisson' -> 'poisson'; 'zero,poisson' -> ['zero', 'poisson'] (a family per expert)."""
    names = [c.strip() for c in text.split(",")]
    if len(names) == 1:
        return names[0]
    if "" in names:
        raise argparse.ArgumentTypeError(f"expected comma-separated families, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts models.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the whole traceback, not one line")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fit the bundled motorcycle data and write a report")
    p.add_argument("--out", default="moekit_demo", help="output folder (default: moekit_demo)")
    p.add_argument("--n-init", type=int, default=10, help="EM starts per K (default: 10)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fit", help="fit a mixture of experts to a CSV file")
    p.add_argument("data", help="CSV or Parquet file with a header row")
    p.add_argument("--target", type=_names, action="append",
                   help="name of the target column (or give --formula); for --expert binomial "
                        "two, successes and failures, comma-separated or the flag "
                        "repeated; for linear experts several, regressed together")  # fmt: skip
    p.add_argument("--formula",
                   help="Wilkinson formula of the target and the experts' terms, such as "
                        "\"y ~ x + I(x**2) + C(group)\"")  # fmt: skip
    p.add_argument("--gate-formula",
                   help="the gate's terms, such as \"~ z1 + z2\" (default: the experts'); "
                        "\"~ 1\" is a constant gate")  # fmt: skip
    p.add_argument(
        "--features",
        type=_names,
        help="comma-separated feature columns (default: every numeric column)",
    )
    p.add_argument(
        "--gate-features",
        type=_names,
        help="comma-separated columns the gate sees (default: the features)",
    )
    p.add_argument(
        "--experts",
        type=_experts,
        default=None,
        help="number of experts K, or a range such as 1-8 chosen by BIC (default: 1-4, "
        "chosen by BIC)",
    )
    p.add_argument(
        "--expert",
        choices=EXPERT_CHOICES,
        type=_expert_names,
        default="linear",
        metavar="FAMILY[,FAMILY...]",
        help="regression experts (default: linear): linear, robust (student_t), networks "
        "(mlp), counts (poisson, negative_binomial), positive amounts and survival times "
        "(gamma, lognormal, weibull), "
        "successes out of trials (binomial, with two --target columns) or a point mass at 0 "
        "(zero); a comma-separated list gives a family per expert and fixes K (zero,poisson: "
        "a zero-inflated Poisson)",
    )
    p.add_argument("--weights", metavar="COLUMN",
                   help="frequency weights: a row of weight 3 counts as three rows (not a "
                        "feature)")  # fmt: skip
    p.add_argument("--offset", metavar="EXPR",
                   help="a known term of the experts' linear predictor, such as "
                        "\"log(hours)\" (log exposure of counts): a column or an expression "
                        "of columns; or offset(...) in --formula")  # fmt: skip
    p.add_argument("--censored-above", metavar="COLUMN",
                   help="each response's upper bound: equal to the target for an exact "
                        "response, empty or inf for one right-censored at the target")  # fmt: skip
    p.add_argument("--event", metavar="COLUMN",
                   help="R's Surv(time, event) form of --censored-above: 1 where the target "
                        "was observed, 0 where it is right-censored")  # fmt: skip
    p.add_argument("--covariance-type", choices=["full", "tied", "diag", "spherical"],
                   help="with several --target columns and linear experts: each expert's "
                        "noise covariance (default: diag)")  # fmt: skip
    p.add_argument(
        "--gate",
        choices=["softmax", "constant", "mlp"],
        default="softmax",
        help="softmax (default), constant (a mixture of regressions) or mlp",
    )
    p.add_argument("--task", choices=["auto", "regression", "classification"], default="auto",
                   help="auto (default): a text or boolean target, or a numeric one of two "
                        "values, is a classification; any other numeric target a "
                        "regression")  # fmt: skip
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of rows held out for the report's checks; the model is fitted "
                        "on the rest (0: fit on every row; default: 0.2)")  # fmt: skip
    p.add_argument("--n-init", type=int, default=5, help="EM starts (default: 5)")
    p.add_argument("--max-iter", type=int, default=None,
                   help="most EM iterations per start (default: the estimator's, 200)")  # fmt: skip
    p.add_argument("--random-state", type=int, default=0)
    p.add_argument("--verbose", type=int, default=None,
                   help="0: quiet; 1: a progress bar per fit (default where stderr is a "
                        "terminal); 2: a line every few EM iterations too")  # fmt: skip
    p.add_argument("--out", default="moekit_fit", help="output folder (default: moekit_fit)")
    p.add_argument("--no-report", action="store_true",
                   help="write the model and report.txt only: no report.html and no figures "
                        "(quicker; matplotlib is not loaded)")  # fmt: skip
    p.set_defaults(func=cmd_fit)

    lm = sub.add_parser("lm", help="a small MoE transformer language model").add_subparsers(
        dest="lm_command", required=True)  # fmt: skip
    p = lm.add_parser("train", help="train a byte-level MoE language model")
    p.add_argument("--corpus", help="UTF-8 text file (default: two bundled Jane Austen novels)")
    p.add_argument("--config", choices=["tiny", "small"], default="tiny",
                   help="model and training preset (default: tiny)")  # fmt: skip
    p.add_argument("--steps", type=int, help="optimiser steps (default: the preset's)")
    p.add_argument("--out", default="moekit_lm", help="output folder (default: moekit_lm)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.safetensors, with its settings")  # fmt: skip
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--n-experts", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--router")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_lm_train)
    p = lm.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("checkpoint", help="checkpoint.safetensors or lm.moe from `moekit lm train`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokens", "--max-new-tokens", type=int, default=200,
                   help="bytes to generate (default: 200)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_lm_generate)
    p = lm.add_parser("upcycle", help="turn a dense language model into an equal MoE one")
    p.add_argument("checkpoint", help="a dense model's checkpoint.safetensors or .moe file")
    p.add_argument("--n-experts", type=int, default=8, help="experts per block (default: 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    p.add_argument("--granularity", type=int, default=1,
                   help="slices of the dense hidden layer per copy (default: 1)")  # fmt: skip
    p.add_argument("--noise", type=float, default=0.0,
                   help="relative noise on the experts, to break their symmetry")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output file (default: lm_upcycled.moe beside CHECKPOINT)")
    p.set_defaults(func=cmd_lm_upcycle)

    p = sub.add_parser("predict", help="predict with a saved model")
    p.add_argument("model", help="model file written by `moekit fit` or model.save()")
    p.add_argument("data", help="CSV file with the model's feature columns")
    p.add_argument("--out", help="output CSV (default: standard output)")
    p.add_argument("--interval", type=float, default=0.9,
                   help="central probability of the interval (default: 0.9)")  # fmt: skip
    p.add_argument("--samples", type=int, default=0,
                   help="also draw this many values of y per row from p(y|x)")  # fmt: skip
    p.add_argument("--random-state", type=int, default=0, help="seed of --samples")
    p.add_argument("--offset", metavar="EXPR",
                   help="the offset of a model fitted with --offset, on these rows")  # fmt: skip
    p.add_argument("--trials", metavar="COLUMN",
                   help="for a binomial model: each row's number of trials, for the "
                        "successes' mean, sd and interval (default: the sum of the model's "
                        "successes and failures columns, where the table has them)")  # fmt: skip
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("inspect", help="say what a model file holds")
    p.add_argument("model", help="model file written by `moekit fit` or model.save()")
    p.set_defaults(func=cmd_inspect)
    return parser
