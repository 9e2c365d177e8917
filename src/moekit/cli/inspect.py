"""``moekit inspect``: what a model file holds, without the data it was fitted on."""

from __future__ import annotations

from moekit.cli.errors import DataError


def cmd_inspect(args) -> int:
    from moekit import load

    try:
        model = load(args.model)
    except (ValueError, FileNotFoundError) as exc:
        raise DataError(f"moekit: error: {exc}") from None
    names = getattr(model, "feature_names_in_", None)
    print(f"{args.model}: a fitted {type(model).__name__}")
    settings = {k: v for k, v in model.get_params().items() if v is not None}
    for key in ("n_experts", "expert", "gate", "expert_features", "gate_features"):
        if key in settings:
            print(f"  {key}: {settings[key]}")
    if getattr(model, "formula_", None) is not None:
        print(f"  formula: {model.formula_}")
    n = model.n_features_in_
    print(f"  features ({n}): {', '.join(map(str, names)) if names is not None else 'unnamed'}")
    if hasattr(model, "classes_"):
        print(f"  classes: {', '.join(map(str, model.classes_))}")
    print(f"  fit: {model.n_iter_} EM iterations, "
          f"{'converged' if model.converged_ else 'not converged'}, mean log-likelihood "
          f"{model.log_likelihood_:.4f} per row")  # fmt: skip
    from moekit.report.describe import expert_shares, model_formula

    print(f"  experts' shares of the data: "
          f"{', '.join(f'{v:.3f}' for v in expert_shares(model))} (they sum to 1)")  # fmt: skip
    if not hasattr(model, "predict_proba") and hasattr(model, "expert_sizes_"):
        print("\n" + model_formula(model, target=_target(model)))
    return 0


def _target(model) -> str:
    formula = getattr(model, "formula_", None)
    return str(getattr(formula, "response", None) or "y")
