"""``Choice``: a place in a user's model where a search picks one of several operations."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn


class Choice(nn.Module):
    """One of ``candidates`` computes here; a :class:`~lightning_compress.search.SearchCallback`
    learns which (ProxylessNAS: one sampled path per step, the most probable kept).

    Every candidate takes the same inputs and must give outputs of the same shape (checked when
    the search starts). Until a search is attached and before the choice, the forward runs the
    candidate the search names; without a search it runs ``default``. Once chosen
    (:meth:`choose`), only the chosen candidate computes, and the state dict holds only its
    tensors, under this module's name: it loads (``strict=True``) into the plain architecture
    with that operation in this place, and a checkpoint of that form loads back into a
    ``Choice`` (which candidate is recognised by its tensors' names and shapes). The other
    candidates stay on the module (the optimizer still holds their parameters) without
    computing.

    Args:
        candidates: The operations, as a list (labelled by index) or a mapping label -> module.
        default: The label or index that runs without a search.
    """

    def __init__(
        self,
        candidates: Sequence[nn.Module] | Mapping[str, nn.Module],
        default: int | str = 0,
    ) -> None:
        super().__init__()
        if isinstance(candidates, Mapping):
            labels, ops = [str(k) for k in candidates], list(candidates.values())
        else:
            ops = list(candidates)
            labels = [str(i) for i in range(len(ops))]
        if len(ops) < 2 or not all(isinstance(op, nn.Module) for op in ops):
            raise ValueError(
                f"Choice: give at least two nn.Module candidates, got {len(ops)} "
                f"({[type(op).__name__ for op in ops]})"
            )
        self.labels = labels
        self.candidates = nn.ModuleList(ops)
        self.default = self.index(default)
        self.chosen: int | None = None
        # Set by the search: () -> (active index, second index or None, gate-gradient sink).
        self.sampler: Callable[[], tuple[int, int | None, Callable | None]] | None = None
        self._register_state_dict_hook(_chosen_state)
        self._register_load_state_dict_pre_hook(_recognise_chosen, with_module=True)
        self.register_load_state_dict_post_hook(_ignore_unchosen)

    def index(self, label: int | str) -> int:
        """The index of a candidate given by index or label.

        Raises:
            ValueError: Neither an index nor a label of this choice.
        """
        if isinstance(label, int) and 0 <= label < len(self.candidates):
            return label
        if str(label) in self.labels:
            return self.labels.index(str(label))
        raise ValueError(f"Choice: unknown candidate {label!r}; candidates: {self.labels}")

    def choose(self, label: int | str) -> None:
        """Keeps ``label``'s operation: from now on only it computes (and is saved)."""
        self.chosen = self.index(label)

    @property
    def label(self) -> str | None:
        """The chosen candidate's label (None before the choice)."""
        return None if self.chosen is None else self.labels[self.chosen]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.chosen is not None:
            return self.candidates[self.chosen](*args, **kwargs)
        if self.sampler is None:
            return self.candidates[self.default](*args, **kwargs)
        active, second, sink = self.sampler()
        out = self.candidates[active](*args, **kwargs)
        if sink is None or not (torch.is_tensor(out) and out.requires_grad):
            return out
        other = None
        if second is not None:
            with torch.no_grad():
                other = self.candidates[second](*args, **kwargs).detach()
        kept = out.detach()

        def hook(grad: torch.Tensor) -> None:
            # The two sampled gates' gradients: <dL/dy, o_active> and <dL/dy, o_second>.
            grads = {active: float((grad * kept).sum())}
            if other is not None and second is not None:
                grads[second] = float((grad * other).sum())
            sink(grads)

        out.register_hook(hook)
        return out

    def extra_repr(self) -> str:
        return f"labels={self.labels}, chosen={self.label}"


def _chosen_state(module: Choice, state: dict[str, Any], prefix: str, local: Any) -> None:
    """After the choice: only the chosen candidate's tensors, named as in the plain model."""
    if module.chosen is None:
        return
    inner = f"{prefix}candidates.{module.chosen}."
    for key in [k for k in state if k.startswith(f"{prefix}candidates.")]:
        value = state.pop(key)
        if key.startswith(inner):
            state[prefix + key[len(inner) :]] = value


def _recognise_chosen(
    module: Choice,
    state: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing: list[str],
    unexpected: list[str],
    errors: list[str],
) -> None:
    """A state dict of the chosen form (the plain model's keys) loads into this ``Choice``: the
    candidate whose keys and shapes it holds is chosen."""
    module._load_prefix = prefix
    own = [k for k in state if k.startswith(prefix) and not k.startswith(f"{prefix}candidates.")]
    if not own:
        return
    given = {k[len(prefix) :]: tuple(state[k].shape) for k in own}
    matches = [
        i
        for i, op in enumerate(module.candidates)
        if {k: tuple(v.shape) for k, v in op.state_dict().items()} == given
    ]
    if module.chosen is not None and module.chosen in matches:
        matches = [module.chosen]
    if len(matches) != 1:
        errors.append(
            f"Choice {prefix.rstrip('.')!r}: the state dict holds one operation's tensors "
            f"({sorted(given)}) that match {len(matches)} of the candidates {module.labels}; "
            "cannot tell which was chosen"
        )
        return
    module.chosen = matches[0]
    for key in own:
        state[f"{prefix}candidates.{module.chosen}.{key[len(prefix) :]}"] = state.pop(key)


def _ignore_unchosen(module: Choice, incompatible: Any) -> None:
    """The candidates not chosen are not in a chosen-form state dict; not missing."""
    prefix = getattr(module, "_load_prefix", None)
    if module.chosen is None or prefix is None:
        return
    others = f"{prefix}candidates."
    keep = [
        k
        for k in incompatible.missing_keys
        if not k.startswith(others) or k.startswith(f"{others}{module.chosen}.")
    ]
    incompatible.missing_keys[:] = keep
