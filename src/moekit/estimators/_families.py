"""The expert families ``MoERegressor(expert=...)`` accepts by name, and how a name,
a list of names (a family per expert) or an estimator becomes a family object."""

from __future__ import annotations

from moekit.experts.binomial import BinomialExperts
from moekit.experts.gamma import GammaExperts
from moekit.experts.gaussian import GaussianExperts
from moekit.experts.lognormal import LogNormalExperts
from moekit.experts.mixed import MixedExperts, check_family_list
from moekit.experts.mlp import MLPExperts
from moekit.experts.negative_binomial import NegativeBinomialExperts
from moekit.experts.poisson import PoissonExperts
from moekit.experts.student_t import StudentTExperts
from moekit.experts.weibull import WeibullExperts
from moekit.experts.wrapped import WrappedExperts
from moekit.experts.zero import ZeroExperts

EXPERTS = {
    "linear": GaussianExperts,
    "poisson": PoissonExperts,
    "student_t": StudentTExperts,
    "mlp": MLPExperts,
    "binomial": BinomialExperts,
    "gamma": GammaExperts,
    "lognormal": LogNormalExperts,
    "negative_binomial": NegativeBinomialExperts,
    "zero": ZeroExperts,
    "weibull": WeibullExperts,
}


def one_name(expert) -> str | None:
    """The family of every expert where there is one (a name, or a list of one name)."""
    if isinstance(expert, str):
        return expert
    if isinstance(expert, (list, tuple)) and len(set(expert)) == 1:
        return expert[0]
    return None


def expert_class(est):
    """The family's class (or, for a list of several families, an unsized family),
    which the target coding asks what targets it models."""
    expert = est.expert
    if isinstance(expert, (list, tuple)):
        names = check_family_list(expert, est.n_experts)
        if len(set(names)) > 1:
            return mixed_family(est, names, 1, 0)
        expert = names[0]
    if not isinstance(expert, str):
        return WrappedExperts
    return EXPERTS[expert]


def mixed_family(est, names: list[str], m: int, seed: int) -> MixedExperts:
    """A family per expert: one part per family named (each built as alone)."""
    parts = {
        name: named_family(est, name, names.count(name), m, seed) for name in dict.fromkeys(names)
    }
    return MixedExperts(names, parts)


def make_experts(est, m: int, seed: int):
    """The expert family of ``est`` (``expert``, ``n_experts``, ``reg_var``, ...)."""
    K = est.n_experts
    if isinstance(est.expert, (list, tuple)):
        names = check_family_list(est.expert, K)
        if est.fit_method != "em":
            raise ValueError(
                f"expert={names!r} (a family per expert) is fitted by EM only; got "
                f"fit_method={est.fit_method!r}."
            )
        if len(set(names)) > 1:
            if est.expert_options:
                raise ValueError("expert_options are for expert='mlp'.")
            return mixed_family(est, names, m, seed)
        return named_family(est, names[0], K, m, seed, alone=True)
    if not isinstance(est.expert, str):
        if est.expert_options:
            raise ValueError("expert_options are for expert='mlp'.")
        return WrappedExperts(est.expert, K, var_floor=est.reg_var)
    return named_family(est, est.expert, K, m, seed, alone=True)


def named_family(est, name: str, K: int, m: int, seed: int, alone: bool = False):
    """K experts of the family ``name``, with the estimator's settings."""
    family = EXPERTS[name]
    if family is MLPExperts:
        return MLPExperts(K, m, var_floor=est.reg_var, seed=seed, options=est.expert_options)
    if est.expert_options:
        raise ValueError(f"expert_options are for expert='mlp'; got expert={est.expert!r}.")
    if family is ZeroExperts:
        if alone:
            raise ValueError(
                "expert='zero' is a point mass at 0: it models zeros beside other experts, "
                "in a zero-inflated model; alone it fits only a target of zeros."
            )
        return ZeroExperts(K)
    if family is LogNormalExperts:
        return LogNormalExperts(K, var_floor=est.reg_var)
    if family in (
        PoissonExperts,
        GammaExperts,
        NegativeBinomialExperts,
        BinomialExperts,
        WeibullExperts,
    ):
        return family(K)
    if family is StudentTExperts:
        return StudentTExperts(K, m, var_floor=est.reg_var, df=est.df)
    return GaussianExperts(K, m, var_floor=est.reg_var)
