"""A model-level stack, end to end: our packed model against what users would run instead.

The model is an ``nn.Sequential`` of ``--layers`` (default 6) ``nn.Linear`` alternating
4096->11008 and 11008->4096 (an LLM's MLP; 1.1 GB fp32 at 6 layers, far beyond the last-level
cache, so every layer's weights come from memory), bias included, weights ``randn * 0.02``,
seeded. ``--quick`` uses 2 layers of 1024->2816->1024 for smoke runs.

Methods, in one process, interleaved for every configuration and batch size:

- ``fp32``      the model itself
- ``bf16``      ``model.bfloat16()`` on a bfloat16 input
- ``qdynamic``  torch's ``quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``
- ``ort``       ONNX Runtime int8: ``torch.onnx.export`` of the fp32 model (dynamic batch axis),
                then ``onnxruntime.quantization.quantize_dynamic(in, out,
                weight_type=QuantType.QInt8)`` with its defaults, as a user would call it (no
                pre-processing, per-tensor weights), in an ``InferenceSession`` with
                ``intra_op_num_threads=--threads``, one inter-op thread, sequential
                execution and no spinning of idle workers (spinning ones take the cores
                from the method timed next). Skipped, with a line saying so, when
                onnxruntime is not installed (``pip install lightning-compress[bench]``).
- ``ours``      every layer magnitude-pruned to the configuration's sparsity (its smallest
                ``|w|`` zeroed), ``pack(model, path, bits=b)``, then
                ``load_into(copy.deepcopy(model), path, batch_size=batch)`` (``batch_size``
                only where ``load_into`` takes it) and ``model(x)``: the public path. It is
                loaded again for every batch size, since the implementation each layer gets
                depends on it.

The baselines are built once, from the unpruned model: their dense kernels take the same time
whatever the weights' values. Ours is built one configuration (sparsity, bits) at a time and
freed after it.

Cold weights: each method cycles through enough copies of its model (loads of the artifact, for
ours) to read twice the last-level cache's bytes, up to 32 copies, as ``kernels.py`` does, so
each call reads its weights from memory, as in a model much larger than the cache. At 6 layers
the baselines' weights exceed the cache already (one copy each); ours at high sparsity may
not. ONNX Runtime always has one session (every session brings its own thread pool): its
weights are warm in ``--quick`` runs, which are smoke runs. ``--warm``: one copy of each.
A sample is the mean of a few consecutive calls (about 50 ms in all); a repetition takes one
sample of every method in turn; medians over ``--reps`` repetitions after a warm-up are
reported, and the speed-ups are taken per repetition (same machine state), then their
median. ``best_int8`` is the faster of ``qdynamic`` and ``ort`` in each repetition.

The memory bandwidth is measured in every repetition by reading a buffer of four times the
last-level cache (``buf.sum()``, same thread count, three reads; the median of all is used).
Each method's share of its bound is the bytes its weights occupy (fp32 4 per weight, bf16 2,
the int8 models' weights, scales and biases, ours the buffers and parameters of the loaded
model, prepacked int8 weights included) over the bandwidth, divided by its time: meaningful at
batch 1, where the weights' traffic is the cost.

    python benchmarks/stack.py [--quick] [--layers 6] [--sparsities 0 50 75 90 95]
        [--bits 8 4] [--batches 1 8 64 256] [--threads 2] [--reps 7] [--warm] [--out ...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import inspect
import io
import itertools
import json
import os
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from kernels import last_level_cache_bytes  # the sibling benchmark scripts
from lowrank_speed import busy_seconds, cpu_model
from torch import nn

from lightning_compress.export import load_into, pack
from lightning_compress.ops import compiled_available

FULL = (4096, 11008)
QUICK = (1024, 2816)
SPARSITIES = (0, 50, 75, 90, 95)
BITS = (8, 4)
BATCHES = (1, 8, 64, 256)
TARGET_SECONDS = 0.05  # per timed sample
MAX_CALLS = 20  # per sample
MAX_COPIES = 32  # of one model, for cold weights
BANDWIDTH_READS = 3  # per repetition: the reading is noisy on a shared machine
CHECK_BATCH = 8  # the input every method's error is measured on
BASELINES = ("fp32", "bf16", "qdynamic", "ort")
INT8_BASELINES = ("qdynamic", "ort")


def stack_model(layers: int, widths: tuple[int, int], seed: int = 0) -> nn.Sequential:
    """``layers`` nn.Linear alternating ``widths[0]->widths[1]`` and back, weights and biases
    ``randn * 0.02`` from ``seed``, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    dims = [widths[i % 2] for i in range(layers + 1)]
    model = nn.Sequential(*(nn.Linear(a, b) for a, b in itertools.pairwise(dims)))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.02)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.02)
    return model.eval()


@torch.no_grad()
def magnitude_pruned(model: nn.Sequential, sparsity: float) -> nn.Sequential:
    """A copy of ``model`` with every layer's smallest ``|w|`` zeroed to ``sparsity``."""
    pruned = copy.deepcopy(model)
    for layer in pruned:
        k = round(sparsity * layer.weight.numel())
        if k:
            magnitude = layer.weight.abs()
            threshold = magnitude.flatten().kthvalue(k).values
            layer.weight.masked_fill_(magnitude <= threshold, 0.0)
    return pruned


def quantized_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, and of the int8 weights (and biases, where
    the module holds none itself) inside torch's prepacked linear parameters, which
    ``quantize_dynamic`` and our "qdynamic" implementation keep outside both."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.ScriptObject) and "LinearPackedParams" in str(value):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # quantized tensors are deprecated
                    weight, bias = torch.ops.quantized.linear_unpack(value)
                tensors.append(weight)
                if bias is not None and getattr(module, "bias", None) is None:
                    tensors.append(bias)
    return sum(t.numel() * t.element_size() for t in tensors)


class OrtModel:
    """ONNX Runtime's dynamically quantized int8 model of ``model``, called like the model."""

    def __init__(self, model: nn.Module, in_features: int, threads: int, tmp: Path) -> None:
        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32_path, int8_path = tmp / "stack.onnx", tmp / "stack_int8.onnx"
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.randn(2, in_features),),
                str(fp32_path),
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            )
            quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
        graph = onnx.load(str(int8_path))
        self.ops = sorted({node.op_type for node in graph.graph.node})
        self.integer_matmuls = sum(
            node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for node in graph.graph.node
        )
        self.nbytes = sum(
            onnx.numpy_helper.to_array(init).nbytes for init in graph.graph.initializer
        )
        del graph
        fp32_path.unlink()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning workers keep both cores busy after each run, which made the torch methods
        # timed next 2x slower here; without it ONNX Runtime's own time did not change.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(int8_path), options, providers=["CPUExecutionProvider"]
        )
        self.version = ort.__version__

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"x": x.numpy()})[0])


class Method:
    """One way to run the model: copies of it, cycled call by call, and their bytes."""

    def __init__(self, copies: list[Callable[[torch.Tensor], torch.Tensor]], nbytes: int) -> None:
        self.copies = copies
        self.nbytes = nbytes
        self.next = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        model = self.copies[self.next % len(self.copies)]
        self.next += 1
        return model(x)


def copies_needed(nbytes: int, budget: int) -> int:
    """Copies of ``nbytes`` each that read ``budget`` bytes in one cycle (1 to MAX_COPIES)."""
    return max(1, min(MAX_COPIES, -(-budget // max(nbytes, 1))))


def replicate(make: Callable[[], Callable], budget: int) -> Method:
    """A Method of as many results of ``make()`` as cold weights need (one if ``budget`` 0)."""
    first = make()
    nbytes = weight_bytes(first) if isinstance(first, nn.Module) else first.nbytes
    rest = [make() for _ in range(copies_needed(nbytes, budget) - 1)]
    return Method([first, *rest], nbytes)


def load_ours(structure: nn.Module, path: Path, batch: int) -> nn.Module:
    """The artifact loaded into a copy of ``structure``, for ``batch`` where load_into takes
    a batch size."""
    model = copy.deepcopy(structure)
    takes_batch = "batch_size" in inspect.signature(load_into).parameters
    return load_into(model, path, **({"batch_size": batch} if takes_batch else {})).eval()


def bandwidth(buf: torch.Tensor) -> float:
    """Bytes per second of reading ``buf`` once with torch's threads."""
    start = time.perf_counter()
    buf.sum()
    return buf.numel() * buf.element_size() / (time.perf_counter() - start)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


def sample(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(
    methods: dict[str, Method], x: torch.Tensor, reps: int, bw_buf: torch.Tensor
) -> tuple[dict[str, list[float]], list[float]]:
    """``reps`` interleaved samples (seconds per call) of every method on ``x``, and the
    bandwidths (bytes/s) read in the repetitions."""
    inputs = {name: x.bfloat16() if name == "bf16" else x for name in methods}
    fns = {name: (lambda m=m, x=inputs[name]: m(x)) for name, m in methods.items()}
    calls = {}
    for name, fn in fns.items():  # warm-up: every copy once, then the calls filling a sample
        sample(fn, len(methods[name].copies))
        seconds = min(sample(fn, 1) for _ in range(2))
        calls[name] = max(1, min(MAX_CALLS, round(TARGET_SECONDS / max(seconds, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    bws = []
    for _ in range(reps):
        bws += [bandwidth(bw_buf) for _ in range(BANDWIDTH_READS)]
        for name, fn in fns.items():
            samples[name].append(sample(fn, calls[name]))
    return samples, bws


def ratio(base: list[float], mine: list[float]) -> float:
    """Median over repetitions of ``base / mine`` (speed-up of ``mine`` over ``base``)."""
    return statistics.median(b / m for b, m in zip(base, mine, strict=True))


def rows_of(
    config: dict[str, Any],
    batch: int,
    samples: dict[str, list[float]],
    bws: list[float],
    methods: dict[str, Method],
    errors: dict[str, float],
) -> list[dict[str, Any]]:
    bw = statistics.median(bws)
    int8 = [name for name in INT8_BASELINES if name in samples]
    best_int8 = [min(ts) for ts in zip(*(samples[n] for n in int8), strict=True)]
    rows = []
    for name, times in samples.items():
        ms = statistics.median(times)
        nbytes = methods[name].nbytes
        rows.append(
            {
                **config,
                "batch": batch,
                "method": name,
                "ms": 1e3 * ms,
                "weight_bytes": nbytes,
                "copies": len(methods[name].copies),
                "bandwidth_GBps": bw / 1e9,
                "bandwidth_share": nbytes / bw / ms,
                "max_rel_error": errors[name],
                "speedup_vs_fp32": ratio(samples["fp32"], times),
                "speedup_vs_qdynamic": ratio(samples["qdynamic"], times),
                "speedup_vs_ort": ratio(samples["ort"], times) if "ort" in samples else None,
                "speedup_vs_best_int8": ratio(best_int8, times),
            }
        )
    return rows


def print_rows(rows: list[dict[str, Any]], extra: str) -> None:
    head = rows[0]
    print(
        f"\n{head['sparsity']}% sparse int{head['bits']}, batch {head['batch']}  "
        f"(bandwidth {head['bandwidth_GBps']:.1f} GB/s){extra}"
    )
    print(
        f"  {'method':<9} {'ms':>9} {'MB':>8} {'copies':>6} {'bw share':>9} {'vs fp32':>8} "
        f"{'vs qdyn':>8} {'vs ort':>8} {'vs int8':>8} {'rel err':>8}"
    )
    for r in rows:
        share = f"{100 * r['bandwidth_share']:8.1f}%" if r["batch"] == 1 else f"{'-':>9}"
        ort = "-" if r["speedup_vs_ort"] is None else f"{r['speedup_vs_ort']:.2f}x"
        print(
            f"  {r['method']:<9} {r['ms']:9.3f} {r['weight_bytes'] / 1e6:8.1f} {r['copies']:6d} "
            f"{share} {r['speedup_vs_fp32']:7.2f}x {r['speedup_vs_qdynamic']:7.2f}x {ort:>8} "
            f"{r['speedup_vs_best_int8']:7.2f}x {r['max_rel_error']:8.1e}"
        )


def build_baselines(
    dense: nn.Module, threads: int, budget: int, tmp: Path
) -> tuple[dict[str, Method], dict[str, Any]]:
    """The baselines (copies for cold weights, ``dense`` itself the first fp32 one), and facts
    about ONNX Runtime."""
    # ONNX Runtime first: the export and quantization hold copies of the model for a while.
    methods: dict[str, Method] = {}
    facts: dict[str, Any] = {"onnxruntime": None}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed: the ONNX Runtime int8 baseline is skipped")
    else:
        start = time.perf_counter()
        ort_model = OrtModel(dense, dense[0].in_features, threads, tmp)
        methods["ort"] = Method([ort_model], ort_model.nbytes)
        facts = {
            "onnxruntime": ort_model.version,
            "ort_ops": ort_model.ops,
            "ort_integer_matmuls": ort_model.integer_matmuls,
            "ort_build_seconds": time.perf_counter() - start,
        }
        print(
            f"ONNX Runtime {ort_model.version}: {ort_model.integer_matmuls} integer matmuls, "
            f"ops {', '.join(ort_model.ops)} (built in {facts['ort_build_seconds']:.0f} s)"
        )
        gc.collect()
    unused = [dense]

    def fp32() -> nn.Module:
        return unused.pop() if unused else copy.deepcopy(dense)

    torch_methods = {
        "fp32": replicate(fp32, budget),
        "bf16": replicate(lambda: copy.deepcopy(dense).bfloat16(), budget),
        "qdynamic": replicate(lambda: quantized_dynamic(dense), budget),
    }
    return {**torch_methods, **methods}, facts


def run_configs(
    args: argparse.Namespace,
    dense: nn.Sequential,
    baselines: dict[str, Method],
    budget: int,
    tmp: Path,
    bw_buf: torch.Tensor,
) -> list[dict[str, Any]]:
    """Every configuration of ours at every batch size, timed interleaved with the baselines."""
    in_features = dense[0].in_features
    gen = torch.Generator().manual_seed(1)
    check = torch.randn(CHECK_BATCH, in_features, generator=gen)
    xs = {b: torch.randn(b, in_features, generator=gen) for b in args.batches}
    want = dense(check)
    base_errors = {
        name: relative_error(m.copies[0](check.bfloat16() if name == "bf16" else check), want)
        for name, m in baselines.items()
    }
    rows: list[dict[str, Any]] = []
    for sparsity in args.sparsities:
        for bits in args.bits:
            config = {"sparsity": sparsity, "bits": bits}
            path = tmp / f"stack_{sparsity}_{bits}.safetensors"
            pruned = magnitude_pruned(dense, sparsity / 100)
            packed_at = time.perf_counter()
            pack(pruned, path, bits=bits)
            pack_seconds = time.perf_counter() - packed_at
            want_pruned = pruned(check)
            del pruned
            gc.collect()
            for batch in args.batches:
                loaded_at = time.perf_counter()
                mine = replicate(functools.partial(load_ours, dense, path, batch), budget)
                load_seconds = (time.perf_counter() - loaded_at) / len(mine.copies)
                first = mine.copies[0]
                impls = [getattr(layer, "impl", type(layer).__name__) for layer in first]
                errors = {**base_errors, "ours": relative_error(first(check), want_pruned)}
                methods = {**baselines, "ours": mine}
                samples, bws = measure(methods, xs[batch], args.reps, bw_buf)
                new = rows_of(config, batch, samples, bws, methods, errors)
                new[-1].update(
                    impl_per_layer=impls,
                    pack_seconds=pack_seconds,
                    load_seconds=load_seconds,
                    file_bytes=path.stat().st_size,
                )
                rows += new
                print_rows(new, f"; ours: {', '.join(impls)}, load_into {load_seconds:.1f} s")
                del mine, methods, first
                gc.collect()
            path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 layers of 1024->2816->1024")
    parser.add_argument("--layers", type=int, default=None, help="default 6 (2 with --quick)")
    parser.add_argument("--sparsities", nargs="*", type=int, default=list(SPARSITIES))
    parser.add_argument("--bits", nargs="*", type=int, default=list(BITS), choices=list(BITS))
    parser.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warm", action="store_true", help="one copy of each model")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stack.json"))
    args = parser.parse_args()
    if any(not 0 <= s < 100 for s in args.sparsities):
        parser.error(f"`--sparsities` must be percentages in [0, 100), got {args.sparsities}")
    if not compiled_available():
        raise SystemExit("the compiled ops are not loaded; reinstall to build them")
    torch.set_num_threads(args.threads)
    widths = QUICK if args.quick else FULL
    layers = args.layers or (2 if args.quick else 6)
    cpu, llc = cpu_model(), last_level_cache_bytes()
    budget = 0 if args.warm else 2 * llc
    bw_buf = torch.ones(max(4 * llc, 256 << 20) // 4)
    load_before = os.getloadavg()
    start = busy_seconds()
    dense = stack_model(layers, widths)
    print(
        f"CPU {cpu}, last-level cache {llc / 2**20:.0f} MiB, threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, load average {load_before[0]:.2f}\n"
        f"model: {layers} x nn.Linear {widths[0]}<->{widths[1]}, "
        f"{weight_bytes(dense) / 1e9:.2f} GB fp32; weights {'warm' if args.warm else 'cold'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baselines, ort_facts = build_baselines(dense, args.threads, budget, tmp)
        with torch.no_grad():
            rows = run_configs(args, dense, baselines, budget, tmp, bw_buf)
    load_after = os.getloadavg()
    end = busy_seconds()
    wall = end[0] - start[0]
    others = max(0.0, (end[1] - start[1]) - (end[2] - start[2])) / wall
    print(
        f"\nload average {load_after[0]:.2f} at the end; other processes used {others:.2f} "
        f"cores on average during the {wall:.0f} s run (of {os.cpu_count()})"
    )
    record = {
        "cpu": cpu,
        "last_level_cache_bytes": llc,
        "torch": torch.__version__,
        **ort_facts,
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "cold": not args.warm,
        "layers": layers,
        "widths": list(widths),
        "model_fp32_bytes": weight_bytes(dense),
        "load_average": {"start": load_before, "end": load_after},
        "other_processes_cores": others,
        "wall_seconds": wall,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
