"""Which weights a compression callback acts on: resolution of include/exclude name patterns.

Shared by every callback that targets weights, so "fc1", "net.fc1", "*.fc*" and
"net.fc1.weight" mean the same thing everywhere.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

# Module types whose weights are targeted when no `include` is given. MultiheadAttention's packed
# input projection is a plain Parameter used by F.multi_head_attention_forward directly; its
# output projection is an nn.Linear subclass whose weight is also read directly. Hard masks on
# the parameters themselves are correct for both, so both are targeted like any Linear.
DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.MultiheadAttention,
)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def name_matches(name: str, pattern: str) -> bool:
    """Whether a qualified module or parameter name matches a pattern.

    A pattern matches a name exactly, as a glob (``"*.fc*"``), or as a dotted suffix, so ``"fc3"``
    matches ``"net.fc3"`` and ``"net.fc3.weight"`` but not ``"net.fc30"``.
    """
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


def default_weights(model: nn.Module) -> list[str]:
    """Qualified names of the weights of every Linear, Conv and attention projection."""
    names = []
    for module_name, module in model.named_modules():
        if not isinstance(module, DEFAULT_MODULE_TYPES):
            continue
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, nn.MultiheadAttention):
            leaves = [w for w in _MHA_WEIGHTS if getattr(module, w, None) is not None]
        else:
            leaves = ["weight"]
        names.extend(prefix + leaf for leaf in leaves)
    return names


def resolve_weights(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    owner: str = "callback",
) -> list[str]:
    """Resolves the qualified parameter names a callback targets.

    ``include`` patterns may name modules (their ``weight``) or parameters. Every pattern must
    match something, and everything matched must be a weight (a parameter named ``weight`` or
    ``*_weight`` with at least two dimensions).

    Raises:
        ValueError: A pattern matching nothing, a matched parameter that is not a weight, or
            nothing left to target.
    """
    include_list = _as_list(include, "include")
    exclude_list = _as_list(exclude, "exclude")
    params = dict(model.named_parameters())
    if include_list is None:
        chosen = default_weights(model)
    else:
        chosen = []
        for pattern in include_list:
            chosen.extend(_include_hits(model, params, pattern, owner))
    chosen = list(dict.fromkeys(chosen))
    for pattern in exclude_list or []:
        if not any(_excluded(n, pattern) for n in chosen):
            raise ValueError(
                f"{owner}: `exclude` pattern {pattern!r} matches none of the targets {chosen}"
            )
        chosen = [n for n in chosen if not _excluded(n, pattern)]
    if not chosen:
        raise ValueError(
            f"{owner}: no weights left to target (include={include}, exclude={exclude})"
        )
    return chosen


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
