"""The packed artifact: one safetensors file holding exactly what the compressed weights need.

Tensors:

- ``packed/<layer>/values``   the non-zero integers of a sparse layer, row-major: int8, or for
  4 bits uint8 with two per byte (low nibble first); ``packed/<layer>/qweight`` for a dense
  layer (int8 [N*K], or the same nibble packing);
- ``packed/<layer>/unary`` and ``packed/<layer>/low``  the Rice-coded positions of a sparse
  layer (:mod:`lightning_compress.export.positions`);
- ``packed/<layer>/scale`` float32 [N] per output channel, ``packed/<layer>/bias`` float32 [N];
- ``packed/<layer>/first/...`` and ``packed/<layer>/second/...``  the two factors of a low-rank
  layer (``first @ second`` is its canonical [N, K] matrix, rank R): ``weight`` float32 [N, R]
  and [R, K], or ``qweight`` (dense, as above) with ``scale`` [N] and [R], one per factor row;
- ``packed/<layer>/codebook`` float32 [groups, 2**bits], ``packed/<layer>/indices`` (uint8, an
  entropy-coded stream, :mod:`lightning_compress.export.entropy`) and, unless every weight
  survived, the Rice-coded ``unary`` and ``low`` positions: a weight-sharing layer
  (:class:`~lightning_compress.quantization.SharedLayer`). The stream holds one codebook index
  per surviving weight, row-major; the weight at output row ``r`` is
  ``codebook[r // (N // groups), index]``, every other weight exactly 0;
- ``state/<key>``  every other entry of the model's state dict, as it was (BatchNorm statistics,
  embeddings, layers left uncompressed in fp32).

The safetensors header's ``__metadata__`` (strings only) holds ``format``
(``"lightning-compress"``), ``format_version``, ``layers`` (a JSON table: name, kind, module type,
the module's weight shape and its (out, in) axes, the canonical matrix shape, bits, layout,
counts, convolution geometry, activation range; for kind ``"lowrank"`` the rank and bits, null
for fp32 factors, instead of layout and counts; for kind ``"shared"`` the index bits and
groups with layout and counts), ``unpacked`` (a JSON list of every other
weight-bearing layer: name, type and the reason it is kept fp32; absent in artifacts written
before it existed) and ``checksum``: SHA-256 over the table, the list and every tensor's name,
dtype, shape and bytes. Loading parses the header itself, reads tensors with safetensors (which
never unpickles), verifies the checksum and matches every layer against the target model before
anything in the model changes.

Integers are stored in their canonical order, output channels first
(:mod:`lightning_compress.layout`): for transformers' ``Conv1D``, whose weight is ``(in, out)``,
that is the transpose, so it packs and reloads as a
:class:`~lightning_compress.export.PackedLinear`. Weights of 2 to 4 bits share the nibble
container of int4, 5 to 8 bits the int8 one; the table keeps the true bits.

Writing takes a :class:`~lightning_compress.quantization.CompressionRecord` (the one a
``QATCallback`` made, or post-training integers) and stores each layer record with the packer
registered for its type (:func:`packer`, :data:`PACKERS`): a new kind of compressed layer is a
new record class and one packer. Low-rank factors
(:class:`~lightning_compress.lowrank.record.LowRankLayer`) come in a second record and reload as
:class:`~lightning_compress.export.modules.PackedLowRank`.

Version 2 added low-rank layers, version 3 weight-sharing layers. An artifact is written with the
oldest version that holds its layers (1 without either, 2 with low-rank layers only), so older
releases keep reading what they can; one they cannot read they refuse by its version (asking for
an upgrade) rather than as a corrupted file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from lightning_compress.export import entropy, positions
from lightning_compress.export.latency import (
    LatencyTable,
    LayerSpec,
    ModelLatency,
    cache_bytes,
    choose,
    default_path,
    model_latency,
    run_example,
)
from lightning_compress.export.modules import (
    PackedConv2d,
    PackedLinear,
    PackedLowRank,
    SharedLinear,
    conv_params,
    implementations,
    packed_kind,
    unpackable_reason,
)
from lightning_compress.export.plan import UnpackedLayer, plan_layers
from lightning_compress.layout import STANDARD, WeightLayout, layout_of
from lightning_compress.lowrank.record import LowRankLayer
from lightning_compress.quantization import (
    ActivationRange,
    CompressionRecord,
    LayerRecord,
    QuantizedLayer,
    RecordSource,
    SharedLayer,
    pack_int4,
    unpack_int4,
)

FORMAT = "lightning-compress"
FORMAT_VERSION = 3  # the newest version this reads and writes
# The version each kind of layer needs (see the module docstring); integer layers need 1.
_KIND_VERSION = {"lowrank": 2, "shared": 3}
SPARSE_MAX_DENSITY = 0.5  # layers with at most this share of non-zero integers are stored sparse
_MAX_HEADER = 100 << 20
_DROPPED = " (its record is not stored)"  # appended to an unpacked layer's reason

log = logging.getLogger(__name__)


class ArtifactError(ValueError):
    """The file is not a readable lightning-compress artifact, or does not fit the model."""


# -- writing ------------------------------------------------------------------------------------


def _layout(module: nn.Module) -> WeightLayout:
    return layout_of(module) or STANDARD


def _record(
    model: nn.Module,
    qat: CompressionRecord | RecordSource | None,
    bits: int | None,
    layers: dict[str, nn.Module],
) -> CompressionRecord:
    """What to pack: the record QAT made (named as in ``model``), or post-training integers."""
    if qat is None:
        if bits is None:
            return CompressionRecord(())
        return CompressionRecord(
            QuantizedLayer.from_weight(
                f"{name}.weight",
                _layout(module).canonical(module.weight.detach().cpu()).contiguous(),
                bits,
            )
            for name, module in layers.items()
        )
    return _source_record(
        model,
        qat,
        "qat",
        "QATCallback",
        "integer weights: pass the QATCallback after trainer.fit (or after its attach() on a "
        "restored model), or the record its convert() returns",
    )


def _source_record(
    model: nn.Module,
    source: CompressionRecord | RecordSource,
    argument: str,
    callback: str,
    empty: str,
) -> CompressionRecord:
    """The record ``source`` is or holds, named as in ``model``; ``empty`` ends the error
    for a record without layers."""
    if isinstance(source, CompressionRecord):
        record = source
    elif isinstance(source, RecordSource):
        record = source.record
    else:
        raise TypeError(
            f"`{argument}` must be a {callback} or a CompressionRecord, got {type(source).__name__}"
        )
    if not record:
        raise ValueError(f"`{argument}` holds no {empty}")
    return record.relative_to(model)


def _lowrank_record(
    model: nn.Module, lowrank: CompressionRecord | RecordSource | None
) -> CompressionRecord:
    """The low-rank record, named as in ``model``, every layer of it one pack can store."""
    if lowrank is None:
        return CompressionRecord(())
    record = _source_record(
        model,
        lowrank,
        "lowrank",
        "LowRankCallback",
        "low-rank layers: pass the LowRankCallback after trainer.fit, or a CompressionRecord "
        "of LowRankLayer",
    )
    modules = dict(model.named_modules())
    for name, layer in record.items():
        if not isinstance(layer, LowRankLayer):
            raise TypeError(
                f"`lowrank` must hold LowRankLayer records, got a {type(layer).__name__} for "
                f"{name!r}"
            )
        module = modules.get(name.rpartition(".")[0])
        reason = None if module is None else unpackable_reason(module)
        if reason is not None:
            raise ValueError(
                f"`lowrank`: {name!r} cannot be packed as two factors: {reason}; low-rank "
                f"layers pack for nn.Linear, transformers' Conv1D and nn.Conv2d with groups=1"
            )
    return record


def _with_qat(layer: LowRankLayer, quantized: LayerRecord | None) -> LowRankLayer:
    """``layer`` taking, from the QAT record of the same weight, its bits where ``layer`` has
    none and its activation range."""
    if not isinstance(quantized, QuantizedLayer):
        return layer
    bits = quantized.bits if layer.bits is None else layer.bits
    return replace(layer, bits=bits, activation=layer.activation or quantized.activation)


def checksum(
    layers_json: str, tensors: dict[str, torch.Tensor], unpacked_json: str | None = None
) -> str:
    digest = hashlib.sha256(layers_json.encode())
    if unpacked_json is not None:  # absent from older artifacts, whose sums stay as they were
        digest.update(b"\0unpacked\0" + unpacked_json.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pack(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    qat: CompressionRecord | RecordSource | None = None,
    bits: int | None = 8,
    exclude: list[str] | None = None,
    lowrank: CompressionRecord | RecordSource | None = None,
) -> Path:
    """Writes ``model`` as a packed artifact and returns its path.

    Args:
        model: The trained model (a LightningModule or any nn.Module), pruned weights as zeros.
        path: File to write (``.safetensors``); written to a temporary name, then renamed.
        qat: The ``QATCallback`` that trained the model (its :attr:`record`), or a
            :class:`~lightning_compress.quantization.CompressionRecord` named as in ``model``
            or in a module ``model`` is part of: its integers, scales (BatchNorm folded) and
            activation ranges are stored, so the packed model computes what the fake-quantized
            model computed; a weight-sharing layer (``scheme="kmeans"``, a
            :class:`~lightning_compress.quantization.SharedLayer`) is stored as its codebook and
            Huffman-coded indices. Layers it did not quantize stay fp32.
        bits: Without ``qat``: per-channel post-training quantization of every packable layer to
            8 or 4 bits; None leaves them fp32. Low-rank layers are not affected: their
            record's bits decide.
        exclude: Module-name patterns to leave uncompressed.
        lowrank: The ``LowRankCallback`` that factored the model (its :attr:`record`), or a
            :class:`~lightning_compress.quantization.CompressionRecord` of
            :class:`~lightning_compress.lowrank.record.LowRankLayer`, named as ``qat`` is.
            Each layer in it is stored as its two factors, which replace the layer's weight
            (and its ``qat`` integers, where it has both): fp32 when the record's ``bits`` is
            None, else each factor quantized per row (output channel of the factor) to those
            bits. A layer with ``bits`` None that is also in the ``qat`` record takes that
            layer's QAT bits; it takes its QAT activation range in any case.

    Every weight-bearing layer that is not packed is listed, with the reason, in the
    artifact (``report`` shows it) and in an INFO log line; a layer the record quantized but
    that cannot be packed is also a WARNING, since the reloaded model computes it in fp32.

    Raises:
        ValueError: ``bits`` not 8, 4 or None; a ``qat`` or ``lowrank`` without layers; a
            ``model`` outside the module a record was taken from; a record kind no packer
            handles; integers not in their layer's canonical (out, in, *kernel) shape;
            low-rank factors whose product is not the layer's canonical (out, in * kernel)
            matrix, or of a layer with no packed kernel (a grouped convolution).
        TypeError: ``qat`` or ``lowrank`` neither a record nor something holding one; a
            ``lowrank`` record of something other than LowRankLayer.
    """
    if bits not in (None, 4, 8):
        raise ValueError(f"`bits` must be 8, 4 or None, got {bits!r}")
    plan = plan_layers(model, exclude)
    factors = _lowrank_record(model, lowrank)
    rest = {n: m for n, m in plan.packable.items() if f"{n}.weight" not in factors}
    record = _record(model, qat, bits, rest)
    tensors: dict[str, torch.Tensor] = {}
    table: list[dict[str, Any]] = []
    packed_keys: set[str] = set()
    unpacked = dict(plan.unpacked)
    for name, module in plan.packable.items():
        key = f"{name}.weight"
        layer = factors.get(key)
        if layer is not None:
            layer = _with_qat(layer, record.get(key) if qat is not None else None)
        else:
            layer = record.get(key)
        if layer is None:
            why = "`bits=None`" if qat is None else "not quantized by `qat`"
            unpacked[name] = UnpackedLayer(name, type(module).__name__, f"{why}: kept fp32")
            continue
        table.append(_packer(layer)(name, module, layer, tensors))
        packed_keys.update({f"{name}.weight", f"{name}.bias"})
    _note_dropped(dict.fromkeys([*record, *factors]), packed_keys, unpacked)
    for key, value in model.state_dict().items():
        if key not in packed_keys:
            # A copy: tied weights are two state entries over one storage, which safetensors
            # refuses to write as such.
            tensors[f"state/{key}"] = value.detach().cpu().clone().contiguous()
    rows = [unpacked[n] for n in plan.order if n in unpacked]
    layers_json = json.dumps(table, separators=(",", ":"))
    unpacked_json = json.dumps([asdict(r) for r in rows], separators=(",", ":"))
    metadata = {
        "format": FORMAT,
        "format_version": str(max((_KIND_VERSION.get(e["kind"], 1) for e in table), default=1)),
        "layers": layers_json,
        "unpacked": unpacked_json,
        "checksum": checksum(layers_json, tensors, unpacked_json),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(save_safetensors(tensors, metadata=metadata))
    tmp.replace(path)
    log.info(
        "pack: %d layers packed, %d weight-bearing layers kept fp32%s",
        len(table),
        len(rows),
        "".join(f"\n  {r.name} ({r.type}): {r.reason}" for r in rows),
    )
    return path


def _note_dropped(
    compressed: Iterable[str], packed_keys: set[str], unpacked: dict[str, UnpackedLayer]
) -> None:
    """Marks the unpacked layers whose weights the records compressed, and warns about them."""
    dropped = [name for name in compressed if name not in packed_keys]
    for name in dropped:
        owner = name.rpartition(".")[0]
        row = unpacked.get(owner)
        if row is not None and not row.reason.endswith(_DROPPED):
            unpacked[owner] = replace(row, reason=row.reason + _DROPPED)
    if dropped:
        log.warning(
            "pack: %d compressed weights of the record cannot be packed and are stored fp32 "
            "(the reloaded model computes them unquantized): %s",
            len(dropped),
            ", ".join(dropped),
        )


Packer = Callable[[str, nn.Module, Any, dict[str, torch.Tensor]], dict[str, Any]]
"""``(module name, module, layer record, tensors) -> layer table entry``; adds the tensors."""

PACKERS: dict[type[LayerRecord], Packer] = {}
R = TypeVar("R", bound=Packer)


def packer(kind: type[LayerRecord]) -> Callable[[R], R]:
    """Registers the function that stores one kind of layer record in the artifact."""

    def register(fn: R) -> R:
        PACKERS[kind] = fn
        return fn

    return register


def _packer(layer: LayerRecord) -> Packer:
    try:
        return PACKERS[type(layer)]
    except KeyError:
        raise ValueError(
            f"no packer for {layer.name!r}, a {type(layer).__name__} (kind {layer.kind!r}); "
            f"packers: {sorted(k.__name__ for k in PACKERS)}"
        ) from None


@packer(QuantizedLayer)
def _pack_integers(
    name: str, module: nn.Module, layer: QuantizedLayer, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Integers and per-channel scales, dense or Rice-coded sparse, int8 or nibble-packed int4.

    The integers are in the canonical (out, in, *kernel) order of the module's layout.
    """
    q2d = _canonical_matrix(module, layer, layer.values, "integers")
    prefix = f"packed/{name}/"
    flat = q2d.reshape(-1)
    nz = flat.nonzero().reshape(-1)
    sparse = nz.numel() <= SPARSE_MAX_DENSITY * max(flat.numel(), 1)
    kind = packed_kind(module)
    entry = _entry(name, module, kind, q2d.shape)
    entry.update(
        bits=layer.bits,
        layout="sparse" if sparse else "dense",
        nnz=int(nz.numel()),
        bias=module.bias is not None,
    )
    if kind == "conv2d":
        entry["conv"] = conv_params(module)
    values = flat[nz] if sparse else flat
    tensors[prefix + ("values" if sparse else "qweight")] = _stored(values, layer.bits)
    if sparse:
        _store_positions(prefix, nz, entry, tensors)
    tensors[prefix + "scale"] = layer.scale.float().contiguous().cpu()
    if module.bias is not None:
        tensors[prefix + "bias"] = module.bias.detach().float().contiguous().cpu()
    entry["act"] = _act_entry(layer.activation)
    return entry


@packer(SharedLayer)
def _pack_shared(
    name: str, module: nn.Module, layer: SharedLayer, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """A codebook per group of output channels and one index per surviving weight.

    The indices of the weights ``layer.mask`` keeps, row-major in the canonical (out, in,
    *kernel) order, are Huffman-coded (:mod:`lightning_compress.export.entropy`); their
    positions are Rice-coded as a sparse integer layer's are, unless every weight survived
    (layout ``"dense"``).
    """
    indices = _canonical_matrix(module, layer, layer.indices, "indices")
    mask = layer.mask.reshape(indices.shape)
    prefix = f"packed/{name}/"
    nz = mask.reshape(-1).nonzero().reshape(-1)
    sparse = nz.numel() < mask.numel()
    entry = _entry(name, module, "shared", indices.shape)
    entry.update(
        bits=layer.bits,
        groups=layer.groups,
        layout="sparse" if sparse else "dense",
        nnz=int(nz.numel()),
        bias=module.bias is not None,
    )
    if packed_kind(module) == "conv2d":
        entry["conv"] = conv_params(module)
    tensors[prefix + "codebook"] = layer.codebook.detach().float().cpu().contiguous()
    tensors[prefix + "indices"] = entropy.encode(indices.reshape(-1)[nz], 2**layer.bits)
    if sparse:
        _store_positions(prefix, nz, entry, tensors)
    if module.bias is not None:
        tensors[prefix + "bias"] = module.bias.detach().float().contiguous().cpu()
    entry["act"] = _act_entry(layer.activation)
    return entry


def _canonical_matrix(
    module: nn.Module, layer: LayerRecord, values: torch.Tensor, what: str
) -> torch.Tensor:
    """A record's per-weight ``values`` as the (out, in * kernel) matrix, checked to have the
    weight's canonical (out, in, *kernel) shape."""
    canonical = _layout(module).canonical_shape(tuple(module.weight.shape))
    if tuple(values.shape) != canonical:
        raise ValueError(
            f"{layer.name}: the record's {what} have shape {tuple(values.shape)}, the "
            f"weight's canonical (out, in, *kernel) shape is {canonical} (weight "
            f"{tuple(module.weight.shape)} of a {type(module).__name__})"
        )
    return values.reshape(values.shape[0], -1)


def _entry(name: str, module: nn.Module, kind: str, shape: torch.Size) -> dict[str, Any]:
    """The layer table fields every kind has: what the module is and its canonical matrix."""
    layout = _layout(module)
    return {
        "name": name,
        "kind": kind,
        "module": type(module).__name__,
        "weight_shape": list(module.weight.shape),
        "axes": [layout.out_axis, layout.in_axis],
        "shape": list(shape),
    }


def _store_positions(
    prefix: str, nz: torch.Tensor, entry: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Rice-codes the flat positions ``nz`` (:mod:`lightning_compress.export.positions`)."""
    unary, low, k, unary_bits = positions.encode(nz)
    tensors[prefix + "unary"], tensors[prefix + "low"] = unary, low
    entry.update(k=k, unary_bits=unary_bits)


@packer(LowRankLayer)
def _pack_factors(
    name: str, module: nn.Module, layer: LowRankLayer, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """The two factors of the canonical (out, in * kernel) matrix, dense: fp32, or each
    quantized per row (one scale per output channel of the factor) at the record's bits."""
    matrix = _matrix_shape(module)
    product = (int(layer.first.shape[0]), int(layer.second.shape[1]))
    if product != matrix:
        raise ValueError(
            f"{layer.name}: the low-rank factors {tuple(layer.first.shape)} @ "
            f"{tuple(layer.second.shape)} make a {product} matrix, the weight's canonical "
            f"(out, in * kernel) matrix is {matrix} (weight {tuple(module.weight.shape)} of a "
            f"{type(module).__name__})"
        )
    entry = _entry(name, module, "lowrank", matrix)
    entry.update(rank=layer.rank, bits=layer.bits, bias=module.bias is not None)
    if packed_kind(module) == "conv2d":
        entry["conv"] = conv_params(module)
    prefix = f"packed/{name}/"
    for part, factor in (("first", layer.first), ("second", layer.second)):
        if layer.bits is None:
            tensors[f"{prefix}{part}/weight"] = factor.detach().float().cpu().contiguous()
            continue
        q = QuantizedLayer.from_weight(f"{layer.name}.{part}", factor.detach().float(), layer.bits)
        tensors[f"{prefix}{part}/qweight"] = _stored(q.values.reshape(-1), layer.bits)
        tensors[f"{prefix}{part}/scale"] = q.scale.float().contiguous()
    if module.bias is not None:
        tensors[prefix + "bias"] = module.bias.detach().float().contiguous().cpu()
    entry["act"] = _act_entry(layer.activation)
    return entry


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """The (out, in * kernel) shape of the module's weight in its canonical order."""
    out, *rest = _layout(module).canonical_shape(tuple(module.weight.shape))
    return out, math.prod(rest)


def _stored(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat int8 integers as the artifact stores them: int8, or two per byte up to 4 bits."""
    return pack_int4(values) if _container(bits) == 4 else values.contiguous()


def _act_entry(act: ActivationRange | None) -> dict[str, Any] | None:
    if act is None:
        return None
    return {"scale": act.scale, "zero_point": act.zero_point, "bits": act.bits}


def _container(bits: int) -> int:
    """The stored width of ``bits``-bit integers: 4 (nibbles) up to 4 bits, else 8."""
    return 4 if bits <= 4 else 8


# -- reading ------------------------------------------------------------------------------------


@dataclass
class Artifact:
    """A verified artifact: its layer table, tensors and the layers it kept fp32.

    ``unpacked`` is None for artifacts written before pack listed them.
    """

    path: Path
    size: int
    version: int
    layers: list[dict[str, Any]]
    tensors: dict[str, torch.Tensor]
    unpacked: list[UnpackedLayer] | None = None


def read(path: str | os.PathLike) -> Artifact:
    """Reads and verifies an artifact (format, version, checksum); nothing is unpickled.

    Raises:
        ArtifactError: Unreadable, truncated, foreign, newer-version or corrupted file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"{path}: cannot read the artifact: {err}") from None
    if len(data) < 8:
        raise ArtifactError(f"{path}: not a safetensors artifact ({len(data)} bytes, truncated?)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, _MAX_HEADER):
        raise ArtifactError(
            f"{path}: not a safetensors artifact (header of {header_len} bytes in a file of "
            f"{len(data)}): truncated, or another format such as a pickle/torch.save file"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
        meta = header.get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise ArtifactError(f"{path}: corrupted safetensors header") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}: not a lightning-compress artifact (a safetensors file without the "
            f"'{FORMAT}' format tag; write artifacts with lightning_compress.export.pack)"
        )
    try:
        version = int(meta["format_version"])
        layers = json.loads(meta["layers"])
        stored_sum = str(meta["checksum"])
        unpacked_json = meta.get("unpacked")
        unpacked = None if unpacked_json is None else json.loads(unpacked_json)
    except (KeyError, ValueError, TypeError):
        raise ArtifactError(f"{path}: corrupted artifact metadata") from None
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version} is newer than this lightning-compress "
            f"reads ({FORMAT_VERSION}); upgrade lightning-compress"
        )
    if version < 1 or not isinstance(layers, list):
        raise ArtifactError(f"{path}: corrupted artifact metadata (version {version})")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"{path}: corrupted or truncated tensor data: {err}") from None
    if checksum(meta["layers"], tensors, unpacked_json) != stored_sum:
        raise ArtifactError(f"{path}: checksum mismatch, the file is corrupted")
    try:
        rows = None if unpacked is None else [_unpacked_row(row) for row in unpacked]
    except (KeyError, TypeError, AttributeError):
        raise ArtifactError(f"{path}: corrupted list of unpacked layers") from None
    return Artifact(path, len(data), version, layers, tensors, rows)


def _unpacked_row(row: dict[str, Any]) -> UnpackedLayer:
    return UnpackedLayer(str(row["name"]), str(row.get("type", "")), str(row.get("reason", "")))


def _decode_layer(entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The layer's integers [N, K], scale, bias and container bits from its tensors (validated)."""
    prefix = f"packed/{entry['name']}/"
    n, k = (int(v) for v in entry["shape"])
    bits = int(entry["bits"])
    if not 2 <= bits <= 8:
        raise ValueError(f"unsupported weight bits {bits} (2 to 8 are read)")
    container = _container(bits)
    nnz = int(entry["nnz"])
    sparse = entry["layout"] == "sparse"
    count = nnz if sparse else n * k
    stored = tensors[prefix + ("values" if sparse else "qweight")]
    want = (count + 1) // 2 if container == 4 else count
    dtype = torch.uint8 if container == 4 else torch.int8
    if stored.dtype != dtype or stored.numel() != want:
        raise ValueError(
            f"weight values have the wrong dtype or size ({stored.dtype}, {stored.numel()})"
        )
    values = unpack_int4(stored, (count,)) if container == 4 else stored
    if sparse:
        flat = _decode_positions(entry, tensors, nnz, n * k)
        q = torch.zeros(n * k, dtype=torch.int8)
        q[flat] = values
        q = q.view(n, k)
    else:
        q = values.reshape(n, k)
    scale = tensors[prefix + "scale"]
    if scale.dtype != torch.float32 or scale.shape != (n,):
        raise ValueError("scale must be float32 [out_features]")
    bias = tensors.get(prefix + "bias")
    if entry["bias"] != (bias is not None) or (bias is not None and bias.shape != (n,)):
        raise ValueError("bias does not match the layer table")
    return {"q": q, "scale": scale, "bias": bias, "bits": container, "sparse": sparse}


def _decode_positions(
    entry: dict[str, Any], tensors: dict[str, torch.Tensor], count: int, numel: int
) -> torch.Tensor:
    """The ``count`` Rice-coded flat positions of a sparse entry, each below ``numel``."""
    prefix = f"packed/{entry['name']}/"
    return positions.decode(
        tensors[prefix + "unary"],
        tensors[prefix + "low"],
        int(entry["k"]),
        int(entry["unary_bits"]),
        count,
        numel,
    )


def _decode_shared(entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A weight-sharing layer's weight [N, K] (each survivor its centroid, exactly) and bias.

    Everything is checked against the layer table: the bits, the codebook's groups and size,
    the coded stream (:func:`lightning_compress.export.entropy.decode`), that every index lies
    in the codebook, the positions, and the bias.
    """
    prefix = f"packed/{entry['name']}/"
    n, k = (int(v) for v in entry["shape"])
    bits, groups, nnz = int(entry["bits"]), int(entry["groups"]), int(entry["nnz"])
    if not 1 <= bits <= 8:
        raise ValueError(f"unsupported index bits {bits} (1 to 8 are read)")
    levels = 2**bits
    if not 1 <= groups <= n or n % groups:
        raise ValueError(f"{groups} codebook groups do not divide the {n} output channels")
    codebook = tensors[prefix + "codebook"]
    if codebook.dtype != torch.float32 or tuple(codebook.shape) != (groups, levels):
        raise ValueError(
            f"codebook is {codebook.dtype} {list(codebook.shape)}, the table ({bits} bits, "
            f"{groups} groups) says float32 {[groups, levels]}"
        )
    sparse = entry["layout"] == "sparse"
    if not 0 <= nnz <= n * k or (not sparse and nnz != n * k):
        raise ValueError(f"{nnz} surviving weights do not fit a {entry['layout']} [{n}, {k}]")
    try:
        index = entropy.decode(tensors[prefix + "indices"], count=nnz).long()
    except ValueError as err:
        raise ValueError(f"indices: {err}") from None
    if nnz and int(index.max()) >= levels:
        raise ValueError(
            f"indices point past the codebook's {levels} entries (index {int(index.max())})"
        )
    flat = _decode_positions(entry, tensors, nnz, n * k) if sparse else torch.arange(n * k)
    group = torch.div(flat, k, rounding_mode="floor") // (n // groups)
    weight = torch.zeros(n * k, dtype=torch.float32)
    weight[flat] = codebook[group, index]
    indices = torch.zeros(n * k, dtype=torch.uint8)
    indices[flat] = index.to(torch.uint8)
    mask = torch.zeros(n * k, dtype=torch.bool)
    mask[flat] = True
    bias = tensors.get(prefix + "bias")
    if entry["bias"] != (bias is not None) or (bias is not None and bias.shape != (n,)):
        raise ValueError("bias does not match the layer table")
    return {
        "weight": weight.view(n, k),
        "bias": bias,
        "codebook": codebook,
        "indices": indices.view(n, k),
        "mask": mask.view(n, k),
    }


def load_into(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    example: Any = None,
    exact: bool = False,
    latency: LatencyTable | None = None,
) -> nn.Module:
    """Swaps ``model``'s packed layers for inference modules and loads every weight.

    The model must have the architecture that was packed. Everything is read, verified and
    decoded before the model is touched: on any error it is left exactly as it was.

    Args:
        model: The network the artifact was packed from (its architecture).
        path: The artifact.
        batch_size: The batch the model will serve. Given, each packed layer gets the
            implementation measured fastest on this machine for its shape, sparsity and that
            batch (:mod:`lightning_compress.export.latency`): one whose fp32 product is fastest
            computes in fp32 from its dequantized weight, the artifact being the same. None:
            every layer runs the compiled kernels with fp32 activations. Either way a
            weight-sharing layer is decoded once, each weight its centroid, into the plain
            float layer (a packed module in its fp32 implementation where its outputs were
            trained 8-bit), so it computes with the codebook's exact values.
        example: An input of ``model`` (a tensor, a tuple of positional arguments or a dict of
            keyword arguments), run once in eval mode to learn each packed layer's input shape
            (sequence lengths, image sizes); the first dimension is taken as the batch. Needed
            for convolutions; without it a linear layer's input is ``[batch_size, in]``.
        exact: Only implementations that compute what was trained (fp32 activations);
            otherwise layers may also quantize their activations to 8 bits per row, as torch's
            and ONNX Runtime's dynamic int8 do, where that is faster.
        latency: The table of measurements to use and extend; default: the on-disk cache
            (:func:`~lightning_compress.export.latency.default_path`).

    Returns:
        ``model`` itself, now running the compiled kernels. With ``batch_size``, each packed
        layer's ``impl`` names its implementation, ``latency_ms`` the milliseconds measured
        (or, by a predicting table, predicted) for each candidate, and ``latency_spec`` the
        :class:`~lightning_compress.export.latency.LayerSpec` they are for.

    Raises:
        ArtifactError: A bad file, or a model whose layers or state do not match it.
        ValueError: ``batch_size`` below 1; a convolution to time without ``example``; an
            ``example`` the model cannot run.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1 or None, got {batch_size}")
    art = read(path)
    where = art.path
    modules = dict(model.named_modules())
    state = model.state_dict(keep_vars=True)
    replacements: dict[str, nn.Module] = {}
    covered: set[str] = set()
    try:
        for entry in art.layers:
            name = entry["name"]
            module = modules.get(name)
            _check_fits(where, name, module, entry)
            try:
                new = _packed_module(entry, art.tensors, module)
            except (KeyError, ValueError, RuntimeError) as err:
                raise ArtifactError(f"{where}: layer {name!r} is corrupted: {err}") from None
            new.train(module.training)
            replacements[name] = new
            covered.update({f"{name}.weight", f"{name}.bias"})
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"{where}: corrupted layer table ({err!r})") from None
    stored = {k[len("state/") :]: v for k, v in art.tensors.items() if k.startswith("state/")}
    expected = {k for k in state if k not in covered}
    if set(stored) != expected:
        missing, extra = sorted(expected - set(stored)), sorted(set(stored) - expected)
        raise ArtifactError(
            f"{where}: the model does not match the artifact (in the model only: {missing[:5]}; "
            f"in the artifact only: {extra[:5]})"
        )
    for key, value in stored.items():
        if state[key].shape != value.shape or state[key].dtype != value.dtype:
            raise ArtifactError(
                f"{where}: {key!r} is {state[key].dtype} {list(state[key].shape)} in the model, "
                f"{value.dtype} {list(value.shape)} in the artifact"
            )
    if batch_size is not None:
        shapes = layer_input_shapes(model, example, [e["name"] for e in art.layers], batch_size)
        table = latency if latency is not None else LatencyTable(default_path())
        # Packed weights beyond the last-level cache are read from memory by every layer.
        packed_bytes = sum(
            t.numel() * t.element_size() for k, t in art.tensors.items() if k.startswith("packed/")
        )
        cold = packed_bytes > cache_bytes()
        for entry in art.layers:
            if entry["kind"] not in _SINGLE_IMPLEMENTATION:
                name = entry["name"]
                replacements[name] = _fastest(
                    entry,
                    art.tensors,
                    modules[name],
                    shapes.get(name),
                    batch_size,
                    exact,
                    table,
                    cold,
                )
    # Verified: from here on nothing can fail.
    with torch.no_grad():
        for key, value in stored.items():
            state[key].copy_(value)
    for name, new in replacements.items():
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, new.to(_device_of(modules[name])))
    return model


def layer_input_shapes(
    model: nn.Module, example: Any, names: list[str], batch_size: int
) -> dict[str, tuple[int, ...]]:
    """Each named layer's input shape in one eval-mode forward of ``example`` (batch dimension
    set to ``batch_size``); empty without an example."""
    if example is None:
        return {}
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            shapes.setdefault(name, (batch_size, *args[0].shape[1:]))

        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names if n in modules]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            run_example(model, example)
    except Exception as err:
        raise ValueError(f"`example` does not run through the model: {err}") from err
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return shapes


def _fastest(
    entry: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    module: nn.Module,
    shape: tuple[int, ...] | None,
    batch_size: int,
    exact: bool,
    table: LatencyTable,
    cold: bool,
) -> nn.Module:
    """The inference module of ``entry`` in the implementation measured fastest on ``shape``
    (with the cache flushed before every call where ``cold``)."""
    name, kind = entry["name"], entry["kind"]
    n, k = (int(v) for v in entry["shape"])
    shared = kind == "shared"
    if shape is None:
        if kind == "conv2d" or "conv" in entry:
            raise ValueError(
                f"layer {name!r} is a convolution: pass `example` (an input of the model) so "
                "that its input size is known"
            )
        shape = (batch_size, k)
    layer = LayerSpec(
        kind,
        n,
        k,
        int(entry["bits"]),
        int(entry["nnz"]) / max(n * k, 1),
        entry.get("act") is not None,
        tuple(shape),
        None if entry.get("conv") is None else json.dumps(entry["conv"], sort_keys=True),
        cold,
    )

    def build(impl: str) -> Callable[[], nn.Module]:
        return lambda: _packed_module(entry, tensors, module, impl).eval()

    if shared:  # both compute with the codebook's exact values
        impls = SHARED_IMPLEMENTATIONS if "conv" not in entry else ("fp32",)
    else:
        impls = implementations(k, exact)
    candidates = {impl: build(impl) for impl in impls}
    best, times = choose(table, layer, candidates, lambda: torch.randn(*shape))
    new = build(best)()
    if best == "fp32" and entry.get("act") is None and not shared:
        new = _float_module(module, new)
    new.train(module.training)
    new.impl = best
    new.latency_ms = times
    new.latency_spec = layer
    return new


def _float_module(module: nn.Module, packed: nn.Module) -> nn.Module:
    """A copy of ``module`` holding ``packed``'s dequantized weight: the layer fp32 runs fastest
    as itself, without a packed module's call in between."""
    return _plain_module(module, packed.weight, packed.bias)


def _plain_module(module: nn.Module, matrix: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A copy of ``module`` whose weight is the canonical (out, in * kernel) ``matrix``."""
    plain = copy.deepcopy(module)
    layout = _layout(module)
    with torch.no_grad():
        plain.weight = nn.Parameter(layout.from_matrix(matrix, module.weight.shape))
        if module.bias is not None:
            plain.bias = nn.Parameter(bias.clone())
    return plain


# How a weight-sharing layer computes (the ``impl`` of :func:`_shared_module`):
#   fp32  the weight decoded once at load (each weight its centroid) in the plain float layer
#   lut   linear layers: compressed rows of indices and the codebook (``SharedLinear``)
SHARED_IMPLEMENTATIONS = ("fp32", "lut")
# Kinds with one implementation, which load_into(batch_size=) does not time.
_SINGLE_IMPLEMENTATION = ("lowrank",)


def _shared_module(
    entry: dict[str, Any], tensors: dict[str, torch.Tensor], module: nn.Module, impl: str = "fp32"
) -> nn.Module:
    """The inference module of a weight-sharing layer, computing with the codebook's values.

    Args:
        entry: The layer's table entry (kind ``"shared"``).
        tensors: The artifact's tensors.
        module: The layer it replaces (its architecture).
        impl: One of :data:`SHARED_IMPLEMENTATIONS`.

    Raises:
        ValueError: An unknown ``impl``; a corrupted layer (:func:`_decode_shared`).
    """
    if impl not in SHARED_IMPLEMENTATIONS:
        raise ValueError(
            f"`impl` must be one of {SHARED_IMPLEMENTATIONS} for a weight-sharing layer, "
            f"got {impl!r}"
        )
    parts = _decode_shared(entry, tensors)
    weight, bias = parts["weight"], parts["bias"]
    act = entry.get("act")
    if impl == "lut":
        if "conv" in entry:
            raise ValueError("`impl` 'lut' computes linear layers; a convolution runs 'fp32'")
        return SharedLinear(parts["codebook"], parts["indices"], parts["mask"], bias, act)
    if act is None:
        return _plain_module(module, weight, bias)
    # Trained with 8-bit outputs: the packed module's fp32 path, which fake-quantizes its output
    # with the recorded range, holding the decoded weight.
    conv = "conv" in entry
    cls = PackedConv2d if conv else PackedLinear
    extra = {"conv": entry["conv"]} if conv else {}
    n, k = weight.shape
    ones = torch.ones(n, dtype=torch.float32)
    new = cls(torch.zeros(n, k, dtype=torch.int8), ones, bias, 8, False, act, impl="fp32", **extra)
    new.weight.copy_(weight)
    return new


def _packed_module(
    entry: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    module: nn.Module,
    impl: str = "kernel",
) -> nn.Module:
    """The inference module of one layer table entry (validated against ``module``'s shape)."""
    if entry["kind"] == "lowrank":
        return _lowrank_module(entry, tensors, _matrix_shape(module))
    if entry["kind"] == "shared":
        return _shared_module(entry, tensors, module, "fp32" if impl == "kernel" else impl)
    parts = _decode_layer(entry, tensors)
    conv = entry["kind"] == "conv2d"
    cls = PackedConv2d if conv else PackedLinear
    extra = {"conv": entry["conv"]} if conv else {}
    return cls(
        parts["q"],
        parts["scale"],
        parts["bias"],
        parts["bits"],
        parts["sparse"],
        entry.get("act"),
        impl=impl,
        **extra,
    )


def _lowrank_module(
    entry: dict[str, Any], tensors: dict[str, torch.Tensor], matrix: tuple[int, int]
) -> PackedLowRank:
    """A low-rank layer's factors, checked against the table and the module's matrix."""
    name = entry["name"]
    n, k = (int(v) for v in entry["shape"])
    rank, bits = int(entry["rank"]), entry["bits"]
    if (n, k) != matrix or rank < 1:
        raise ValueError(
            f"the table's matrix {[n, k]} at rank {rank} does not fit the layer's canonical "
            f"(out, in * kernel) matrix {list(matrix)}"
        )
    shapes = {"first": (n, rank), "second": (rank, k)}
    if bits is None:
        first, second = (tensors[f"packed/{name}/{part}/weight"] for part in shapes)
        for part, factor in (("first", first), ("second", second)):
            if factor.dtype != torch.float32 or tuple(factor.shape) != shapes[part]:
                raise ValueError(
                    f"factor {part!r} is {factor.dtype} {list(factor.shape)}, the table (rank "
                    f"{rank}) says float32 {list(shapes[part])}"
                )
        scales = None
    else:
        # Each factor is a dense integer matrix, stored as an integer layer's would be.
        decoded = {}
        for part, (rows, cols) in shapes.items():
            factor = {"name": f"{name}/{part}", "shape": [rows, cols], "bits": bits}
            factor.update(nnz=rows * cols, layout="dense", bias=False)
            try:
                decoded[part] = _decode_layer(factor, tensors)
            except (KeyError, ValueError) as err:
                raise ValueError(f"factor {part!r} (rank {rank} in the table): {err}") from None
        first, second = decoded["first"]["q"], decoded["second"]["q"]
        scales = (decoded["first"]["scale"], decoded["second"]["scale"])
        bits = decoded["first"]["bits"]
    bias = tensors.get(f"packed/{name}/bias")
    if entry["bias"] != (bias is not None) or (bias is not None and bias.shape != (n,)):
        raise ValueError("bias does not match the layer table")
    return PackedLowRank(
        first, second, bias, bits, scales, conv=entry.get("conv"), act=entry.get("act")
    )


def _base_kind(entry: dict[str, Any]) -> str:
    """The packed kind of the module an entry replaces: "conv2d" or "linear"."""
    if entry["kind"] in ("lowrank", "shared"):
        return "conv2d" if "conv" in entry else "linear"
    return entry["kind"]


def _check_fits(where: Path, name: str, module: nn.Module | None, entry: dict[str, Any]) -> None:
    """Raises unless ``module`` has the kind, layout, shape and geometry ``entry`` came from."""
    reason = None if module is None else unpackable_reason(module)
    kind = _base_kind(entry)
    if module is None or reason is not None or packed_kind(module) != kind:
        found = "nothing" if module is None else type(module).__name__
        what = {"lowrank": f"low-rank {kind}", "shared": f"weight-sharing {kind}"}.get(
            entry["kind"], kind
        )
        raise ArtifactError(
            f"{where}: layer {name!r} is a {what} in the artifact, {found} in the model"
            + (f" ({reason})" if reason else "")
        )
    if list(module.weight.shape) != list(entry["weight_shape"]):
        raise ArtifactError(
            f"{where}: layer {name!r} has weight {list(module.weight.shape)} in the model, "
            f"{entry['weight_shape']} in the artifact"
        )
    # A square Conv1D and a Linear have the same weight shape but transposed integers.
    layout = _layout(module)
    axes = [layout.out_axis, layout.in_axis]
    if axes != list(entry.get("axes", [0, 1])):
        raise ArtifactError(
            f"{where}: layer {name!r} keeps its weight's (out, in) on axes {axes} in the model "
            f"({type(module).__name__}), {entry.get('axes')} in the artifact "
            f"({entry.get('module', 'unknown')})"
        )
    if (module.bias is not None) != bool(entry["bias"]):
        raise ArtifactError(f"{where}: layer {name!r}: bias presence differs from the artifact")
    if kind == "conv2d" and conv_params(module) != entry["conv"]:
        raise ArtifactError(
            f"{where}: layer {name!r}: convolution geometry differs from the artifact"
        )


def _device_of(module: nn.Module) -> torch.device:
    return module.weight.device


# -- report -------------------------------------------------------------------------------------


@dataclass
class LayerRow:
    """One packed layer of a :class:`Report`.

    ``bits`` is 32 for fp32 low-rank factors and the index bits of a weight-sharing layer;
    ``rank`` is set for low-rank layers only, whose ``fp32_bytes`` are those of the dense fp32
    weight (and bias) the factors replace. ``bits_per_weight`` is what the weight costs in the
    file (its bytes, positions, scales or codebook included, bias excluded) per entry of the
    dense weight. Weight-sharing layers only: ``codebook`` is (groups, entries per group),
    ``index_entropy`` the empirical entropy of the stored indices and ``index_bits`` their coded
    size (the whole stream, its header included), both in bits per index.
    """

    name: str
    kind: str
    layout: str
    bits: int
    sparsity: float
    bytes: int
    fp32_bytes: int
    type: str = ""
    rank: int | None = None
    bits_per_weight: float = 0.0
    codebook: tuple[int, int] | None = None
    index_entropy: float | None = None
    index_bits: float | None = None


@dataclass
class Report:
    """Per-layer sizes of an artifact, its totals against the fp32 model, and what stayed fp32.

    ``unpacked`` lists every weight-bearing layer that was not packed, with the reason; None for
    an artifact written before pack recorded them. ``latency``: where ``report`` was given the
    loaded model and an input, each packed layer's predicted and measured milliseconds and the
    whole model's.
    """

    path: Path
    file_bytes: int
    fp32_bytes: int
    layers: list[LayerRow]
    other_bytes: int
    unpacked: list[UnpackedLayer] | None = None
    latency: ModelLatency | None = None

    @property
    def ratio(self) -> float:
        """fp32 bytes over the file's bytes."""
        return self.fp32_bytes / max(self.file_bytes, 1)

    def __str__(self) -> str:
        width = max([24, *(len(r.name) for r in self.layers)])
        types = max([6, *(len(r.type) for r in self.layers)])
        lines = [
            f"{'layer':<{width}} {'module':<{types}} {'kind':<7} {'layout':<7} {'bits':>4} "
            f"{'rank':>5} {'sparsity':>9} {'bytes':>10} {'fp32 bytes':>11} {'bits/w':>7}"
        ]
        for r in self.layers:
            rank = "-" if r.rank is None else str(r.rank)
            lines.append(
                f"{r.name:<{width}} {r.type:<{types}} {r.kind:<7} {r.layout:<7} {r.bits:>4} "
                f"{rank:>5} {100 * r.sparsity:8.2f}% {r.bytes:>10,} {r.fp32_bytes:>11,} "
                f"{r.bits_per_weight:7.3f}"
            )
        other = "other state (fp32 as stored)"
        lines.append(f"{other:<{width + types + 38}} {self.other_bytes:>10,}")
        lines += _shared_lines(self.layers)
        lines += _kept_lines(self.unpacked)
        # A tiny model's file (header, positions, scales) can outweigh its fp32 tensors.
        size = (
            f"{self.ratio:.1f}x smaller"
            if self.ratio >= 1
            else f"{1 / max(self.ratio, 1e-12):.1f}x larger"
        )
        lines.append(
            f"file {self.path.name}: {self.file_bytes:,} bytes on disk; fp32 tensors "
            f"{self.fp32_bytes:,} bytes; {size}"
        )
        if self.latency is not None:
            lines += ["latency (predicted by the latency table, measured in the model):"]
            lines += str(self.latency).splitlines()
        return "\n".join(lines)


def _shared_lines(layers: list[LayerRow]) -> list[str]:
    shared = [r for r in layers if r.codebook is not None]
    if not shared:
        return []
    names = max(len(r.name) for r in shared)
    lines = [f"weight-sharing layers: {len(shared)} (index entropy against coded size, bits/index)"]
    for r in shared:
        groups, entries = r.codebook
        lines.append(
            f"  {r.name:<{names}}  codebook {groups} x {entries}  entropy {r.index_entropy:.3f}"
            f"  coded {r.index_bits:.3f}  ({r.bits_per_weight:.3f} bits/weight)"
        )
    return lines


def _kept_lines(unpacked: list[UnpackedLayer] | None) -> list[str]:
    if unpacked is None:
        return ["layers kept fp32: not recorded (an artifact from an older version)"]
    names = max((len(u.name) for u in unpacked), default=0)
    types = max((len(u.type) for u in unpacked), default=0)
    return [f"layers kept fp32: {len(unpacked)}"] + [
        f"  {u.name:<{names}}  {u.type:<{types}}  {u.reason}" for u in unpacked
    ]


def report(
    path: str | os.PathLike, model: nn.Module | None = None, example: Any = None, reps: int = 7
) -> Report:
    """Reads an artifact and tabulates, per layer, layout, bits, bits per weight, sparsity and
    bytes (for a low-rank layer its rank, and the dense fp32 bytes its factors replace; for a
    weight-sharing layer its codebook size and the entropy of its indices against their coded
    size), and the weight-bearing layers kept fp32 with the reason.

    Args:
        path: The artifact.
        model: The model ``load_into(..., batch_size=...)`` loaded from it: with ``example``,
            the report also gives each packed layer's implementation and its predicted and
            measured milliseconds, and the whole model's
            (:func:`~lightning_compress.export.latency.model_latency`).
        example: An input of ``model`` (a tensor, a tuple or a dict of keyword arguments).
        reps: Timed forwards of ``model``.

    Raises:
        ArtifactError: As :func:`read`; a weight-sharing layer whose coded indices do not
            decode.
        ValueError: ``model`` without ``example`` or the other way round; a ``model`` that was
            not loaded with ``batch_size``.
    """
    if (model is None) != (example is None):
        raise ValueError("pass both `model` and `example` for the latency columns, or neither")
    art = read(path)
    rows = []
    fp32 = 0
    for entry in art.layers:
        prefix = f"packed/{entry['name']}/"
        sizes = {
            k: t.numel() * t.element_size() for k, t in art.tensors.items() if k.startswith(prefix)
        }
        nbytes = sum(sizes.values())
        n, k = entry["shape"]
        dense = n * k * 4 + (n * 4 if entry["bias"] else 0)
        fp32 += dense
        lowrank = entry["kind"] == "lowrank"
        if lowrank:
            bits = 32 if entry["bits"] is None else int(entry["bits"])
            layout, sparsity, rank = "dense", 0.0, int(entry["rank"])
        else:
            bits, layout, rank = int(entry["bits"]), entry["layout"], None
            sparsity = 1.0 - int(entry["nnz"]) / max(n * k, 1)
        weight_bits = 8 * (nbytes - sizes.get(prefix + "bias", 0)) / max(n * k, 1)
        row = LayerRow(
            entry["name"],
            entry["kind"],
            layout,
            bits,
            sparsity,
            nbytes,
            dense,
            entry.get("module", ""),
            rank,
            weight_bits,
        )
        if entry["kind"] == "shared":
            _index_statistics(art.path, entry, art.tensors[prefix + "indices"], row)
        rows.append(row)
    other = [t for k, t in art.tensors.items() if k.startswith("state/")]
    other_bytes = sum(t.numel() * t.element_size() for t in other)
    fp32 += sum(t.numel() * 4 for t in other)
    timed = None if model is None else model_latency(model, example, reps)
    return Report(art.path, art.size, fp32, rows, other_bytes, art.unpacked, timed)


def _index_statistics(
    where: Path, entry: dict[str, Any], stream: torch.Tensor, row: LayerRow
) -> None:
    """Fills a weight-sharing row's codebook size, index entropy and coded bits per index."""
    levels = 2 ** int(entry["bits"])
    try:
        index = entropy.decode(stream, count=int(entry["nnz"]))
    except ValueError as err:
        raise ArtifactError(f"{where}: layer {entry['name']!r} is corrupted: {err}") from None
    row.codebook = (int(entry["groups"]), levels)
    row.index_entropy = entropy.entropy(index, levels)
    row.index_bits = 8 * stream.numel() / max(index.numel(), 1)
