"""Which weights a compression callback acts on: resolution of include/exclude name patterns.

Shared by every callback that targets weights, so "fc1", "net.fc1", "*.fc*" and
"net.fc1.weight" mean the same thing everywhere.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from lightning_compress.layout import registered_weights

log = logging.getLogger(__name__)


def name_matches(name: str, pattern: str) -> bool:
    """Whether a qualified module or parameter name matches a pattern.

    A pattern matches a name exactly, as a glob (``"*.fc*"``), or as a dotted suffix, so ``"fc3"``
    matches ``"net.fc3"`` and ``"net.fc3.weight"`` but not ``"net.fc30"``. A pattern that starts
    with ``^`` is anchored at the root: ``"^conv1"`` is the top-level ``conv1`` only, not
    ``layer1.0.conv1``.
    """
    if pattern.startswith("^"):
        pattern = pattern[1:]
        return name == pattern or fnmatch.fnmatchcase(name, pattern)
    if name == pattern or fnmatch.fnmatchcase(name, pattern):
        return True
    return name.endswith("." + pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _as_list(patterns: str | Sequence[str] | None, arg: str) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    items = list(patterns)
    if not all(isinstance(p, str) and p for p in items):
        raise ValueError(
            f"`{arg}` must be a pattern or a list of non-empty patterns, got {patterns}"
        )
    return items


def _is_weight(name: str, param: nn.Parameter) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (leaf == "weight" or leaf.endswith("_weight")) and param.dim() >= 2


def _aliases(model: nn.Module) -> dict[str, str]:
    """Every name a parameter is reachable under -> its canonical name (the first one)."""
    canonical: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        out[name] = canonical.setdefault(id(param), name)
    return out


@dataclass
class Targeting:
    """What a callback will compress in a model, and what it leaves alone and why.

    Attributes:
        names: The canonical qualified names of the targeted weights (a tied weight once).
        rows: One row per weight considered: ``name``, ``module`` (type), ``shape``,
            ``targeted`` and ``why`` (a short reason), in model order.
    """

    names: list[str]
    rows: list[dict[str, object]] = field(default_factory=list)

    def table(self) -> str:
        """The rows as a compact, aligned text table (for the setup log)."""
        width = max((len(str(r["name"])) for r in self.rows), default=4)
        lines = []
        for r in self.rows:
            mark = "+" if r["targeted"] else "-"
            shape = "x".join(str(d) for d in r["shape"])  # type: ignore[union-attr]
            lines.append(f"  {mark} {r['name']:<{width}}  {r['module']:<12} {shape:<14} {r['why']}")
        return "\n".join(lines)


def _default_candidates(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Registered weights by canonical name, and the reason each tied one is left out."""
    aliases = _aliases(model)
    registered = {name for name, *_ in registered_weights(model)}
    chosen: list[str] = []
    left_out: dict[str, str] = {}
    for name, *_ in registered_weights(model):
        canonical = aliases[name]
        partners = [a for a, c in aliases.items() if c == canonical and a != name]
        foreign = [a for a in partners if a not in registered]
        if foreign:
            # A head tied to an embedding: compressing it would compress the embedding too.
            left_out[name] = (
                f"tied to {foreign[0]} (not a registered layer); left out by default, "
                "name it in `include` to compress the shared weight"
            )
        elif canonical not in chosen:
            chosen.append(canonical)
    return chosen, left_out


def default_weights(model: nn.Module) -> list[str]:
    """Canonical names of the registered weights (Linear, Conv, attention projections, Conv1D,
    user-registered types); a weight shared by several layers once, one tied to an embedding
    not at all (see :class:`Targeting`)."""
    return _default_candidates(model)[0]


def resolve_targets(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    owner: str = "callback",
) -> Targeting:
    """Resolves which weights a callback targets, with a row per weight saying why or why not.

    ``include`` patterns may name modules (their weights) or parameters. Every pattern must
    match something, and everything matched must be a weight (a parameter named ``weight`` or
    ``*_weight`` with at least two dimensions). A parameter shared by several modules (a tied
    head) is one target, under its canonical name (the first in ``named_parameters``).

    Raises:
        ValueError: A pattern matching nothing, a matched parameter that is not a weight, or
            nothing left to target.
    """
    include_list = _as_list(include, "include")
    exclude_list = _as_list(exclude, "exclude")
    aliases = _aliases(model)
    why: dict[str, str] = {}
    if include_list is None:
        chosen, left_out = _default_candidates(model)
        why.update({n: "default target" for n in chosen})
    else:
        chosen, left_out = [], {}
        params = dict(model.named_parameters(remove_duplicate=False))
        for pattern in include_list:
            for hit in _include_hits(model, params, pattern, owner):
                canonical = aliases[hit]
                if canonical not in chosen:
                    chosen.append(canonical)
                    why[canonical] = f"include {pattern!r}"
    names_of = {c: [a for a, k in aliases.items() if k == c] for c in chosen}
    for pattern in exclude_list or []:
        hit = [n for n in chosen if any(_excluded(a, pattern) for a in names_of[n])]
        if not hit:
            raise ValueError(
                f"{owner}: `exclude` pattern {pattern!r} matches none of the targets {chosen}"
            )
        for n in hit:
            left_out[n] = f"exclude {pattern!r}"
        chosen = [n for n in chosen if n not in hit]
    if not chosen:
        raise ValueError(
            f"{owner}: no weights left to target (include={include}, exclude={exclude})"
        )
    for n in chosen:
        shared = [a for a in names_of[n] if a != n]
        if shared:
            why[n] += f"; shared with {', '.join(shared)} (one weight, targeted once)"
    return Targeting(chosen, _rows(model, aliases, chosen, why, left_out))


def _rows(
    model: nn.Module,
    aliases: dict[str, str],
    chosen: list[str],
    why: dict[str, str],
    left_out: dict[str, str],
) -> list[dict[str, object]]:
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: set[str] = set()
    rows: list[dict[str, object]] = []
    candidates = [name for name, *_ in registered_weights(model)] + chosen
    for name in dict.fromkeys(candidates):
        canonical = aliases.get(name, name)
        if canonical in chosen and canonical in seen:
            continue  # a tied weight is one row, under its canonical name
        if canonical in chosen:
            name, targeted, reason = canonical, True, why[canonical]
            seen.add(canonical)
        else:
            targeted = False
            reason = left_out.get(name) or left_out.get(canonical) or "not in `include`"
        module = modules.get(name.rpartition(".")[0])
        rows.append(
            {
                "name": name,
                "module": type(module).__name__ if module is not None else "",
                "shape": list(params[name].shape),
                "targeted": targeted,
                "why": reason,
            }
        )
    return rows


def resolve_weights(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    owner: str = "callback",
) -> list[str]:
    """The canonical names of the weights :func:`resolve_targets` targets."""
    return resolve_targets(model, include, exclude, owner).names


def _excluded(name: str, pattern: str) -> bool:
    # A weight is covered by a pattern naming it or any module that contains it.
    parts = name.split(".")
    return any(name_matches(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def _include_hits(
    model: nn.Module, params: dict[str, nn.Parameter], pattern: str, owner: str
) -> list[str]:
    # A pattern naming modules selects their weights; only a pattern that names no module is
    # matched against parameter names, so "*fc*" means the layers, not also their biases.
    modules = [(n, m) for n, m in model.named_modules() if n and name_matches(n, pattern)]
    if modules:
        hits = []
        for module_name, module in modules:
            own = [
                f"{module_name}.{leaf}"
                for leaf, p in module.named_parameters(recurse=False)
                if _is_weight(leaf, p)
            ]
            own += [f"{module_name}.{n}" for n in default_weights(module)]
            if not own:
                raise ValueError(
                    f"{owner}: `include` pattern {pattern!r} matches {module_name!r} "
                    f"({type(module).__name__}), which has no weight to target (parameters named "
                    "`weight` or `*_weight` with at least 2 dimensions)"
                )
            hits.extend(own)
        return list(dict.fromkeys(hits))
    hits = [n for n in params if name_matches(n, pattern)]
    if not hits:
        raise ValueError(
            f"{owner}: `include` pattern {pattern!r} matches no module or parameter; "
            f"weights available: {default_weights(model)}"
        )
    for hit in hits:
        if not _is_weight(hit, params[hit]):
            raise ValueError(
                f"{owner}: `include` pattern {pattern!r} matches {hit!r} "
                f"(shape {tuple(params[hit].shape)}), which is not a weight; targets must be "
                "parameters named `weight` or `*_weight` with at least 2 dimensions"
            )
    return hits


def match_overrides(
    names: Iterable[str], overrides: dict[str, float] | None, arg: str, owner: str
) -> dict[str, float]:
    """Maps each targeted name to the value of the first override pattern that matches it.

    Raises:
        ValueError: An override pattern that matches none of the targets.
    """
    names = list(names)
    out: dict[str, float] = {}
    for pattern, value in (overrides or {}).items():
        hits = [n for n in names if _excluded(n, pattern)]
        if not hits:
            raise ValueError(
                f"{owner}: `{arg}` pattern {pattern!r} matches none of the targets {names}"
            )
        for hit in hits:
            out.setdefault(hit, value)
    return out


def log_targeting(owner: str, targeting: Targeting) -> None:
    """Logs, once per process group (rank zero), what ``owner`` will compress and what not."""
    from pytorch_lightning.utilities import rank_zero_only

    left = sum(1 for r in targeting.rows if not r["targeted"])
    rank_zero_only(log.info)(
        "%s: targets %d weights, leaves %d alone:\n%s",
        owner,
        len(targeting.names),
        left,
        targeting.table(),
    )
