"""Loss micro-benchmark: fwd+bwd time and peak memory of each implementation, side by side.

Implementations: `reference` (naive N x N, until it runs out of memory: recorded as OOM), `torch`
(chunked), `triton` (fused kernels, CUDA only), `native` (the C++ kernel, CPU only), `compile`
(torch.compile of the naive reference, where it fits). By default every one the device has.
Losses: SupCon (softmax, all anchors), PaCo (softmax, anchors = first view, queue K = 8192,
C = 1000 centres), ACL (aligned, all anchors, C = 1000 centres, batch-weighted negatives).

GPU: triton.testing.do_bench median with 20th/80th percentiles, peak memory from
torch.cuda.max_memory_allocated beyond the inputs (and beyond the gradients: `extra_mib`).
CPU: a plain timer loop, a small sweep so anyone can try it; memory is the peak resident-set growth
of one step (bench/rss.py), and `extra_mib` the same beyond the gradients. TFLOP/s counts the similarity-sized GEMM
passes of 2 * n_anchor * M * d (M = N + K) the fused kernels really run for this mode and d
(triton_backend.similarity_flops, the accounting of bench/kernel_cost.py: forward 1 similarity
pass, plus the aligned sweep's band share; backward 1 recompute per 256-wide chunk of d plus the
gradient product), the same count for every implementation so the column compares like with like;
`vs_reference` / `vs_torch` are time ratios within the same run. The table is printed; rows are
appended to the tracked bench/results/loss.csv only with --record, or to another file with --csv.

    python bench/bench_loss.py                      # default sweep for the device found
    python bench/bench_loss.py --sizes 4096 16384 --losses supcon --dtypes bf16 --impls torch triton --record
    python bench/bench_loss.py --impls torch native --sizes 4096   # CPU
"""

import argparse
import contextlib
import csv
import datetime
import io
import itertools
import os
import statistics
import subprocess
import sys
import time

import torch
from rss import PeakRSS

from acl_kernels import contrastive_loss
from acl_kernels.dispatch import backends
from acl_kernels.ops.contrastive.triton_backend import similarity_flops

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CSV = os.path.join(HERE, "results", "loss.csv")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOSSES = ("supcon", "paco", "acl")
IMPLS = ("reference", "compile", "torch", "native", "triton")
ON = {"cuda": ("reference", "compile", "torch", "triton"), "cpu": ("reference", "torch", "native")}
N_CLASSES = 1000
QUEUE = 8192
FIELDS = ["date", "git_sha", "device", "torch", "triton", "loss", "mode", "N", "d", "V", "dtype", "K", "C",
          "impl", "status", "median_ms", "p20_ms", "p80_ms", "tflops", "peak_mib", "extra_mib", "vs_reference",
          "vs_torch"]  # fmt: skip
# Beyond these N an implementation is not run (recorded "skipped"): far too slow to be worth the time.
MAX_N = {"cuda": {"torch": 65536, "compile": 65536},
         "cpu": {"reference": 8192, "torch": 8192, "native": 16384, "compile": 4096}}  # fmt: skip


def git_sha() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    return out.stdout.strip() or "unknown"


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()}"


def make_inputs(loss: str, n: int, d: int, views: int, dtype: torch.dtype, dev: torch.device, seed: int = 0):
    """(differentiable inputs, the contrastive_loss call) for one benchmark case."""
    g = torch.Generator(device=dev).manual_seed(seed)
    b = max(1, n // views)
    y = torch.randint(0, N_CLASSES, (b,), device=dev, generator=g).repeat(views)[:n]
    z = torch.nn.functional.normalize(torch.randn(n, d, device=dev, generator=g), dim=1).to(dtype)
    z.requires_grad_()
    inputs, kw = [z], {}
    if loss == "paco":
        q = torch.nn.functional.normalize(torch.randn(QUEUE, d, device=dev, generator=g), dim=1).to(dtype)
        kw.update(queue=q, queue_labels=torch.randint(0, N_CLASSES, (QUEUE,), device=dev, generator=g),
                  n_anchor=b, alpha=0.05, temperature=0.2)  # fmt: skip
    if loss in ("paco", "acl"):
        u = torch.randn(kw.get("n_anchor", n), N_CLASSES, device=dev, generator=g).to(dtype).requires_grad_()
        log_prior = torch.log_softmax(torch.randn(N_CLASSES, device=dev, generator=g), 0)
        kw.update(centre_logits=u, log_prior=log_prior)
        inputs.append(u)
    if loss == "acl":
        kw.update(mode="aligned", negative_weight="batch", alpha=0.05, temperature=0.2)
    return inputs, y, kw


def step_fn(impl: str, inputs, y, kw):
    z = inputs[0]
    if impl == "compile":
        fn = torch.compile(contrastive_loss)
        impl_arg = "reference"
    else:
        fn, impl_arg = contrastive_loss, impl

    def step():
        loss = fn(z, y, impl=impl_arg, check_finite=False, **kw)
        return torch.autograd.grad(loss, inputs)

    return step


def time_cuda(step) -> tuple[float, float, float]:
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(step, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def time_cpu(step, repeats: int) -> tuple[float, float, float]:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def measure(impl, loss, n, d, views, dtype, dev, repeats) -> dict:
    inputs, y, kw = make_inputs(loss, n, d, views, dtype, dev)
    step = step_fn(impl, inputs, y, kw)
    out = {}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        grads = sum(x.numel() * x.element_size() for x in inputs)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        out["peak_mib"] = peak / 2**20
        out["extra_mib"] = (peak - grads) / 2**20
        out["median_ms"], out["p20_ms"], out["p80_ms"] = time_cuda(step)
    else:
        grads = sum(x.numel() * x.element_size() for x in inputs)
        with PeakRSS() as rss:
            step()
        if rss.growth_bytes is not None:
            out["peak_mib"] = rss.growth_bytes / 2**20
            out["extra_mib"] = max(0, rss.growth_bytes - grads) / 2**20
        out["median_ms"], out["p20_ms"], out["p80_ms"] = time_cpu(step, repeats)
    n_anchor = kw.get("n_anchor", n)
    m = n + (kw["queue"].shape[0] if "queue" in kw else 0)
    flops = similarity_flops(n_anchor, m, d, kw.get("mode", "softmax"))
    out["tflops"] = flops / (out["median_ms"] * 1e-3) / 1e12
    return out


def choose_impls(asked: list[str] | None, dev: torch.device) -> list[str]:
    """The implementations to run on `dev`: the ones asked for, or every one the device has; the
    rest are dropped with the reason."""
    kind = "cuda" if dev.type == "cuda" else "cpu"
    have = backends()
    out = []
    for impl in asked or IMPLS:
        if impl not in ON[kind]:
            print(f"{impl}: skipped on {kind}", file=sys.stderr)
        elif impl in have and have[impl].missing is not None:
            print(f"{impl}: skipped, not in this install ({have[impl].missing})", file=sys.stderr)
        else:
            out.append(impl)
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--dims", type=int, nargs="+")
    parser.add_argument("--views", type=int, nargs="+")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="default: every implementation the device has")
    parser.add_argument("--repeats", type=int, default=3, help="CPU timer loop repeats")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--record", action="store_true", help=f"append the rows to {os.path.relpath(DEFAULT_CSV)}")
    out.add_argument("--csv", help="append the rows to this CSV instead (default: print only)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    sizes = args.sizes or ([1024, 4096, 16384, 65536, 262144] if gpu else [1024, 2048])
    dims = args.dims or ([128, 512] if gpu else [128])
    views = args.views or ([2, 8] if gpu else [2])
    dtypes = args.dtypes or (["bf16", "fp32"] if gpu else ["fp32"])
    impls = choose_impls(args.impls, dev)
    import triton

    meta = {"date": datetime.date.today().isoformat(), "git_sha": git_sha(), "device": device_name(dev),
            "torch": torch.__version__, "triton": triton.__version__}  # fmt: skip
    path = DEFAULT_CSV if args.record else args.csv
    with open_rows(path) as writer:
        for loss, d, v, dt in itertools.product(args.losses, dims, views, dtypes):
            sweep(writer, meta, impls, loss, d, v, dt, sizes, dev, args.repeats)


@contextlib.contextmanager
def open_rows(path: str | None):
    """A csv.DictWriter appending to `path` (header first in a new file), or one that drops the rows."""
    if path is None:
        yield csv.DictWriter(io.StringIO(), FIELDS)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        yield writer
    print(f"rows appended to {path}")


def sweep(writer, meta, impls, loss, d, v, dt, sizes, dev, repeats) -> None:
    gpu = dev.type == "cuda"
    limits = MAX_N["cuda" if gpu else "cpu"]
    oom_from = {}  # impl -> smallest N that ran out of memory in this group
    for n in sizes:
        rows = {}
        for impl in impls:
            row = dict(meta, loss=loss, mode="aligned" if loss == "acl" else "softmax", N=n, d=d, V=v, dtype=dt,
                       K=QUEUE if loss == "paco" else 0, C=0 if loss == "supcon" else N_CLASSES, impl=impl)  # fmt: skip
            if impl in oom_from:
                row["status"] = "OOM"
            elif n > limits.get(impl, 1 << 62):
                row["status"] = "skipped"
            else:
                try:
                    row.update(measure(impl, loss, n, d, v, DTYPES[dt], dev, repeats), status="ok")
                except torch.OutOfMemoryError:
                    row["status"] = "OOM"
                    oom_from[impl] = n
                except Exception as err:  # record and go on: one broken impl must not stop the sweep
                    row["status"] = f"error: {type(err).__name__}: {str(err)[:120]}"
                if gpu:
                    torch._dynamo.reset()
                    torch.cuda.empty_cache()
            rows[impl] = row
        for impl, row in rows.items():
            for other in ("reference", "torch"):
                o = rows.get(other, {})
                if row.get("status") == "ok" and o.get("status") == "ok":
                    row[f"vs_{other}"] = round(row["median_ms"] / o["median_ms"], 4)
            for k in ("median_ms", "p20_ms", "p80_ms", "tflops", "peak_mib", "extra_mib"):
                if k in row:
                    row[k] = round(row[k], 4)
            writer.writerow(row)
            peak = f"{row['peak_mib']:.1f} MiB" if "peak_mib" in row else "-"
            print(f"{loss:6s} N={n:<7d} d={d:<4d} V={v} {dt:4s} {impl:9s} {row['status']:>7s} "
                  f"{row.get('median_ms', ''):>10} ms {row.get('tflops', ''):>8} TFLOP/s "
                  f"peak {peak} vs_ref {row.get('vs_reference', '-')}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
