"""CPU demonstration of the losses: every preset on the reference and the chunked torch path, then
time and peak memory of the two paths (`python -m acl_kernels.demo [--sizes 4096 16384]`)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from . import ACLLoss, GPaCoLoss, PaCoLoss, SupConLoss


def preset_values(seed: int = 0) -> list[tuple[str, float, float]]:
    """(preset, reference value, torch value) on one random long-tailed batch."""
    g = torch.Generator().manual_seed(seed)
    bsz, views, d, c, k = 256, 2, 128, 10, 512
    labels = torch.multinomial(torch.linspace(1.0, 0.01, c), bsz, replacement=True, generator=g)
    feats = F.normalize(torch.randn(bsz, views, d, generator=g), dim=-1)
    rows = feats.transpose(0, 1).reshape(-1, d)
    queue = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    queue_labels = torch.randint(0, c, (k,), generator=g)
    counts = torch.bincount(labels, minlength=c).clamp_min(1).tolist()
    paco_feats = torch.cat([rows, queue])
    paco_labels = torch.cat([labels.repeat(views), queue_labels])
    logits = torch.randn(views * bsz, c, generator=g)
    out = []
    for name, make, call in [
        ("SupConLoss", lambda impl: SupConLoss(0.1, impl=impl), lambda m: m(feats, labels)),
        (
            "PaCoLoss",
            lambda impl: PaCoLoss(0.05, temperature=0.2, K=k, num_classes=c, impl=impl),
            lambda m: m(paco_feats, paco_labels, logits[:bsz]),
        ),
        (
            "GPaCoLoss",
            lambda impl: GPaCoLoss(0.05, temperature=0.2, K=k, num_classes=c, impl=impl),
            lambda m: m(paco_feats, paco_labels, logits),
        ),
        (
            "ACLLoss",
            lambda impl: ACLLoss(c, impl=impl),
            lambda m: m(feats, labels, logits.view(views, bsz, c).transpose(0, 1), queue, queue_labels),
        ),
    ]:
        values = []
        for impl in ("reference", "torch"):
            module = make(impl)
            if hasattr(module, "cal_weight_for_classes"):
                module.cal_weight_for_classes(counts)
            values.append(call(module).item())
        out.append((name, *values))
    return out


_CHILD = """
import json, sys, time, torch, torch.nn.functional as F
from acl_kernels import contrastive_loss
n, d, mode, what, repeats = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
impls = sys.argv[6].split(',')
def status(key):
    return max(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))
g = torch.Generator().manual_seed(0)
z = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
y = torch.randint(0, 100, (n,), generator=g)
def step(z, y, impl):
    contrastive_loss(z, y, mode=mode, temperature=0.1, impl=impl).backward()
for impl in impls:
    step(z[:64].detach().requires_grad_(), y[:64], impl)  # load code paths at a tiny size
z.grad = torch.zeros_like(z)  # the gradient buffer counts as an input, not as loss memory
if what == 'memory':
    base = status('VmRSS')
    open('/proc/self/clear_refs', 'w').write('5')  # reset the peak-RSS counter (VmHWM)
    step(z, y, impls[0])
    print(json.dumps({impls[0]: status('VmHWM') - base}))
else:
    times = {impl: [] for impl in impls}
    for i in range(repeats + 1):  # interleaved, so a change of machine load hits every impl alike
        for impl in impls:
            t0 = time.perf_counter(); step(z, y, impl); t = time.perf_counter() - t0
            if i:  # the first round is a warm-up
                times[impl].append(t)
    print(json.dumps({impl: sorted(t)[len(t) // 2] for impl, t in times.items()}))
"""


def _child(n: int, d: int, mode: str, what: str, repeats: int, impls: list[str], env: dict) -> dict:
    args = [sys.executable, "-c", _CHILD, str(n), str(d), mode, what, str(repeats), ",".join(impls)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(
    n: int, d: int, mode: str = "softmax", repeats: int = 3, impls: tuple[str, ...] = ("reference", "torch")
) -> dict[str, dict]:
    """Per impl: median fwd+bwd time over `repeats` interleaved steps (one process, after a warm-up
    round) and the peak resident memory beyond the inputs of one step (a fresh process per impl).
    A failure (e.g. out of memory) is recorded as {"error": message}."""
    try:
        times = _child(n, d, mode, "time", repeats, list(impls), dict(os.environ))
    except RuntimeError as err:
        return {impl: {"error": str(err)} for impl in impls}
    # A fixed mmap threshold makes glibc return freed tensors to the OS at once, so the peak RSS
    # follows the live tensors instead of the heap's high-water mark (slower: timed apart).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = {}
    for impl in impls:
        try:
            peak = _child(n, d, mode, "memory", 1, [impl], env)[impl]
            out[impl] = {"time_s": times[impl], "peak_extra_bytes": peak}
        except RuntimeError as err:
            out[impl] = {"error": str(err)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    print("Each preset, reference vs chunked torch path (256 images x 2 views, d=128, 10 classes):")
    print(f"{'preset':<12}{'reference':>14}{'torch':>14}{'rel. diff':>12}")
    for name, ref, tor in preset_values():
        print(f"{name:<12}{ref:>14.6f}{tor:>14.6f}{abs(ref - tor) / abs(ref):>12.1e}")

    print(
        f"\nSupCon fwd+bwd on CPU ({torch.get_num_threads()} threads), d={args.dim}, fp32, "
        f"median of {args.repeats}; memory = peak RSS beyond inputs:"
    )
    print(f"{'N':>7}{'impl':>11}{'time [s]':>11}{'peak [MiB]':>12}{'time ratio':>12}{'memory ratio':>14}")
    for n in args.sizes:
        started = time.perf_counter()
        results = measure(n, args.dim, repeats=args.repeats)
        ref = results["reference"]
        for impl, r in results.items():
            if "error" in r:
                print(f"{n:>7}{impl:>11}  failed: {r['error']}")
                continue
            ratio = ""
            if impl == "torch" and "error" not in ref:
                ratio = (
                    f"{r['time_s'] / ref['time_s']:>12.2f}"
                    f"{r['peak_extra_bytes'] / max(ref['peak_extra_bytes'], 1):>14.3f}"
                )
            print(f"{n:>7}{impl:>11}{r['time_s']:>11.3f}{r['peak_extra_bytes'] / 2**20:>12.1f}{ratio}")
        print(f"{'':>7}({time.perf_counter() - started:.0f} s for this size)")


if __name__ == "__main__":
    main()
