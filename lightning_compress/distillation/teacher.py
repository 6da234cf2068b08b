"""Building the frozen teacher from a module, a Hydra config or a checkpoint, without unpickling."""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"`teacher_class` must be a dotted import path, got {path!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"`teacher_class`={path!r} cannot be imported: {err}") from err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or the ``state_dict`` of a Lightning/torch checkpoint
    read with ``weights_only=True`` (nothing is unpickled beyond tensors and primitives).

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is not a readable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure means the same thing to the user
        raise ValueError(
            f"teacher checkpoint {str(path)!r} cannot be loaded: {type(err).__name__}: "
            f"{str(err)[:300]}"
        ) from err
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(torch.is_tensor(v) for v in data.values()):
        raise ValueError(
            f"teacher checkpoint {str(path)!r} holds no state_dict of tensors "
            f"(found {type(data).__name__})"
        )
    return dict(data)


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Loads ``state`` into ``module`` strictly, dropping one leading prefix shared by the keys
    when the module is a part of the checkpointed model (``net.fc1.weight`` into ``net``).

    Raises:
        ValueError: The keys or shapes do not match the module.
    """
    wanted = set(module.state_dict())
    keys = set(state)
    if keys != wanted:
        prefixes = {k[: k.index(".") + 1] for k in keys if "." in k}
        for prefix in sorted(prefixes):
            stripped = {k[len(prefix) :] for k in keys if k.startswith(prefix)}
            if stripped == wanted:
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                break
        else:
            missing, unexpected = sorted(wanted - keys)[:5], sorted(keys - wanted)[:5]
            raise ValueError(
                f"teacher checkpoint {source} does not match the teacher module: missing "
                f"{missing}, unexpected {unexpected}"
            )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"teacher checkpoint {source} does not fit the teacher: {err}") from err


def load_teacher(
    teacher: Any,
    checkpoint: str | Path | None = None,
    teacher_class: type | str | None = None,
) -> nn.Module:
    """The teacher as an ``nn.Module``.

    Args:
        teacher: An ``nn.Module``; a Hydra config (mapping with ``_target_``) to instantiate; or
            the path of a checkpoint of ``teacher_class``.
        checkpoint: Weights loaded into the teacher: ``.safetensors`` or a Lightning/torch
            checkpoint (its ``state_dict``), read without unpickling code.
        teacher_class: With a path ``teacher``: a LightningModule class (restored by its
            ``load_from_checkpoint`` with ``weights_only=True``) or a plain ``nn.Module`` class
            built without arguments; a class or its dotted import path.

    Raises:
        TypeError: ``teacher`` is none of the above.
        FileNotFoundError, ValueError: A checkpoint that is missing, unreadable or mismatched.
    """
    if isinstance(teacher, (str, Path)):
        if teacher_class is None:
            raise ValueError(
                f"`teacher`={str(teacher)!r} is a checkpoint path: give its `teacher_class` "
                "(the LightningModule or nn.Module class it was saved from)"
            )
        if checkpoint is not None:
            raise ValueError("give the checkpoint as `teacher` or `teacher_checkpoint`, not both")
        cls = _import(teacher_class) if isinstance(teacher_class, str) else teacher_class
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"`teacher_class` must be an nn.Module class, got {cls!r}")
        import pytorch_lightning as pl

        if issubclass(cls, pl.LightningModule):
            if not Path(teacher).is_file():
                raise FileNotFoundError(f"teacher checkpoint {str(teacher)!r} does not exist")
            try:
                return cls.load_from_checkpoint(teacher, map_location="cpu", weights_only=True)
            except Exception as err:
                raise ValueError(
                    f"teacher checkpoint {str(teacher)!r} cannot be loaded into "
                    f"{cls.__name__}: {type(err).__name__}: {str(err)[:300]}. If its "
                    "hyperparameters are not plain data, pass the built teacher module as "
                    "`teacher` and this file as `teacher_checkpoint`"
                ) from err
        try:
            module = cls()
        except TypeError as err:
            raise ValueError(
                f"`teacher_class` {cls.__name__} cannot be built without arguments ({err}); pass "
                "the built module as `teacher` and the file as `teacher_checkpoint`"
            ) from err
        load_weights(module, read_state_dict(teacher), repr(str(teacher)))
        return module
    if isinstance(teacher, Mapping) or type(teacher).__name__ == "DictConfig":
        if "_target_" not in teacher:
            raise ValueError("a `teacher` config must have a `_target_`")
        from hydra.utils import instantiate

        teacher = instantiate(teacher)
    if not isinstance(teacher, nn.Module):
        raise TypeError(
            "`teacher` must be an nn.Module, a Hydra config with `_target_`, or a checkpoint "
            f"path with `teacher_class`; got {type(teacher).__name__}"
        )
    if checkpoint is not None:
        load_weights(teacher, read_state_dict(checkpoint), repr(str(checkpoint)))
    return teacher


def teacher_digest(teacher: nn.Module) -> str:
    """SHA-256 of the teacher's state_dict: equal exactly when every tensor is bit-for-bit equal."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
