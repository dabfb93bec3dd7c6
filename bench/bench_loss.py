"""Loss micro-benchmark: fwd+bwd time and peak memory of each implementation, side by side.

Implementations: `reference` (naive N x N, until it runs out of memory: recorded as OOM), `torch`
(chunked), `triton` (fused kernels, CUDA only), `compile` (torch.compile of the naive reference, where it
fits). Losses: SupCon (softmax, all anchors), PaCo (softmax, anchors = first view, queue K = 8192,
C = 1000 centres), ACL (aligned, all anchors, C = 1000 centres, batch-weighted negatives).

GPU: triton.testing.do_bench median with 20th/80th percentiles, peak memory from
torch.cuda.max_memory_allocated beyond the inputs (and beyond the gradients: `extra_mib`).
CPU: a plain timer loop, a small sweep so anyone can try it. TFLOP/s counts the similarity-sized GEMM
passes of 2 * n_anchor * M * d (M = N + K) the fused kernels really run for this mode and d
(triton_backend.similarity_flops, the accounting of bench/kernel_cost.py: forward 1 similarity
pass, plus the aligned sweep's band share; backward 1 recompute per 256-wide chunk of d plus the
gradient product), the same count for every implementation so the column compares like with like;
`vs_reference` / `vs_torch` are time ratios within the same run. Rows are appended to
bench/results/loss.csv.

    python bench/bench_loss.py                      # default sweep for the device found
    python bench/bench_loss.py --sizes 4096 16384 --losses supcon --dtypes bf16 --impls torch triton
"""

import argparse
import csv
import datetime
import itertools
import os
import statistics
import subprocess
import sys
import time

import torch

from acl_kernels import contrastive_loss
from acl_kernels.ops.contrastive.triton_backend import similarity_flops

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CSV = os.path.join(HERE, "results", "loss.csv")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOSSES = ("supcon", "paco", "acl")
IMPLS = ("reference", "compile", "torch", "triton")
N_CLASSES = 1000
QUEUE = 8192
FIELDS = ["date", "git_sha", "device", "torch", "triton", "loss", "mode", "N", "d", "V", "dtype", "K", "C",
          "impl", "status", "median_ms", "p20_ms", "p80_ms", "tflops", "peak_mib", "extra_mib", "vs_reference",
          "vs_torch"]  # fmt: skip
# Beyond these N an implementation is not run (recorded "skipped"): far too slow to be worth the time.
MAX_N = {"cuda": {"torch": 65536, "compile": 65536}, "cpu": {"reference": 8192, "torch": 8192, "compile": 4096}}


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
        out["median_ms"], out["p20_ms"], out["p80_ms"] = time_cpu(step, repeats)
    n_anchor = kw.get("n_anchor", n)
    m = n + (kw["queue"].shape[0] if "queue" in kw else 0)
    flops = similarity_flops(n_anchor, m, d, kw.get("mode", "softmax"))
    out["tflops"] = flops / (out["median_ms"] * 1e-3) / 1e12
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--dims", type=int, nargs="+")
    parser.add_argument("--views", type=int, nargs="+")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    parser.add_argument("--impls", nargs="+", choices=IMPLS)
    parser.add_argument("--repeats", type=int, default=3, help="CPU timer loop repeats")
    parser.add_argument("--csv", default=DEFAULT_CSV)
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    sizes = args.sizes or ([1024, 4096, 16384, 65536, 262144] if gpu else [1024, 2048])
    dims = args.dims or ([128, 512] if gpu else [128])
    views = args.views or ([2, 8] if gpu else [2])
    dtypes = args.dtypes or (["bf16", "fp32"] if gpu else ["fp32"])
    impls = args.impls or (list(IMPLS) if gpu else ["reference", "torch"])
    if not gpu and "triton" in impls:
        print("triton: skipped on CPU (the interpreter is for tests, not timings)", file=sys.stderr)
        impls = [i for i in impls if i != "triton"]
    import triton

    meta = {"date": datetime.date.today().isoformat(), "git_sha": git_sha(), "device": device_name(dev),
            "torch": torch.__version__, "triton": triton.__version__}  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    new = not os.path.exists(args.csv)
    limits = MAX_N["cuda" if gpu else "cpu"]
    with open(args.csv, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        for loss, d, v, dt in itertools.product(args.losses, dims, views, dtypes):
            oom_from = {}  # impl -> smallest N that ran out of memory in this group
            for n in sizes:
                rows = {}
                for impl in impls:
                    row = dict(meta, loss=loss, mode="aligned" if loss == "acl" else "softmax", N=n, d=d, V=v,
                               dtype=dt, K=QUEUE if loss == "paco" else 0, C=0 if loss == "supcon" else N_CLASSES,
                               impl=impl)  # fmt: skip
                    if impl in oom_from:
                        row["status"] = "OOM"
                    elif n > limits.get(impl, 1 << 62):
                        row["status"] = "skipped"
                    else:
                        try:
                            row.update(measure(impl, loss, n, d, v, DTYPES[dt], dev, args.repeats), status="ok")
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
                    f.flush()
                    print(f"{loss:6s} N={n:<7d} d={d:<4d} V={v} {dt:4s} {impl:9s} {row['status']:>7s} "
                          f"{row.get('median_ms', ''):>10} ms {row.get('tflops', ''):>8} TFLOP/s "
                          f"peak {row.get('peak_mib', '-')} MiB vs_ref {row.get('vs_reference', '-')}",
                          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
