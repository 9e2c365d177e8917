"""A family per expert: experts of several families in one mixture.

``MoERegressor(2, expert=["zero", "poisson"])`` is a zero-inflated Poisson
regression whose gate models where the zeros come from; ``["gamma", "lognormal"]``
mixes two models of positive amounts. The mixture is still

.. math::  p(y \\mid x) = \\sum_k g_k(x)\\, p_k(y \\mid x; \\theta_k),

with p_k of expert k's own family, and EM is unchanged: the E-step needs every
expert's log-density, the M-step of each family sees only the responsibilities of
its own experts, and Q is the sum of the families' parts, so every part's step not
lowering its own part of Q does not lower Q.

:class:`MixedExperts` holds one part per family named, vectorised over that family's
experts wherever they sit in the list. Its parameters store, for every field of
every part, a row for each of the K experts (flat fields ``<family>__<field>``) and a
code per expert, ``family`` (the index of its part): so every field is indexed by
expert first, as the EM loop, the starts, pruning and model files expect, and
selecting experts (a split, a removal) carries each expert's family with it. The
rows of an expert in the other parts are not used (copies of a used row, so that
they stay valid values) and count for nothing: not in the likelihood, the number
of parameters or the report.
"""

from __future__ import annotations

import copy
from dataclasses import make_dataclass

import torch

from moekit._core.data import Chunk, EMData
from moekit._core.reporting import Report, Scaling

#: which families may share one list: those that model the same kind of target
TARGET_KINDS = {
    "poisson": "counts", "negative_binomial": "counts", "zero": "counts",
    "gamma": "positive amounts", "lognormal": "positive amounts", "weibull": "positive amounts",
}  # fmt: skip
_PARAM_TYPES: dict[tuple[str, ...], type] = {}


def check_family_list(names, n_experts) -> list[str]:
    """The list ``expert=names`` as a list of str, or a ValueError naming ``expert``."""
    names = list(names)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"expert must be a family name or a list of them; got {names!r}.")
    if n_experts is not None and len(names) != n_experts:
        raise ValueError(
            f"expert lists {len(names)} families but n_experts={n_experts}: give one "
            "family per expert."
        )
    if len(set(names)) == 1:
        return names
    unknown = sorted({n for n in names if n not in TARGET_KINDS})
    if unknown:
        raise ValueError(
            f"expert={names!r}: {unknown} cannot share a list with other families; a list "
            f"mixes families of one kind of target: {_kinds()}."
        )
    kinds = {TARGET_KINDS[n] for n in names}
    if len(kinds) > 1:
        raise ValueError(
            f"expert={names!r} mixes families of different targets ({', '.join(sorted(kinds))}); "
            f"a list mixes families of one kind of target: {_kinds()}."
        )
    if set(names) == {"zero"}:  # pragma: no cover - caught above as one name
        raise ValueError("expert lists only 'zero'.")
    return names


def _kinds() -> str:
    by_kind: dict[str, list[str]] = {}
    for name, kind in TARGET_KINDS.items():
        by_kind.setdefault(kind, []).append(name)
    return "; ".join(f"{kind} ({', '.join(v)})" for kind, v in by_kind.items())


def _params_type(fields: tuple[str, ...]) -> type:
    """One dataclass per set of flat field names (the same class for the same parts)."""
    if fields not in _PARAM_TYPES:
        _PARAM_TYPES[fields] = make_dataclass("MixedParams", [(f, torch.Tensor) for f in fields])
    return _PARAM_TYPES[fields]


class MixedExperts:
    """K experts of several families, one part per family (see the module docstring).

    Parameters
    ----------
    names : list of str
        The family of each expert, K of them, or None for a family resized without
        knowing its experts' families (they come with the parameters then).
    parts : dict of str to family
        One family object per name, any size (they are resized to their experts).
    """

    needs_resp = False
    standardize_target = False
    predictive_family = "mixed"
    #: a fit with one expert fewer is not nested in this one (which family goes?),
    #: so the starts split none and grow none
    nested_by_size = False

    def __init__(self, names: list[str] | None, parts: dict) -> None:
        self.names = None if names is None else list(names)
        self.parts = dict(parts)
        self.order = list(self.parts)  # the code of a family is its index here
        self.n_experts = len(self.names) if names is not None else 0
        any_part = next(iter(self.parts.values()))
        self.target_columns = getattr(any_part, "target_columns", 1)
        self.monotone = all(p.monotone for p in self.parts.values())
        fields = [f"{name}__{f}" for name in self.order
                  for f in self.parts[name].param_shapes(1)]  # fmt: skip
        self.params_type = _params_type((*fields, "family"))

    # ------------------------------------------------------------ bookkeeping
    @property
    def report_name(self) -> str:
        """The family of every expert (only the families when they are not known)."""
        if self.names is None:
            return "a family per expert: " + ", ".join(self.order)
        return "a family per expert: " + ", ".join(
            f"{k} {self.parts[n].report_name}" for k, n in enumerate(self.names)
        )

    def names_of(self, params) -> list[str]:
        """The family of every expert of ``params``."""
        return [self.order[int(c)] for c in params.family.round().long().tolist()]

    def coef_rows(self, params) -> torch.Tensor:
        """Each expert's linear predictor's coefficients (K, p) from its family; NaN: none."""
        parts = [getattr(params, f"{n}__coef", None) for n in self.names_of(params)]
        p = next(c.shape[1] for c in parts if c is not None)
        nan = params.family.new_full((p,), float("nan"))  # 'zero' has no linear predictor
        return torch.stack([nan if c is None else c[k] for k, c in enumerate(parts)])

    def named(self, params) -> MixedExperts:
        """This family with the experts of ``params``, each of its own family."""
        out = copy.copy(self)
        out.names = self.names_of(params)
        out.n_experts = len(out.names)
        return out

    def resized(self, n_experts: int) -> MixedExperts:
        """This family with ``n_experts`` experts, whose families the parameters give.

        One expert pooled over all rows (for the starts' residuals) is of the first
        family that has parameters.
        """
        if n_experts == 1:
            main = next((n for n in self.order if n != "zero"), self.order[0])
            return MixedExperts([main], {main: self.parts[main]})
        out = copy.copy(self)
        if n_experts != self.n_experts:
            out.names = None
        out.n_experts = n_experts
        return out

    def _codes(self, params) -> torch.Tensor:
        if params is None:
            if self.names is None:
                raise ValueError("the family of every expert is needed to start a fit")
            return torch.tensor([self.order.index(n) for n in self.names])
        return params.family.round().long().cpu()

    def _groups(self, params):
        """Per part in use: its name, its family sized to its experts, their indices."""
        codes = self._codes(params)
        for j, name in enumerate(self.order):
            idx = torch.nonzero(codes == j).flatten()
            if len(idx):
                part = copy.copy(self.parts[name])
                part.n_experts = len(idx)
                yield name, part, idx

    def _sub(self, params, name: str, part, idx):
        """The parameters of part ``name``'s experts ``idx``."""
        fields = part.param_shapes(1)
        values = {f: getattr(params, f"{name}__{f}")[idx.to(params.family.device)] for f in fields}
        return part.params_type(**values)

    def _join(self, subs: dict, codes: torch.Tensor, old=None):
        """Parameters of K experts from each part's parameters of its own experts.

        Rows of an expert in another part's fields are copies of the part's first
        expert (or kept from ``old``), valid values that nothing reads.
        """
        K = len(codes)
        values = {}
        for j, name in enumerate(self.order):
            part = self.parts[name]
            fields = part.param_shapes(1)
            idx = torch.nonzero(codes == j).flatten()
            if name in subs:
                where = torch.zeros(K, dtype=torch.long)
                where[idx] = torch.arange(len(idx))
                full = part.select(subs[name], where)
                for f in fields:
                    t = getattr(full, f)
                    if old is not None:  # keep the unused rows as they were
                        t = getattr(old, f"{name}__{f}").clone().to(t)
                        t[idx.to(t.device)] = getattr(subs[name], f)
                    values[f"{name}__{f}"] = t
            else:
                for f in fields:
                    values[f"{name}__{f}"] = getattr(old, f"{name}__{f}")
        any_t = next((v for v in values.values()), None)
        family = codes.to(torch.float64)
        if any_t is not None:
            family = family.to(any_t.device)
        return self.params_type(**values, family=family)

    # ------------------------------------------------------------ the contract
    def check_target(self, y2):
        """Every part's check of the target (the first one that refuses it says why)."""
        for name in self.order:
            if name != "zero" and hasattr(self.parts[name], "check_target"):
                y2 = self.parts[name].check_target(y2)
        return y2

    @property
    def n_outputs(self) -> int:
        """One output."""
        return 1

    def prepare(self, data: EMData) -> None:
        for part in self.parts.values():
            part.prepare(data)

    def log_prob(self, params, chunk: Chunk) -> torch.Tensor:
        out = chunk.XeT.new_empty((self.n_experts, chunk.stop - chunk.start))
        for name, part, idx in self._groups(params):
            out[idx.to(out.device)] = part.log_prob(self._sub(params, name, part, idx), chunk)
        return out

    def _sub_or_start(self, params, name, part, idx, data):
        if params is not None:
            return self._sub(params, name, part, idx)
        init = getattr(part, "init_params", None)
        return None if init is None else init(data)

    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor):
        out = []
        for name, part, idx in self._groups(params):
            sub = self._sub_or_start(params, name, part, idx, chunk.data)
            if params is None and sub is not None:  # the part's E-step, for its scratch
                part.log_prob(sub, chunk)
            out.append(part.chunk_stats(sub, chunk, resp[idx.to(resp.device)]))
        return tuple(out)

    def m_step(self, params, stats, data: EMData, resp=None):
        subs = {}
        for (name, part, idx), s in zip(self._groups(params), stats, strict=True):
            sub = self._sub_or_start(params, name, part, idx, data)
            subs[name] = part.m_step(sub, s, data, None)
        return self._join(subs, self._codes(params), params)

    def log_prior(self, params) -> float:
        return sum(
            part.log_prior(self._sub(params, name, part, idx))
            for name, part, idx in self._groups(params)
        )

    def n_parameters(self, params) -> int:
        return sum(
            part.n_parameters(self._sub(params, name, part, idx))
            for name, part, idx in self._groups(params)
        )

    def min_samples(self, params) -> float:
        return max(
            part.min_samples(self._sub(params, name, part, idx))
            for name, part, idx in self._groups(params)
        )

    def select(self, params, perm: torch.Tensor):
        """The experts ``perm``, each with its family (every field is indexed by expert)."""
        perm = perm.to(params.family.device)
        return self.params_type(**{f: t[perm].contiguous() for f, t in vars(params).items()})

    def residuals(self, params, chunk: Chunk) -> torch.Tensor:
        pieces = {}
        for name, part, idx in self._groups(params):
            pieces[name] = (idx, part.residuals(self._sub(params, name, part, idx), chunk))
        r = next(iter(pieces.values()))[1].shape[1]
        out = chunk.XeT.new_empty((self.n_experts, r, chunk.stop - chunk.start))
        for idx, value in pieces.values():
            out[idx.to(out.device)] = value
        return out

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.order:
            part = self.parts[name]
            sub = part.params_type(**{f: getattr(params, f"{name}__{f}")
                                      for f in part.param_shapes(1)})  # fmt: skip
            out.update({f"{name}__{k}": v for k, v in part.to_free(sub).items()})
        out["family"] = params.family
        return out

    def from_free(self, free: dict[str, torch.Tensor]):
        values = {}
        for name in self.order:
            part = self.parts[name]
            sub = part.from_free(_part_free(free, name))
            values.update({f"{name}__{f}": getattr(sub, f) for f in part.param_shapes(1)})
        return self.params_type(**values, family=free["family"])

    def _free_groups(self, free):
        codes = free["family"].detach().round().long().cpu()
        for j, name in enumerate(self.order):
            idx = torch.nonzero(codes == j).flatten()
            if len(idx):
                part = copy.copy(self.parts[name])
                part.n_experts = len(idx)
                own = _part_free(free, name)
                yield part, idx, {k: v[idx.to(v.device)] for k, v in own.items()}

    def _assemble(self, pieces, K: int) -> torch.Tensor:
        # differentiable: concatenate the parts' rows, then put them in expert order
        idx = torch.cat([i for i, _ in pieces])
        order = torch.empty(K, dtype=torch.long)
        order[idx] = torch.arange(K)
        return torch.cat([v for _, v in pieces])[order.to(pieces[0][1].device)]

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor,
                      offset: torch.Tensor | None = None):  # fmt: skip
        pieces = [
            (idx, part.log_prob_free(sub, XT, y, **_offset(part, offset)))
            for part, idx, sub in self._free_groups(free)
        ]
        return self._assemble(pieces, len(free["family"]))

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        total = free["family"].new_zeros(())
        for part, _, sub in self._free_groups(free):
            total = total + part.log_prior_free(sub)
        return total

    def mean_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor) -> torch.Tensor:
        pieces = [(idx, part.mean_free(sub, XT)) for part, idx, sub in self._free_groups(free)]
        return self._assemble(pieces, len(free["family"]))

    # ------------------------------------------------------------ reporting
    def report(self, params, scaling: Scaling) -> Report:
        """Every part's report of its experts, each under its expert's number."""
        out = Report()
        for name, part, idx in self._groups(params):
            rep = part.report(self._sub(params, name, part, idx), scaling)
            blocks = [_renumber(b, idx) for b in rep.blocks]
            i = 0
            for key, value in rep.values.items():
                n = value.numel()
                out.values[f"{name}__{key}"] = value
                out.blocks += blocks[i : i + n]
                out.labels += rep.labels[i : i + n]
                out.tested += rep.tested[i : i + n]
                i += n
            out.fixed.update({f"{name}__{k}": v for k, v in rep.fixed.items()})
        out.fixed["family"] = params.family
        return out

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        codes = fixed["family"].round().long().cpu()
        out: dict[str, torch.Tensor] = {"family": fixed["family"]}
        for j, name in enumerate(self.order):
            idx = torch.nonzero(codes == j).flatten()
            if not len(idx):
                continue
            sub = self.parts[name].from_report(
                _part_free(values, name), scaling, _part_free(fixed, name)
            )
            where = torch.zeros(len(codes), dtype=torch.long)
            where[idx] = torch.arange(len(idx))
            out.update({f"{name}__{k}": v[where.to(v.device)] for k, v in sub.items()})
        return out

    # ------------------------------------------------------------ prediction
    @property
    def takes_offset(self) -> bool:
        """Whether some part's linear predictor takes an offset (the others ignore it)."""
        return any(getattr(part, "takes_offset", False) for part in self.parts.values())

    def moments(self, params, XT: torch.Tensor, offset: torch.Tensor | None = None):
        """Every expert's mean and standard deviation, each (n, K, 1); ``offset`` goes
        to the parts whose linear predictor takes one."""
        means = XT.new_empty((XT.shape[1], self.n_experts, 1))
        stds = torch.empty_like(means)
        for name, part, idx in self._groups(params):
            mu, sd = part.moments(self._sub(params, name, part, idx), XT, **_offset(part, offset))
            means[:, idx.to(means.device)], stds[:, idx.to(means.device)] = mu, sd
        return means, stds

    def predictive_extra(self, params) -> dict:
        return {}

    def predictive_families(self, params) -> list[str]:
        """The component family of every expert, for :class:`MixturePrediction`."""
        return [self.parts[n].predictive_family for n in self.names_of(params)]

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Every part's fields with a row per expert, then the family code of each."""
        out = {}
        for name in self.order:
            shapes = resize(self.parts[name], self.n_experts).param_shapes(p)
            out.update({f"{name}__{f}": s for f, s in shapes.items()})
        out["family"] = (self.n_experts,)
        return out

    def check_params(self, params, prefix: str = "") -> None:
        """Every part's checks of its fields; codes that name one of the parts."""
        for name in self.order:
            part = resize(self.parts[name], self.n_experts)
            sub = part.params_type(**{f: getattr(params, f"{name}__{f}")
                                      for f in part.param_shapes(1)})  # fmt: skip
            part.check_params(sub, prefix=f"{prefix}{name}__")
        codes = params.family
        if not bool((torch.isfinite(codes) & (codes == codes.round()) & (codes >= 0)
                     & (codes < len(self.order))).all()):  # fmt: skip
            raise ValueError(
                f"{prefix + 'family'!r} holds codes that name none of the families {self.order}"
            )


def resize(part, n_experts: int):
    """A copy of ``part`` with ``n_experts`` experts."""
    out = copy.copy(part)
    out.n_experts = n_experts
    return out


def _part_free(free: dict, name: str) -> dict:
    head = f"{name}__"
    return {k[len(head) :]: v for k, v in free.items() if k.startswith(head)}


def _renumber(block: str, idx: torch.Tensor) -> str:
    """``"expert j"`` of a part as the expert's number in the mixture."""
    head, _, rest = block.partition(" ")
    if head == "expert" and rest.isdigit():
        return f"expert {int(idx[int(rest)])}"
    return block


def _offset(part, offset: torch.Tensor | None) -> dict:
    """``offset=`` for a part whose linear predictor takes one (nothing otherwise)."""
    return {"offset": offset} if offset is not None and getattr(part, "takes_offset", False) else {}
