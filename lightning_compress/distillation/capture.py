"""What the callback reads from a forward pass: logits, per-example fingerprints of the inputs,
the memo of teacher outputs keyed by them, and the adapters that bridge feature shapes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

# Coefficients of the fingerprint hash: fixed, so every rank and every resumed run agrees.
_SEEDS = (0x5EED_0001, 0x5EED_0002)
_coefficients: dict[tuple[int, int, str], torch.Tensor] = {}


def first_tensor(output: Any) -> torch.Tensor | None:
    """The output if it is a tensor, else the first element of a tuple or list if that is one."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    return None


def logits_of(output: Any, what: str) -> torch.Tensor:
    """The logits in a forward's output: the tensor itself, ``output["logits"]``,
    ``output.logits`` (model-output objects), or the first element of a tuple or list.

    Raises:
        TypeError: Nothing in the output is a tensor of logits.
    """
    if isinstance(output, Mapping) and torch.is_tensor(output.get("logits")):
        return output["logits"]
    if torch.is_tensor(getattr(output, "logits", None)):
        return output.logits
    logits = first_tensor(output)
    if logits is None:
        raise TypeError(
            f"{what} returned {type(output).__name__}; DistillationCallback needs the logits as "
            "a tensor, a mapping with 'logits', an object with `.logits`, or a tuple whose first "
            "element is the logits"
        )
    return logits


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, Mapping):
        return [leaf for key in sorted(tree, key=str) for leaf in _leaves(tree[key])]
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def _words(t: torch.Tensor) -> torch.Tensor:
    """(B, n) int64 holding the tensor's exact bit patterns in words of at most 32 bits."""
    rows = t.detach().reshape(t.shape[0], -1)
    if rows.dtype.is_complex:
        rows = torch.view_as_real(rows).reshape(t.shape[0], -1)
    if rows.dtype == torch.bool:
        return rows.to(torch.int64)
    size = rows.element_size()
    if size >= 4:
        rows = rows.contiguous().view(torch.int32)
    elif size == 2:
        rows = rows.contiguous().view(torch.int16)
    elif rows.dtype != torch.uint8:
        rows = rows.contiguous().view(torch.int8)
    return rows.to(torch.int64)


def _coefficients_for(n: int, device: torch.device, which: int) -> torch.Tensor:
    key = (n, which, str(device))
    if key not in _coefficients:
        g = torch.Generator().manual_seed(_SEEDS[which])
        c = torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.int64) * 2 + 1
        _coefficients[key] = c.to(device)
    return _coefficients[key]


def example_fingerprints(args: Any, kwargs: Mapping[str, Any], batch_size: int) -> list[tuple]:
    """One hashable key per example of a forward call, equal exactly when the example's inputs
    are bit-for-bit equal (two independent 64-bit linear hashes of the input bits).

    Tensors whose first dimension is the batch size are split per example; every other argument
    (keyword flags, non-batch tensors' shapes) goes into a part shared by all keys.
    """
    h = [torch.zeros(batch_size, dtype=torch.int64) for _ in _SEEDS]
    shared: list[Any] = []
    for leaf in _leaves((args, dict(kwargs))):
        if torch.is_tensor(leaf) and leaf.dim() >= 1 and leaf.shape[0] == batch_size:
            words = _words(leaf)
            shared.append((tuple(leaf.shape[1:]), str(leaf.dtype)))
            for which in range(len(_SEEDS)):
                c = _coefficients_for(words.shape[1], words.device, which)
                part = (words * c).sum(dim=1).cpu()
                h[which] = h[which] * 1_000_003 + part
        elif torch.is_tensor(leaf):
            shared.append(("tensor", tuple(leaf.shape), str(leaf.dtype)))
        else:
            shared.append(repr(leaf))
    salt = hash(tuple(shared))
    return [(salt, a, b) for a, b in zip(h[0].tolist(), h[1].tolist(), strict=True)]


class TeacherMemo:
    """Teacher outputs by example fingerprint, in growable tensors on the outputs' device.

    Args:
        limit: Most examples held (None: no limit). Beyond it, new examples are not stored.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.index: dict[tuple, int] = {}
        self.data: dict[str, torch.Tensor] = {}
        self.reset_counts()

    def reset_counts(self) -> None:
        """Restarts the counts of examples found (``hits``), not found (``misses``) and not
        stored because the memo was full (``dropped``)."""
        self.hits = self.misses = self.dropped = 0

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, keys: Sequence[tuple]) -> dict[str, torch.Tensor] | None:
        """The stored outputs of these examples in this order, or None if any is missing."""
        rows = [self.index.get(k) for k in keys]
        if not rows or any(r is None for r in rows):
            self.misses += sum(r is None for r in rows)
            self.hits += sum(r is not None for r in rows)
            return None
        self.hits += len(rows)
        some = next(iter(self.data.values()))
        idx = torch.tensor(rows, dtype=torch.long, device=some.device)
        return {name: data.index_select(0, idx) for name, data in self.data.items()}

    def insert(self, keys: Sequence[tuple], outputs: Mapping[str, torch.Tensor]) -> None:
        """Stores the rows of examples not yet held (first dimension of every output)."""
        first: dict[tuple, int] = {}  # a repeated example in one batch is stored once
        for i, k in enumerate(keys):
            if k not in self.index:
                first.setdefault(k, i)
        new = list(first.values())
        if self.limit is not None:
            new = new[: max(0, self.limit - len(self.index))]
            self.dropped += len(first) - len(new)
        if not new:
            return
        size = len(self.index)
        for name, out in outputs.items():
            rows = out.detach()[torch.tensor(new, device=out.device)]
            data = self.data.get(name)
            if data is None:
                data = rows.new_empty((max(len(new), 64), *rows.shape[1:]))
            elif data.shape[1:] != rows.shape[1:]:
                raise ValueError(
                    f"teacher output {name!r} changed shape from {tuple(data.shape[1:])} to "
                    f"{tuple(rows.shape[1:])} per example; the memo (precompute=True) needs "
                    "fixed per-example shapes"
                )
            if data.shape[0] < size + len(new):
                grown = data.new_empty((max(2 * data.shape[0], size + len(new)), *data.shape[1:]))
                grown[:size] = data[:size]
                data = grown
            data[size : size + len(new)] = rows
            self.data[name] = data
        for offset, i in enumerate(new):
            self.index[keys[i]] = size + offset


def make_adapter(
    student: torch.Size, teacher: torch.Size, what: str, seed: int
) -> nn.Module | None:
    """A learned map from a student feature's shape to the teacher's, or None if they match.

    The shapes may differ in one dimension besides the batch: the last (a ``Linear`` over it:
    MLP features, token embeddings) or, for 3-D to 5-D features, the channel dimension 1 (a
    1x1 convolution). Initialised from ``seed`` without touching the global RNG, so every rank
    and every resumed run starts from the same adapter.

    Raises:
        ValueError: The shapes differ in the batch, in the number of dimensions, or in more
            than one dimension.
    """
    if student == teacher:
        return None
    differ = [d for d in range(len(student)) if d >= len(teacher) or student[d] != teacher[d]]
    if len(student) != len(teacher) or len(student) < 2 or 0 in differ or len(differ) != 1:
        raise ValueError(
            f"{what}: student feature of shape {tuple(student)} cannot be adapted to the "
            f"teacher's {tuple(teacher)}; the shapes may differ only in the last dimension "
            "(Linear adapter) or the channel dimension 1 of a 3-D to 5-D feature (1x1 conv)"
        )
    dim = differ[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if dim == len(student) - 1 and (len(student) == 2 or dim != 1):
            return nn.Linear(student[dim], teacher[dim])
        if dim == 1 and 3 <= len(student) <= 5:
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(student) - 3]
            return conv(student[1], teacher[1], kernel_size=1)
    raise ValueError(
        f"{what}: student feature {tuple(student)} and teacher feature {tuple(teacher)} differ "
        f"in dimension {dim}; only the last or the channel dimension can be adapted"
    )
