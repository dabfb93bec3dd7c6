"""Static cost report of the Triton kernels on every GPU family, without a GPU.

Compiles every kernel specialisation the launchers produce on a compute capability (`--arch`, 80
A100 ... 120 RTX 5090; default 90) for the shapes given (triton.compile for GPUTarget("cuda", CAP,
32) with that family's tile tables: the whole pipeline down to a cubin runs on CPU) and reads what
the compiled code will cost:

- registers, spill bytes (the ptxas -v log of the compilation), shared memory, num_warps,
  num_stages, and the tensor-core instructions the dots became (`mma`: HMMA = mma.sync on
  Ampere, Ada and consumer Blackwell, HGMMA = wgmma on Hopper, UTCHMMA = tcgen05 on datacenter
  Blackwell; `wgmma`: HGMMA present);
- from the SASS (Triton's nvdisasm): each main loop is found as a backward branch; its body's
  instructions and MUFU ops (ex2, lg2, rcp, ...) per iteration, times the threads of the program,
  divided by the matrix elements one iteration covers, give the dynamic instructions and MUFU ops
  per matrix element (an inner loop counts `inner_trips` times);
- how often the similarity tile is computed per element pair;
- a roofline prediction for N anchors x N columns (default N = 65536) on one GPU of the family
  (MACHINES: A100, L40S, H100, B200, RTX 5090): the largest of instruction issue, MUFU throughput
  and tensor-core time (constants printed with the table), and for fwd+bwd its ratio to three
  similarity-sized GEMM passes at the family's tensor rate (floor_ratio).

These are predictions from compiled code, not GPU measurements; bench/gpu_check.sh measures.

Rows (one per kernel and main loop, one "total" per kernel, one "fwd+bwd" per mode) go to
bench/results/kernel_cost.csv under a tag; a run replaces the rows of its own tag and targets only.

    python bench/kernel_cost.py --tag after          # the current kernels on sm_90
    python bench/kernel_cost.py --arch 80 89 90 100 120 --dtypes bf16 --dims 128 --centres off --no-write
    python bench/kernel_cost.py --dtypes bf16 --dims 128 --modes softmax --no-write
    # the kernels of another commit (its package first on the path), e.g. the pre-v2 kernels:
    git worktree add /tmp/before 1117811
    PYTHONPATH=/tmp/before python bench/kernel_cost.py --tag before
"""

import argparse
import concurrent.futures
import contextlib
import csv
import datetime
import importlib.util
import inspect
import io
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from acl_kernels.ops.contrastive import triton_backend as tb

try:
    from acl_kernels.ops.contrastive import tiles
except ImportError:  # a commit before the tables per family (--tag before): this checkout's families
    _spec = importlib.util.spec_from_file_location(
        "acl_tiles", os.path.join(os.path.dirname(__file__), os.pardir, "acl_kernels", "ops", "contrastive", "tiles.py")
    )
    tiles = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(tiles)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CSV = os.path.join(HERE, "results", "kernel_cost.csv")


@dataclass(frozen=True)
class Machine:
    """The roofline of one GPU of a family (sources: bench/NOTES.md, "Every GPU family")."""

    name: str
    arch: int
    sms: int
    clock_hz: float
    tensor_tflops: dict  # dense peak per data type (fp32: FMA units); a type without a number is not modelled
    warp_issues_per_clock: int = 4  # per SM: one per scheduler
    mufu_per_clock: int = 16  # per SM, thread-level operations (ex2, lg2, rcp, ...)


# One GPU per family: the one the README's predictions name.
MACHINES = {
    "ampere": Machine("A100 SXM4", 80, 108, 1.41e9, {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    "ada": Machine("L40S", 89, 142, 2.52e9, {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    "hopper": Machine("H100 SXM", 90, 132, 1.75e9, {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    "blackwell": Machine("B200", 100, 148, 1.86e9, {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    "blackwell-consumer": Machine("RTX 5090", 120, 170, 2.407e9, {"bf16": 209.5, "fp16": 209.5}),
}
# A realistic share of the tensor-core peak for a fused GEMM (650 of H100's 989 TFLOP/s), every family.
TENSOR_EFFICIENCY = 650.0 / 989.0


def machine(arch: int) -> Machine:
    return MACHINES[tiles.family_of(arch)]


FIELDS = ["tag", "git_sha", "date", "arch", "gpu", "mma", "kernel", "mode", "dtype", "d", "centres", "loop",
          "block_m", "block_n", "num_warps", "num_stages", "registers", "spill_bytes", "shared_bytes", "wgmma",
          "fraction", "sass_per_element", "mufu_per_element", "similarity_passes", "gemm_passes", "issue_ms",
          "mufu_ms", "tensor_ms", "predicted_ms", "floor_ms", "floor_ratio", "n", "band_fraction"]  # fmt: skip


@dataclass
class Compiled:
    """What one compiled specialisation costs: resources (ptxas) and the SASS."""

    registers: int
    spill_bytes: int  # ptxas "bytes spill stores"
    stack_bytes: int  # ptxas "bytes stack frame"
    shared_bytes: int
    num_warps: int
    num_stages: int
    has_cubin: bool
    sass: str

    @property
    def wgmma(self) -> bool:
        return "HGMMA" in self.sass

    @property
    def mma(self) -> str:
        """The tensor-core instructions the dots became (SASS opcodes, e.g. HMMA, HGMMA, UTCHMMA)."""
        found = {m.group(3).split(".")[0] for m in _INSTR.finditer(self.sass)}
        return " ".join(sorted(op for op in found if op in TENSOR_OPCODES))


# SASS opcodes of tensor-core MMAs: mma.sync (Ampere, Ada, consumer Blackwell), wgmma (Hopper),
# tcgen05.mma (datacenter Blackwell).
TENSOR_OPCODES = {"HMMA", "HGMMA", "UTCHMMA", "UTCQMMA", "UTCMMA", "UTCOMMA"}


def _tool(name: str) -> str:
    return getattr(triton.knobs.nvidia, name).path


def describe(spec) -> str:
    i = spec.info
    return (
        f"{spec.kernel.__name__} {i['dtype']} d={i['d']} {i['mode']} centres={i['centres']} "
        f"{i['block_m']}x{i['block_n']} warps={spec.options['num_warps']} stages={spec.options['num_stages']}"
    )


def compile_spec(spec, sass: bool = True) -> Compiled:
    """Compile one Spec for its target (spec.info["arch"], default sm_90) and read its resources:
    registers and spills from the ptxas -v log of this very compilation (so it always compiles, the
    Triton cache is bypassed), shared memory from the metadata, the SASS (when `sass`) from nvdisasm
    on the cubin."""
    signature = dict(spec.signature) | {name: "constexpr" for name in spec.constexprs}
    src = ASTSource(spec.kernel, signature, spec.constexprs, spec.attrs)
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        target = GPUTarget("cuda", spec.info.get("arch", 90), 32)
        compiled = triton.compile(src, target=target, options=spec.options)
    cubin = compiled.asm.get("cubin") or b""
    text = ""
    if sass and cubin:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            run = subprocess.run([_tool("nvdisasm"), "-c", f.name], check=True, capture_output=True, text=True)
            text = run.stdout
    log = log.getvalue()
    return Compiled(
        registers=_ptxas_number(log, r"Used (\d+) registers"),
        spill_bytes=_ptxas_number(log, r"(\d+) bytes spill stores"),
        stack_bytes=_ptxas_number(log, r"(\d+) bytes stack frame"),
        shared_bytes=int(compiled.metadata.shared),
        num_warps=int(compiled.metadata.num_warps),
        num_stages=int(compiled.metadata.num_stages),
        has_cubin=bool(cubin),
        sass=text,
    )


def _ptxas_number(log: str, pattern: str) -> int:
    found = re.search(pattern, log)
    if found is None:
        raise RuntimeError(f"ptxas -v output has no match for {pattern!r}:\n{log}")
    return int(found.group(1))


def _kernel_ref(spec):
    """The spec with its kernel named (module, name): a Triton kernel does not pickle."""
    return spec._replace(kernel=(spec.kernel.fn.__module__, spec.kernel.fn.__name__))


def _compile_ref(spec, sass: bool):
    try:
        module, name = spec.kernel
        spec = spec._replace(kernel=getattr(importlib.import_module(module), name))
        return compile_spec(spec, sass)
    except Exception as err:  # reported by the caller with the spec it belongs to
        return RuntimeError(f"{type(err).__name__}: {str(err)[:2000]}")


def compile_many(specs: list, jobs: int = 2, sass: bool = True):
    """[(spec, Compiled or the exception it raised)], compiled in `jobs` worker processes. They start
    from a fresh interpreter (spawn), not a fork of this one: a fork of a process with other threads
    (a test run's DALI or torch threads) can inherit a lock another thread held, and hang."""
    refs = [_kernel_ref(s) for s in specs]
    if jobs <= 1:
        results = [_compile_ref(r, sass) for r in refs]
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            results = list(pool.map(_compile_ref, refs, [sass] * len(refs)))
    return list(zip(specs, results))


# ---- the SASS: main loops and what they issue ------------------------------------------------------

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclass
class Loop:
    start: int  # index of the first instruction of the body
    end: int  # index of the backward branch (inclusive)
    instructions: int
    mufu: int
    inner: list  # loops nested inside, same structure


def sass_loops(sass: str) -> list[Loop]:
    """The outermost loops of a kernel's SASS in address order, each with its nested loops: a loop
    is the range from a label to the last backward branch to it. Branches placed after the last
    EXIT are out-of-line blocks, not loops of the body: the trap (a branch to itself) and, in
    tcgen05 code (sm_100), the retry stubs of mbarrier waits that jump back into the loop they
    left. Wait loops inside the body (_spin) are left out too."""
    opcodes, labels, branches, last_exit = [], {}, [], 0
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(opcodes)
            continue
        instr = _INSTR.search(line)
        if instr is None:
            continue
        opcode = instr.group(3)
        target = _TARGET.search(instr.group(4))
        if opcode.startswith(("BRA", "JMP")) and target:
            branches.append((len(opcodes), target.group(1)))
        if opcode == "EXIT":
            last_exit = len(opcodes)
        opcodes.append(opcode)
    ranges = {}
    for at, name in branches:
        start = labels.get(name)
        if start is not None and start < at < last_exit:
            ranges[start] = max(ranges.get(start, at), at)
    ranges = {a: b for a, b in ranges.items() if not _spin(opcodes[a : b + 1])}
    spans = sorted(ranges.items(), key=lambda r: (r[0], -r[1]))

    def build(lo: int, hi: int) -> list[Loop]:
        out, i = [], 0
        inside = [s for s in spans if lo <= s[0] and s[1] <= hi]
        while i < len(inside):
            start, end = inside[i]
            nested = [s for s in inside[i + 1 :] if s[1] <= end]
            body = opcodes[start : end + 1]
            mufu = sum(op.startswith("MUFU") for op in body)
            out.append(Loop(start, end, len(body), mufu, build(start + 1, end - 1) if nested else []))
            i += 1 + len(nested)
        return out

    return build(0, len(opcodes))


def _spin(ops: list[str]) -> bool:
    """No loop of the kernel: a few instructions around an mbarrier try-wait, a sleep or a TMEM
    allocation retry, or the elect-one-lane issue of a tcgen05 MMA (ELECT ... BRA.U.ANY: it runs
    once per distinct operand value among the lanes, once where they agree)."""
    if len(ops) <= 8 and any(op.startswith(("SYNCS", "NANOSLEEP", "UTCATOMSWS")) for op in ops):
        return True
    return len(ops) <= 12 and "ELECT" in ops and ops[-1] == "BRA.U.ANY"


def loop_dynamic(loop: Loop, inner_trips: float) -> tuple[float, float]:
    """(instructions, MUFU ops) one thread issues per iteration of `loop`, its inner loops run
    inner_trips times each."""
    n, mufu = float(loop.instructions), float(loop.mufu)
    for inner in loop.inner:
        n += (inner_trips - 1) * inner.instructions
        mufu += (inner_trips - 1) * inner.mufu
    return n, mufu


# ---- the kernels of a commit without Spec (pre-v2: tuple specialisations, 64 x 64 tiles, d chunks) -----


def _before_specs(dtypes, dims, modes, centres):
    """The pre-v2 launchers' specialisations as Specs: one tile config (64 x 64, d in chunks of 64,
    4 warps, Triton's default 3 stages), the similarity re-computed by every 64-wide output chunk of
    the backward, the aligned forward sweeping all columns twice."""
    options = {"num_warps": getattr(tb, "NUM_WARPS", 4), "num_stages": 3}
    chunk = getattr(tb, "BLOCK_DO", 64)
    names = {"*bf16": "bf16", "*fp16": "fp16"}
    for kernel, sig, consts, attrs in tb.specialisations():
        ptr = next(iter(sig.values()))
        name = names.get(ptr) or ("tf32" if consts.get("PRECISION") == "tf32" else "fp32")
        kind = {"_fwd_kernel": "fwd", "_bwd_kernel": "bwd"}.get(kernel.__name__, kernel.__name__.strip("_")[:-7])
        mode = "aligned" if consts["ALIGNED"] else "softmax"
        if name not in dtypes or mode not in modes or consts.get("ROW_INDEX"):
            continue
        if kind in ("fwd", "bwd") and len(attrs) == len([i for i in attrs if i[0] < 8]):  # no hint on d
            continue
        if kind in ("centre_fwd", "centre_bwd"):
            if True not in centres or consts["HAS_PRIOR"]:
                continue
            block = (consts["BLOCK_M"], consts["BLOCK_C"])
            loops = [{"label": "centres", "elements_per_iteration": block[0] * block[1], "fraction": 1.0}]
            info = {"kernel": kind, "mode": mode, "dtype": name, "d": None, "centres": True, "block_m": block[0],
                    "block_n": block[1], "grid_multiplicity": 1, "similarity_passes": 0.0,
                    "gemm": (0.0, 0.0), "loops": loops if kind == "centre_fwd" else []}  # fmt: skip
            yield _Spec(kernel, sig, consts, attrs, options, info)
            continue
        if kind == "fwd" and consts["HAS_CENTRES"] not in centres:
            continue
        for d in dims:
            trips = math.ceil(d / consts["BLOCK_D"])
            elements = consts["BLOCK_M"] * consts["BLOCK_N"]
            sweep = {"label": "sweep", "elements_per_iteration": elements, "fraction": 1.0, "inner_trips": trips}
            if kind == "fwd":
                loops = [sweep] + ([dict(sweep, label="second sweep")] if mode == "aligned" else [])
                multiplicity, gemm = 1, (2.0 if mode == "aligned" else 1.0, 0.0)
            else:
                loops, multiplicity = [sweep], math.ceil(d / chunk)
                gemm = (float(multiplicity), 1.0)
            info = {"kernel": kind, "mode": mode, "dtype": name, "d": d,
                    "centres": bool(consts.get("HAS_CENTRES", False)), "block_m": consts["BLOCK_M"],
                    "block_n": consts["BLOCK_N"], "grid_multiplicity": multiplicity, "loops": loops,
                    "similarity_passes": gemm[0], "gemm": gemm}  # fmt: skip
            yield _Spec(kernel, sig, consts, attrs, options, info)


@dataclass
class _Spec:  # the fields of triton_backend.Spec, for commits that lack it
    kernel: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    info: dict


def select_specs(dtypes, dims, modes, centres, all_tiles=False, arch: int = 90) -> list:
    """The launchers' specialisations on `arch`: commits before the tile tables per family know
    sm_90 only (their specialisations() takes no arch), commits before Spec none of the tables."""
    if not hasattr(tb, "Spec"):
        specs = list(_before_specs(dtypes, dims, modes, centres))
    elif "arch" in inspect.signature(tb.specialisations).parameters:
        return list(tb.specialisations(dtypes=dtypes, dims=dims, modes=modes, centres=centres, all_tiles=all_tiles,
                                       arch=arch))  # fmt: skip
    else:
        specs = list(tb.specialisations(dtypes=dtypes, dims=dims, modes=modes, centres=centres, all_tiles=all_tiles))
    for spec in specs:  # the sm_90 tables of an older commit, compiled for `arch`
        spec.info["arch"] = arch
    return specs


# ---- the roofline -----------------------------------------------------------------------------------


def element_ms(n: int, arch: int = 90) -> tuple[float, float]:
    """(ms per thread-instruction per element, ms per MUFU op per element) over an n x n matrix on
    the family of `arch`."""
    m = machine(arch)
    pairs = float(n) * n
    issue = pairs / (m.sms * m.clock_hz * m.warp_issues_per_clock * 32) * 1e3
    mufu = pairs / (m.sms * m.clock_hz * m.mufu_per_clock) * 1e3
    return issue, mufu


def gemm_pass_ms(n: int, d: int, dtype: str, arch: int = 90) -> float:
    """One similarity-sized GEMM pass (2 n^2 d FLOPs) at the realistic tensor-core rate of `arch`."""
    return 2.0 * n * n * d / (machine(arch).tensor_tflops[dtype] * TENSOR_EFFICIENCY * 1e12) * 1e3


def _fraction(value, band_fraction: float) -> float:
    named = {"band": band_fraction, "off-band": 1.0 - band_fraction}
    return named[value] if isinstance(value, str) else float(value)


def kernel_rows(spec, res: Compiled, n: int, band_fraction: float, classes: int) -> list[dict]:
    """One row per main loop and a "total" row for one compiled specialisation."""
    info = spec.info
    threads = res.num_warps * 32
    loops_info = info["loops"] or [
        {"label": "whole kernel", "elements_per_iteration": info["block_m"] * info["block_n"], "fraction": 1.0}
    ]
    found = sass_loops(res.sass)
    if info["loops"] and len(found) != len(loops_info):
        raise RuntimeError(f"{describe(spec)}: the SASS has {len(found)} outer loops, the spec describes "
                           f"{len(loops_info)} ({[lp['label'] for lp in loops_info]})")  # fmt: skip
    arch = info.get("arch", 90)
    issue_ms, mufu_ms = element_ms(n, arch)
    d = info["d"]
    gemm = info.get("gemm") or (tb.gemm_passes(info["kernel"], info["mode"], d, band_fraction) if d else (0.0, 0.0))
    pass_ms = gemm_pass_ms(n, d, info["dtype"], arch) if d else 0.0
    multiplicity = info["grid_multiplicity"]
    # the centre kernels sweep an N x C matrix: their share of the N x N element pairs is C / N
    scale = 1.0 if d else classes / n
    fractions = [_fraction(lp["fraction"], band_fraction) * scale for lp in loops_info]
    # every program recomputes the similarity of the pairs it visits; the gradient product's
    # passes are spread over the loops like the pairs
    grad_passes = gemm[1] / sum(fractions) if gemm[1] else 0.0
    kernel = info["kernel"] + (" prior" if spec.constexprs.get("HAS_PRIOR") else "")
    base = {"arch": arch, "gpu": machine(arch).name, "mma": res.mma, "kernel": kernel, "mode": info["mode"],
            "dtype": info["dtype"], "d": d if d else "", "centres": info["centres"], "block_m": info["block_m"],
            "block_n": info["block_n"],
            "num_warps": res.num_warps, "num_stages": res.num_stages, "registers": res.registers,
            "spill_bytes": res.spill_bytes, "shared_bytes": res.shared_bytes, "wgmma": res.wgmma, "n": n,
            "band_fraction": band_fraction}  # fmt: skip
    rows = []
    for i, (lp, frac) in enumerate(zip(loops_info, fractions)):
        if info["loops"]:
            instr, mufu = loop_dynamic(found[i], lp.get("inner_trips", 1))
        else:  # no loop: the whole kernel runs once per tile
            ops = [m.group(3) for m in _INSTR.finditer(res.sass) if m.group(3) != "NOP"]
            instr, mufu = float(len(ops)), float(sum(op.startswith("MUFU") for op in ops))
        sim = float(multiplicity) if d else 0.0
        row = dict(base, loop=lp["label"], fraction=frac, similarity_passes=sim, gemm_passes=sim + grad_passes,
                   sass_per_element=instr * threads / lp["elements_per_iteration"],
                   mufu_per_element=mufu * threads / lp["elements_per_iteration"])  # fmt: skip
        row["issue_ms"] = frac * multiplicity * row["sass_per_element"] * issue_ms
        row["mufu_ms"] = frac * multiplicity * row["mufu_per_element"] * mufu_ms
        row["tensor_ms"] = frac * row["gemm_passes"] * pass_ms
        row["predicted_ms"] = max(row["issue_ms"], row["mufu_ms"], row["tensor_ms"])
        rows.append(row)
    total = dict(base, loop="total", fraction=sum(fractions), similarity_passes=gemm[0], gemm_passes=sum(gemm))
    for key in ("sass_per_element", "mufu_per_element"):  # per element pair of the whole matrix
        total[key] = sum(r["fraction"] * multiplicity * r[key] for r in rows)
    total["issue_ms"] = total["sass_per_element"] * issue_ms
    total["mufu_ms"] = total["mufu_per_element"] * mufu_ms
    total["tensor_ms"] = sum(gemm) * pass_ms
    total["predicted_ms"] = max(total["issue_ms"], total["mufu_ms"], total["tensor_ms"])
    return rows + [total]


def step_rows(totals: list[dict]) -> list[dict]:
    """fwd+bwd per (arch, mode, dtype, d, centres): the sample kernels' totals (default tiles), plus
    the first compiled centre forward and backward of that mode and data type when centres are on
    (without the prior; tf32 has none: its centre kernels are fp32's). floor_ms: three similarity-sized
    GEMM passes (forward similarity, backward similarity and gradient product) at the family's
    realistic tensor rate; floor_ratio = predicted / floor."""
    out = []
    for fwd in (r for r in totals if r["kernel"] == "fwd"):
        key = (fwd.get("arch", 90), fwd["mode"], fwd["dtype"])
        same = [r for r in totals if (r.get("arch", 90), r["mode"], r["dtype"]) == key]
        bwd = [r for r in same if r["kernel"] == "bwd" and r["d"] == fwd["d"]]
        first = next(r for r in same if r["kernel"] == "fwd" and r["d"] == fwd["d"])
        if not bwd or (fwd["block_m"], fwd["block_n"]) != (first["block_m"], first["block_n"]):
            continue
        parts = [fwd, bwd[0]]
        if fwd["centres"]:
            for kind in ("centre_fwd", "centre_bwd"):
                parts += [r for r in same if r["kernel"] == kind][:1]
        shared = ("arch", "gpu", "mode", "dtype", "d", "centres", "n", "band_fraction")
        row = {k: "" for k in FIELDS} | {k: fwd.get(k, "") for k in shared}
        row |= {"kernel": "fwd+bwd", "loop": "total"}
        for k in ("sass_per_element", "mufu_per_element", "similarity_passes", "gemm_passes", "issue_ms",
                  "mufu_ms", "tensor_ms", "predicted_ms"):  # fmt: skip
            row[k] = sum(float(p[k] or 0.0) for p in parts)
        row["spill_bytes"] = sum(p["spill_bytes"] for p in parts)
        row["floor_ms"] = 3 * gemm_pass_ms(fwd["n"], fwd["d"], fwd["dtype"], key[0])
        row["floor_ratio"] = row["predicted_ms"] / row["floor_ms"]
        out.append(row)
    return out


# ---- the command line -------------------------------------------------------------------------------


def git_sha() -> str:
    """The commit of the acl_kernels package compiled (+dirty when its kernels differ from it)."""
    where = os.path.dirname(os.path.abspath(tb.__file__))
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=where)
    dirty = subprocess.run(["git", "status", "--porcelain", "."], capture_output=True, text=True, cwd=where)
    return (sha.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def write_csv(path: str, tag: str, rows: list[dict]) -> None:
    """Replace the rows of `tag` for the targets in `rows` in `path` (other tags' and other targets'
    rows stay; rows without a target are sm_90's)."""
    arches = {str(r.get("arch") or 90) for r in rows}
    kept = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if r.get("tag") != tag or (r.get("arch") or "90") not in arches]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in FIELDS} for r in kept)
        writer.writerows({k: _fmt(r.get(k, "")) for k in FIELDS} | {"tag": tag} for r in rows)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def print_table(rows: list[dict]) -> None:
    cols = [("arch", 4), ("kernel", 22), ("mode", 8), ("dtype", 5), ("d", 4), ("centres", 7), ("loop", 16),
            ("block_m", 4), ("block_n", 4), ("num_warps", 3), ("num_stages", 3), ("registers", 4), ("spill_bytes", 6),
            ("shared_bytes", 7), ("mma", 7), ("sass_per_element", 7), ("mufu_per_element", 6),
            ("similarity_passes", 5), ("predicted_ms", 8), ("floor_ratio", 5)]  # fmt: skip
    heads = {"block_m": "bm", "block_n": "bn", "num_warps": "w", "num_stages": "st", "registers": "reg",
             "spill_bytes": "spill", "shared_bytes": "smem", "sass_per_element": "SASS/e", "mufu_per_element": "MUFU/e",
             "similarity_passes": "sim", "predicted_ms": "ms", "floor_ratio": "/floor"}  # fmt: skip
    print("  ".join(f"{heads.get(c, c):>{w}}" for c, w in cols))
    for r in rows:
        print("  ".join(f"{_short(r.get(c, '')):>{w}}" for c, w in cols))


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def constants_text(n: int, d_values, dtypes, arches=(90,)) -> str:
    lines = []
    for arch in arches:
        m = machine(arch)
        issue, mufu = element_ms(n, arch)
        lines += [
            f"sm_{arch} ({tiles.family_of(arch)}), modelled as one {m.name}: {m.sms} SMs, {m.clock_hz / 1e9:.3g} GHz, "
            f"{m.warp_issues_per_clock} warp-issues/clock/SM, {m.mufu_per_clock} MUFU ops/clock/SM; dense tensor peak "
            f"{m.tensor_tflops} TFLOP/s x {TENSOR_EFFICIENCY:.3f}",
            f"  N = {n}: 1 SASS instruction per element = {issue:.4f} ms, 1 MUFU op per element = {mufu:.3f} ms",
        ]
        for dt in (dt for dt in dtypes if dt in m.tensor_tflops):
            for d in d_values:
                lines.append(f"  one similarity-sized GEMM pass, {dt} d = {d}: {gemm_pass_ms(n, d, dt, arch):.3f} ms")
    lines.append("predicted ms = max(issue, MUFU, tensor) per kernel: predictions from compiled code, not measurements")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default="after", help="label of these rows in the CSV (default: after); replaces that tag")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "tf32"], choices=["bf16", "fp16", "fp32", "tf32"],
                   help="data types (tf32: fp32 data with TF32 matmuls allowed); default: bf16 fp16 tf32")  # fmt: skip
    p.add_argument("--dims", nargs="+", type=int, default=[128, 512], help="feature widths d (default: 128 512)")
    p.add_argument("--modes", nargs="+", default=["softmax", "aligned"], choices=["softmax", "aligned"])
    p.add_argument("--centres", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="forward without / with the centre block (default: both)")  # fmt: skip
    p.add_argument(
        "--arch",
        nargs="+",
        type=int,
        default=[90],
        help="compute capabilities to compile for, each with its family's tile tables and roofline "
        "(80 A100, 86, 87, 89 L40S/RTX 4090, 90 H100, 100/103 B200, 120/121 RTX 5090; default 90)",
    )
    p.add_argument("--all-tiles", action="store_true", help="every autotune config, not only the default tiles")
    p.add_argument("--n", type=int, default=65536, help="N of the prediction: N anchors x N columns (default 65536)")
    p.add_argument("--band-fraction", type=float, default=0.02,
                   help="share of element pairs in the label band (default 0.02, about 1000 classes)")  # fmt: skip
    p.add_argument("--classes", type=int, default=1000, help="centre count C of the centre kernels' cost")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--csv", default=DEFAULT_CSV, help="output CSV (default bench/results/kernel_cost.csv)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if any(d <= 0 for d in args.dims):
        p.error(f"--dims: feature widths must be positive integers, got {args.dims}")
    if not 0.0 <= args.band_fraction <= 1.0:
        p.error(f"--band-fraction: expected a share in [0, 1], got {args.band_fraction}")
    if any(a <= 0 for a in args.arch):
        p.error(f"--arch: expected compute capabilities such as 80 or 120, got {args.arch}")
    if args.n <= 0 or args.classes <= 0 or args.jobs <= 0:
        p.error("--n, --classes and --jobs must be positive integers")
    return args


def report(args) -> list[dict]:
    centres = tuple(c == "on" for c in args.centres)
    specs, skipped = [], []
    for arch in args.arch:
        dtypes = tuple(dt for dt in args.dtypes if dt in machine(arch).tensor_tflops)
        skipped += [f"sm_{arch} {dt}" for dt in args.dtypes if dt not in dtypes]
        specs += select_specs(dtypes, tuple(args.dims), tuple(args.modes), centres, args.all_tiles, arch)
    if skipped:
        print(f"no tensor peak recorded for {', '.join(skipped)}: not modelled", file=sys.stderr)
    if not specs:
        raise SystemExit("no kernel specialisation matches these --dtypes / --dims / --modes / --centres")
    rows, totals, failures = [], [], []
    for spec, res in compile_many(specs, args.jobs):
        if isinstance(res, Exception):
            failures.append(f"{describe(spec)}: {res}")
            continue
        krows = kernel_rows(spec, res, args.n, args.band_fraction, args.classes)
        rows += krows
        totals.append(krows[-1])
    rows += step_rows(totals)
    sha, date = git_sha(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for r in rows:
        r |= {"git_sha": sha, "date": date}
    if failures:
        print("failed to compile:\n  " + "\n  ".join(failures), file=sys.stderr)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = report(args)
    print(constants_text(args.n, args.dims, args.dtypes, args.arch))
    print_table(rows)
    if not args.no_write:
        write_csv(args.csv, args.tag, rows)
        print(f"{len(rows)} rows (tag {args.tag}, {rows[0]['git_sha']}) -> {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
