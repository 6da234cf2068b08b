"""The packed artifact: one safetensors file holding exactly what the compressed weights need.

Tensors:

- ``packed/<layer>/values``   the non-zero integers of a sparse layer, row-major: int8, or for
  4 bits uint8 with two per byte (low nibble first); ``packed/<layer>/qweight`` for a dense
  layer (int8 [N*K], or the same nibble packing);
- ``packed/<layer>/unary`` and ``packed/<layer>/low``  the Rice-coded positions of a sparse
  layer (:mod:`lightning_compress.export.positions`);
- ``packed/<layer>/scale`` float32 [N] per output channel, ``packed/<layer>/bias`` float32 [N];
- ``state/<key>``  every other entry of the model's state dict, as it was (BatchNorm statistics,
  embeddings, layers left uncompressed in fp32).

The safetensors header's ``__metadata__`` (strings only) holds ``format``
(``"lightning-compress"``), ``format_version``, ``layers`` (a JSON table: name, kind, module type,
the module's weight shape and its (out, in) axes, the canonical matrix shape, bits, layout,
counts, convolution geometry, activation range), ``unpacked`` (a JSON list of every other
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
new record class and one packer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from lightning_compress.export import positions
from lightning_compress.export.modules import (
    PackedConv2d,
    PackedLinear,
    conv_params,
    packed_kind,
    unpackable_reason,
)
from lightning_compress.export.plan import UnpackedLayer, plan_layers
from lightning_compress.layout import STANDARD, WeightLayout, layout_of
from lightning_compress.quantization import (
    CompressionRecord,
    LayerRecord,
    QuantizedLayer,
    RecordSource,
    pack_int4,
    unpack_int4,
)

FORMAT = "lightning-compress"
FORMAT_VERSION = 1
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
    if isinstance(qat, CompressionRecord):
        record = qat
    elif isinstance(qat, RecordSource):
        record = qat.record
    else:
        raise TypeError(
            f"`qat` must be a QATCallback or a CompressionRecord, got {type(qat).__name__}"
        )
    if not record:
        raise ValueError(
            "`qat` holds no integer weights: pass the QATCallback after trainer.fit (or after "
            "its attach() on a restored model), or the record its convert() returns"
        )
    return record.relative_to(model)


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
) -> Path:
    """Writes ``model`` as a packed artifact and returns its path.

    Args:
        model: The trained model (a LightningModule or any nn.Module), pruned weights as zeros.
        path: File to write (``.safetensors``); written to a temporary name, then renamed.
        qat: The ``QATCallback`` that trained the model (its :attr:`record`), or a
            :class:`~lightning_compress.quantization.CompressionRecord` named as in ``model``
            or in a module ``model`` is part of: its integers, scales (BatchNorm folded) and
            activation ranges are stored, so the packed model computes what the fake-quantized
            model computed. Layers it did not quantize stay fp32.
        bits: Without ``qat``: per-channel post-training quantization of every packable layer to
            8 or 4 bits; None leaves them fp32.
        exclude: Module-name patterns to leave uncompressed.

    Every weight-bearing layer that is not packed is listed, with the reason, in the
    artifact (``report`` shows it) and in an INFO log line; a layer the record quantized but
    that cannot be packed is also a WARNING, since the reloaded model computes it in fp32.

    Raises:
        ValueError: ``bits`` not 8, 4 or None; a ``qat`` without integers; a ``model`` outside
            the module the record was taken from; a record kind no packer handles; integers
            not in their layer's canonical (out, in, *kernel) shape.
        TypeError: ``qat`` neither a record nor something holding one.
    """
    if bits not in (None, 4, 8):
        raise ValueError(f"`bits` must be 8, 4 or None, got {bits!r}")
    plan = plan_layers(model, exclude)
    record = _record(model, qat, bits, plan.packable)
    tensors: dict[str, torch.Tensor] = {}
    table: list[dict[str, Any]] = []
    packed_keys: set[str] = set()
    unpacked = dict(plan.unpacked)
    for name, module in plan.packable.items():
        layer = record.get(f"{name}.weight")
        if layer is None:
            why = "`bits=None`" if qat is None else "not quantized by `qat`"
            unpacked[name] = UnpackedLayer(name, type(module).__name__, f"{why}: kept fp32")
            continue
        table.append(_packer(layer)(name, module, layer, tensors))
        packed_keys.update({f"{name}.weight", f"{name}.bias"})
    _note_dropped(record, packed_keys, unpacked)
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
        "format_version": str(FORMAT_VERSION),
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
    record: CompressionRecord, packed_keys: set[str], unpacked: dict[str, UnpackedLayer]
) -> None:
    """Marks the unpacked layers whose weights the record compressed, and warns about them."""
    dropped = [name for name in record if name not in packed_keys]
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
    layout = _layout(module)
    canonical = layout.canonical_shape(tuple(module.weight.shape))
    if tuple(layer.values.shape) != canonical:
        raise ValueError(
            f"{layer.name}: the record's integers have shape {tuple(layer.values.shape)}, the "
            f"weight's canonical (out, in, *kernel) shape is {canonical} (weight "
            f"{tuple(module.weight.shape)} of a {type(module).__name__})"
        )
    prefix = f"packed/{name}/"
    q2d = layer.values.reshape(layer.values.shape[0], -1)
    flat = q2d.reshape(-1)
    nz = flat.nonzero().reshape(-1)
    sparse = nz.numel() <= SPARSE_MAX_DENSITY * max(flat.numel(), 1)
    kind = packed_kind(module)
    entry: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "module": type(module).__name__,
        "weight_shape": list(module.weight.shape),
        "axes": [layout.out_axis, layout.in_axis],
        "shape": list(q2d.shape),
        "bits": layer.bits,
        "layout": "sparse" if sparse else "dense",
        "nnz": int(nz.numel()),
        "bias": module.bias is not None,
    }
    if kind == "conv2d":
        entry["conv"] = conv_params(module)
    values = flat[nz] if sparse else flat
    tensors[prefix + ("values" if sparse else "qweight")] = (
        pack_int4(values) if _container(layer.bits) == 4 else values.contiguous()
    )
    if sparse:
        unary, low, k, unary_bits = positions.encode(nz)
        tensors[prefix + "unary"], tensors[prefix + "low"] = unary, low
        entry.update(k=k, unary_bits=unary_bits)
    tensors[prefix + "scale"] = layer.scale.float().contiguous().cpu()
    if module.bias is not None:
        tensors[prefix + "bias"] = module.bias.detach().float().contiguous().cpu()
    act = layer.activation
    entry["act"] = (
        None
        if act is None
        else {"scale": act.scale, "zero_point": act.zero_point, "bits": act.bits}
    )
    return entry


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
        flat = positions.decode(
            tensors[prefix + "unary"],
            tensors[prefix + "low"],
            int(entry["k"]),
            int(entry["unary_bits"]),
            nnz,
            n * k,
        )
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


def load_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Swaps ``model``'s packed layers for inference modules and loads every weight.

    The model must have the architecture that was packed. Everything is read, verified and
    decoded before the model is touched: on any error it is left exactly as it was.

    Returns:
        ``model`` itself, now running the compiled kernels.

    Raises:
        ArtifactError: A bad file, or a model whose layers or state do not match it.
    """
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
                parts = _decode_layer(entry, art.tensors)
            except (KeyError, ValueError, RuntimeError) as err:
                raise ArtifactError(f"{where}: layer {name!r} is corrupted: {err}") from None
            conv = entry["kind"] == "conv2d"
            cls = PackedConv2d if conv else PackedLinear
            extra = {"conv": entry["conv"]} if conv else {}
            new = cls(
                parts["q"],
                parts["scale"],
                parts["bias"],
                parts["bits"],
                parts["sparse"],
                entry.get("act"),
                **extra,
            )
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
    # Verified: from here on nothing can fail.
    with torch.no_grad():
        for key, value in stored.items():
            state[key].copy_(value)
    for name, new in replacements.items():
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, new.to(_device_of(modules[name])))
    return model


def _check_fits(where: Path, name: str, module: nn.Module | None, entry: dict[str, Any]) -> None:
    """Raises unless ``module`` has the kind, layout, shape and geometry ``entry`` came from."""
    reason = None if module is None else unpackable_reason(module)
    if module is None or reason is not None or packed_kind(module) != entry["kind"]:
        found = "nothing" if module is None else type(module).__name__
        raise ArtifactError(
            f"{where}: layer {name!r} is a {entry['kind']} in the artifact, {found} in the model"
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
    if entry["kind"] == "conv2d" and conv_params(module) != entry["conv"]:
        raise ArtifactError(
            f"{where}: layer {name!r}: convolution geometry differs from the artifact"
        )


def _device_of(module: nn.Module) -> torch.device:
    return module.weight.device


# -- report -------------------------------------------------------------------------------------


@dataclass
class LayerRow:
    name: str
    kind: str
    layout: str
    bits: int
    sparsity: float
    bytes: int
    fp32_bytes: int
    type: str = ""


@dataclass
class Report:
    """Per-layer sizes of an artifact, its totals against the fp32 model, and what stayed fp32.

    ``unpacked`` lists every weight-bearing layer that was not packed, with the reason; None for
    an artifact written before pack recorded them.
    """

    path: Path
    file_bytes: int
    fp32_bytes: int
    layers: list[LayerRow]
    other_bytes: int
    unpacked: list[UnpackedLayer] | None = None

    @property
    def ratio(self) -> float:
        """fp32 bytes over the file's bytes."""
        return self.fp32_bytes / max(self.file_bytes, 1)

    def __str__(self) -> str:
        width = max([24, *(len(r.name) for r in self.layers)])
        types = max([6, *(len(r.type) for r in self.layers)])
        lines = [
            f"{'layer':<{width}} {'module':<{types}} {'kind':<7} {'layout':<7} {'bits':>4} "
            f"{'sparsity':>9} {'bytes':>10} {'fp32 bytes':>11}"
        ]
        for r in self.layers:
            lines.append(
                f"{r.name:<{width}} {r.type:<{types}} {r.kind:<7} {r.layout:<7} {r.bits:>4} "
                f"{100 * r.sparsity:8.2f}% {r.bytes:>10,} {r.fp32_bytes:>11,}"
            )
        other = "other state (fp32 as stored)"
        lines.append(f"{other:<{width + types + 32}} {self.other_bytes:>10,}")
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
        return "\n".join(lines)


def _kept_lines(unpacked: list[UnpackedLayer] | None) -> list[str]:
    if unpacked is None:
        return ["layers kept fp32: not recorded (an artifact from an older version)"]
    names = max((len(u.name) for u in unpacked), default=0)
    types = max((len(u.type) for u in unpacked), default=0)
    return [f"layers kept fp32: {len(unpacked)}"] + [
        f"  {u.name:<{names}}  {u.type:<{types}}  {u.reason}" for u in unpacked
    ]


def report(path: str | os.PathLike) -> Report:
    """Reads an artifact and tabulates, per layer, layout, bits, sparsity and bytes, and the
    weight-bearing layers kept fp32 with the reason."""
    art = read(path)
    rows = []
    fp32 = 0
    for entry in art.layers:
        prefix = f"packed/{entry['name']}/"
        nbytes = sum(
            t.numel() * t.element_size() for k, t in art.tensors.items() if k.startswith(prefix)
        )
        n, k = entry["shape"]
        dense = n * k * 4 + (n * 4 if entry["bias"] else 0)
        fp32 += dense
        rows.append(
            LayerRow(
                entry["name"],
                entry["kind"],
                entry["layout"],
                int(entry["bits"]),
                1.0 - int(entry["nnz"]) / max(n * k, 1),
                nbytes,
                dense,
                entry.get("module", ""),
            )
        )
    other = [t for k, t in art.tensors.items() if k.startswith("state/")]
    other_bytes = sum(t.numel() * t.element_size() for t in other)
    fp32 += sum(t.numel() * 4 for t in other)
    return Report(art.path, art.size, fp32, rows, other_bytes, art.unpacked)
