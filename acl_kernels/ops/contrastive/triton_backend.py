"""Triton backend: launchers of the fused kernels, the autograd glue and the dispatcher hooks.

Layers (Liger style): `triton_kernels.py` holds only the `@triton.jit` kernels; here `fwd()` /
`bwd()` sort, check, allocate and launch, and are registered as the CUDA kernels of the op
`acl_kernels::contrastive_fwd` / `contrastive_bwd` (schemas, fakes and autograd: op.py).
`refuses()` / `triton_loss()` are what `acl_kernels.dispatch` calls.

Under the Triton interpreter (TRITON_INTERPRET=1 set before this module is first imported) the
kernels run on CPU tensors; that is how they are tested without a GPU.
"""

import contextlib
import functools
import inspect
import itertools
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from . import op
from . import triton_kernels as K
from .op import contrastive_bwd, contrastive_fwd, register_kernels
from .problem import LossProblem
from .tiles import TILES, Tiles, family_of

# True when the kernels were built by the interpreter (decided when triton_kernels was imported).
INTERPRET = not isinstance(K._fwd_kernel, triton.runtime.JITFunction)
# Tests set this to fill every buffer the launchers allocate with NaN, so unwritten tails fail.
POISON = False
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CENTRE_BLOCK_M = 32
CENTRE_BLOCK_C = 128
CENTRE_WARPS = 8  # 4 warps spill registers in the centre forward (ptxas, sm_90)
# The one-exp form of the backward's off-band tiles needs 2^(s k2 - cbar) <= 2^EXP_HEADROOM (no
# overflow) and every anchor's shift within EXP_HEADROOM of cbar (no underflow of its factor).
EXP_HEADROOM = 100.0
# fp16 gradient products: dl is scaled so that max |coef| becomes 2^FP16_GUARD before rounding to fp16
# (|dl| <= 2^(FP16_GUARD + 2) stays far below fp16's 65504; small probabilities stay normal numbers).
FP16_GUARD = 8


def device_arch(device=None) -> int:
    """Compute capability of a CUDA device as major * 10 + minor (80, 90, 120, ...)."""
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def tile_set(kind: str, dtype: torch.dtype, D: int, arch: int | None = None) -> list[Tiles]:
    """The tile configs of sample kernel `kind` ("fwd"/"bwd") for data of `dtype` and width D on
    compute capability `arch` (default: the current CUDA device): the default first, then the
    autotune alternatives."""
    family = family_of(device_arch() if arch is None else arch)
    return TILES[family][kind, dtype.itemsize][width_class(D)]


# Under the interpreter: one small config, so that the tests' small batches span several tiles.
INTERPRET_TILES = Tiles(32, 32, 4, 1)
# The sorted copy of the rows is zero-padded to a multiple of ROW_ALIGN features, so every row
# starts 16-byte aligned and the kernels are always the specialisation with d divisible by 16
# (unaligned rows cost registers: spills at d = 100 on sm_90).
ROW_ALIGN = 16
WHOLE_D_MAX = 256  # beyond: the similarity in chunks of CHUNK_K, the backward output in chunks of WHOLE_D_MAX
CHUNK_K = 128


def _empty(shape, dtype, device) -> Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _on_device(launcher):
    """Run `launcher` with the CUDA device of its argument `z` current: Triton launches on the
    current device and stream, not on the tensors' device (CUDA tensors on another device than the
    current one would be read from the wrong device)."""
    signature = inspect.signature(launcher)

    @functools.wraps(launcher)
    def wrapped(*args, **kwargs):
        dev = signature.bind(*args, **kwargs).arguments["z"].device
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            return launcher(*args, **kwargs)

    return wrapped


def feature_block(d: int) -> int:
    """The constexpr D of the sample kernels for feature width d: a power of two >= 16."""
    return max(16, triton.next_power_of_2(d))


def width_class(D: int) -> int:
    return 128 if D <= 128 else (256 if D <= WHOLE_D_MAX else 512)


def sample_constexprs(dtype: torch.dtype, aligned: bool, D: int, interpret: bool, tf32: bool) -> dict:
    """The constexpr arguments shared by the sample kernels for data of `dtype` and width D."""
    precision = "ieee" if dtype == torch.float32 and not tf32 else "tf32"
    return {
        "ALIGNED": aligned,
        "UPCAST": interpret and dtype != torch.float32,
        "PRECISION": precision,
        "D": D,
        "BLOCK_K": D if D <= WHOLE_D_MAX else CHUNK_K,
    }


def gemm_passes(kernel: str, mode: str, d: int, band_fraction: float = 0.0) -> tuple[float, float]:
    """(similarity passes, gradient-product passes) per element pair of a sample kernel: how often a
    similarity tile is computed and how often a [tile] x [tile, d] product runs, from the launch
    structure (the backward recomputes the similarity once per output chunk of the features)."""
    D = feature_block(d)
    if kernel == "fwd":
        return (1.0 + (band_fraction if mode == "aligned" else 0.0), 0.0)
    chunks = 1 if D <= WHOLE_D_MAX else triton.cdiv(D, WHOLE_D_MAX)
    return (float(chunks), 1.0)


def similarity_flops(
    n_anchor: int, n_contrast: int, d: int, mode: str = "softmax", band_fraction: float = 0.02
) -> float:
    """FLOPs of the similarity-sized GEMM passes the kernels run for one forward + backward."""
    passes = sum(gemm_passes("fwd", mode, d, band_fraction)) + sum(gemm_passes("bwd", mode, d))
    return passes * 2.0 * n_anchor * n_contrast * d


def _check(z: Tensor, labels: Tensor, w_same: Tensor, w_other: Tensor) -> None:
    if z.dtype not in DTYPES:
        raise TypeError(f"triton backend: features must be fp16/bf16/fp32, got {z.dtype}")
    if labels.shape[0] != z.shape[0] or w_same.shape[0] != z.shape[0] or w_other.shape[0] != z.shape[0]:
        raise ValueError("triton backend: labels and weights need one entry per contrast row")


def _contrast(z: Tensor, queue: Tensor | None) -> Tensor:
    zc = z if queue is None else torch.cat([z, queue.to(z.dtype)])
    return zc.contiguous()


def _centres(centre_logits: Tensor) -> Tensor:
    u = centre_logits if centre_logits.dtype in DTYPES else centre_logits.float()
    return u if u.stride(1) == 1 else u.contiguous()


def _centre_targets(beta: float, smooth: float, n_cls: int, aligned: bool) -> tuple[float, float]:
    """(t of the own centre, t of every other centre), as problem.weights_into()."""
    if aligned or smooth == 0:
        return beta, 0.0
    return beta * (1.0 - smooth), (beta * smooth / (n_cls - 1) if n_cls > 1 else 0.0)


class _Sorted(NamedTuple):
    """The contrast rows sorted by label (stable), and what the kernels need of them."""

    zs: Tensor  # [M, dp] sorted rows, zero-padded to dp = d rounded up to ROW_ALIGN
    y: Tensor  # [M] int32 sorted labels
    band: Tensor  # [2, M] int32 first / one-past-last sorted position of each row's label
    bias: Tensor  # [2, M] fp32 log2 of the weight of each column for its own label / another label
    perm: Tensor  # [M] int64 original row of each sorted position
    where: Tensor  # [M] int64 sorted position of each original row


def _sort(zc: Tensor, labels: Tensor, w_same: Tensor, w_other: Tensor) -> _Sorted:
    y = labels.to(device=zc.device, dtype=torch.int64)
    perm = torch.argsort(y, stable=True)
    ys = y[perm].contiguous()
    band = torch.stack([torch.searchsorted(ys, ys), torch.searchsorted(ys, ys, right=True)]).to(torch.int32)
    w = torch.stack([w_same, w_other]).to(device=zc.device, dtype=torch.float32)[:, perm]
    where = torch.empty_like(perm)
    where[perm] = torch.arange(perm.shape[0], device=perm.device)
    d = zc.shape[1]
    zs = torch.nn.functional.pad(zc[perm], (0, -d % ROW_ALIGN))  # the copy the sort makes anyway
    return _Sorted(zs.contiguous(), ys.to(torch.int32), band.contiguous(), w.log2().contiguous(), perm, where)


def _row_set(srt: _Sorted, rows: Tensor) -> Tensor:
    """[2, n] int32: the sorted positions of original `rows`, ascending, and the index in `rows`
    of each (where the kernel stores its result)."""
    positions, order = torch.sort(srt.where[rows])
    return torch.stack([positions, order]).to(torch.int32).contiguous()


def _int64(*sizes: int) -> bool:
    return max(sizes) >= 2**31


def _launch(kernel, kind: str, dtype: torch.dtype, D: int, grid, args: tuple, consts: dict) -> None:
    """Launch a sample kernel: the interpreter's single tile config, or the autotuned set on a GPU."""
    if INTERPRET:
        t = INTERPRET_TILES
        meta = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}
        kernel[grid(meta)](*args, **consts, **meta)
        return
    _tuned(kernel, kind, dtype, D, device_arch())[grid](*args, **consts)


@functools.cache
def _tuned(kernel, kind: str, dtype: torch.dtype, D: int, arch: int):
    configs = [
        triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps, num_stages=t.num_stages)
        for t in tile_set(kind, dtype, D, arch)
    ]
    return triton.autotune(configs=configs, key=["D", "ALIGNED", "PRECISION", "INT64"])(kernel)


@_on_device
def fwd(
    z: Tensor,
    labels: Tensor,
    queue: Tensor | None,
    centre_logits: Tensor | None,
    log_prior: Tensor | None,
    w_same: Tensor,
    w_other: Tensor,
    n_anchor: int,
    aligned: bool,
    temperature: float,
    alpha: float,
    beta: float,
    supt: float,
    smooth: float,
    anchors: slice | None = None,
) -> tuple[Tensor, Tensor]:
    """([a] fp32 losses without loss_scale, [a, 4] fp32 stats) of the anchors `anchors` (default all
    n_anchor; a process group passes its slice, and centre_logits then holds that slice's rows)
    against all M columns; labels [M], weights [M]."""
    zc = _contrast(z, queue)
    _check(zc, labels, w_same, w_other)
    m_rows, d = zc.shape
    dev = zc.device
    first, end = (0, n_anchor) if anchors is None else (anchors.start, anchors.stop)
    n_here = end - first
    loss = _empty((n_here,), torch.float32, dev)
    stats = _empty((n_here, 4), torch.float32, dev)
    if n_here == 0:
        return loss, stats
    cstats = None
    if centre_logits is not None:
        u = _centres(centre_logits)
        n_cls = u.shape[1]
        t_own, t_off = _centre_targets(beta, smooth, n_cls, aligned)
        cstats = _empty((n_here, 5), torch.float32, dev)
        prior = log_prior.to(device=dev, dtype=torch.float32).contiguous() if log_prior is not None else cstats
        y_here = labels[first:end].to(device=dev, dtype=torch.int32).contiguous()
        K._centre_fwd_kernel[(triton.cdiv(n_here, CENTRE_BLOCK_M),)](
            u, prior, y_here, cstats, n_here, n_cls, u.stride(0), 1.0 / supt, t_own, t_off,
            HAS_PRIOR=log_prior is not None, ALIGNED=aligned,
            BLOCK_M=CENTRE_BLOCK_M, BLOCK_C=CENTRE_BLOCK_C, **_centre_opts(),
        )  # fmt: skip
    srt = _sort(zc, labels, w_same, w_other)
    arow = _row_set(srt, torch.arange(first, end, device=dev))
    d = srt.zs.shape[1]
    D = feature_block(d)
    consts = sample_constexprs(zc.dtype, aligned, D, INTERPRET, torch.backends.cuda.matmul.allow_tf32)
    _launch(
        K._fwd_kernel, "fwd", zc.dtype, D, lambda meta: (triton.cdiv(n_here, meta["BLOCK_M"]),),
        (srt.zs, srt.y, srt.band, srt.bias, arow, cstats if cstats is not None else loss, loss, stats,
         n_here, m_rows, d, LOG2E / temperature, alpha),
        dict(consts, HAS_CENTRES=cstats is not None, INT64=_int64(m_rows * d)),
    )  # fmt: skip
    return loss, stats


LOG2E = 1.4426950408889634


def _backward_rows(srt: _Sorted, stats: Tensor, coef: Tensor, n_anchor: int, aligned: bool, dtype: torch.dtype,
                   k2: float, temperature: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(rowv [ROWV, M] fp32 per sorted row, scal [3] fp32 = (cbar, output scale, one-exp flag)); no
    host synchronisation: everything stays on the device."""
    m, log_mass, inv_a, r = stats.unbind(1)
    coef = torch.where(inv_a > 0, coef, 0.0)
    if dtype == torch.float16:  # keep the fp16-rounded dl inside fp16's normal range
        top = coef.abs().amax().clamp_min(1e-30)
        guard = torch.exp2((FP16_GUARD - torch.ceil(torch.log2(top))).clamp(-120, 120))
    else:
        guard = torch.ones((), device=coef.device)
    coef = coef * guard
    c = m - torch.log2(r) if aligned else m + log_mass  # the stats are in log2 units
    c = torch.where((coef != 0) & ~torch.isnan(c), c, float("inf"))
    finite = torch.isfinite(c)
    cbar = torch.where(finite, c, float("inf")).amin()
    cbar = torch.where(torch.isfinite(cbar), cbar, 0.0)
    spread = torch.where(finite, c - cbar, 0.0).amax()
    n_max = srt.zs.float().norm(dim=1).amax()
    one_exp = (spread <= EXP_HEADROOM) & (k2 * n_max * n_max - cbar <= EXP_HEADROOM)
    f = coef * torch.exp2(cbar - c)
    m_rows = srt.zs.shape[0]
    per_anchor = torch.stack([c, coef, m, log_mass, inv_a, f])  # rows ROW_C .. ROW_F
    # rows that are not anchors: coef 0 and a shift m = +inf, so their dl is 0 * 2^-inf = 0, never
    # 0 * 2^(x - 0) = 0 * inf at small temperatures or for long rows
    inf = float("inf")
    fill = torch.tensor([inf, 0, inf, 0, 0, 0], device=c.device)[:, None].expand(-1, m_rows - n_anchor)
    rowv = torch.cat([torch.cat([per_anchor, fill], 1)[:, srt.perm], torch.exp2(srt.bias[1:2])])
    assert rowv.shape[0] == K.ROWV
    scal = torch.stack([cbar, 1.0 / (temperature * guard), one_exp.float()]).float()
    return rowv.contiguous(), scal


def _centre_opts() -> dict:
    return {} if INTERPRET else {"num_warps": CENTRE_WARPS}


@_on_device
def bwd(
    coef: Tensor,
    stats: Tensor,
    z: Tensor,
    labels: Tensor,
    queue: Tensor | None,
    centre_logits: Tensor | None,
    log_prior: Tensor | None,
    w_same: Tensor,
    w_other: Tensor,
    n_anchor: int,
    aligned: bool,
    temperature: float,
    alpha: float,
    beta: float,
    supt: float,
    smooth: float,
    need_z: bool,
    need_queue: bool,
    need_centres: bool,
    out_rows: Tensor | None = None,
    anchors: slice | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dz, dqueue, dcentre_logits), each None when not needed; coef [n_anchor] = dL/dloss_i.

    A process group passes out_rows ([n_own] global indices of its rows: dz is their gradient,
    [n_own, d]; no queue gradient) and anchors (its slice of the anchors, whose rows centre_logits
    holds); stats and coef are always those of all n_anchor anchors.
    """
    zc = _contrast(z, queue)
    n = z.shape[0]
    coef = coef.to(torch.float32).contiguous()
    stats = stats.to(torch.float32).contiguous()
    dz = dq = du = None
    if out_rows is not None and need_queue:
        raise ValueError("triton backend: a process group's queue is a constant and gets no gradient")
    if need_z or need_queue:
        n_out = (zc.shape[0] if need_queue else n) if out_rows is None else out_rows.shape[0]
        rows = torch.arange(n_out, device=zc.device) if out_rows is None else out_rows.to(zc.device)
        dzc = _row_grads(zc, labels, w_same, w_other, stats, coef, rows, n_anchor, aligned, temperature, alpha)
        dz = (dzc[:n] if out_rows is None else dzc) if need_z else None
        dq = dzc[n:].clone() if need_queue else None  # outputs of an op may not alias
    if need_centres:
        settings = (aligned, beta, supt, smooth)
        du = _centre_grads(centre_logits, log_prior, labels, stats, coef, n_anchor, anchors, *settings)
    return dz, dq, du


def _row_grads(zc: Tensor, labels: Tensor, w_same: Tensor, w_other: Tensor, stats: Tensor, coef: Tensor,
               rows: Tensor, n_anchor: int, aligned: bool, temperature: float, alpha: float) -> Tensor:  # fmt: skip
    """The gradient [len(rows), d] of the loss with respect to the contrast rows `rows` (of z ++ queue)."""
    m_rows, d = zc.shape
    n_out, dev = rows.shape[0], zc.device
    dzc = _empty((n_out, d), zc.dtype, dev)
    if n_out == 0:
        return dzc
    k2 = LOG2E / temperature
    srt = _sort(zc, labels, w_same, w_other)
    dp = srt.zs.shape[1]  # d padded to a multiple of 16
    dzp = dzc if dp == d else _empty((n_out, dp), zc.dtype, dev)
    orow = _row_set(srt, rows)
    rowv, scal = _backward_rows(srt, stats, coef, n_anchor, aligned, zc.dtype, k2, temperature)
    D = feature_block(dp)
    consts = sample_constexprs(zc.dtype, aligned, D, INTERPRET, torch.backends.cuda.matmul.allow_tf32)
    block_do = min(D, WHOLE_D_MAX)
    grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_M"]), triton.cdiv(dp, block_do))  # noqa: E731
    _launch(
        K._bwd_kernel, "bwd", zc.dtype, D, grid,
        (srt.zs, srt.y, srt.band, srt.bias, rowv, orow, scal, dzp, n_out, m_rows, dp, k2, alpha),
        dict(consts, BLOCK_DO=block_do, INT64=_int64(m_rows * dp)),
    )  # fmt: skip
    if dzp is not dzc:
        dzc.copy_(dzp[:, :d])
    return dzc


def _centre_grads(centre_logits: Tensor, log_prior: Tensor | None, labels: Tensor, stats: Tensor, coef: Tensor,
                  n_anchor: int, anchors: slice | None, aligned: bool, beta: float, supt: float,
                  smooth: float) -> Tensor:  # fmt: skip
    """The gradient of the loss with respect to centre_logits (the rows of `anchors`, or all anchors)."""
    dev = coef.device
    y = labels.to(device=dev, dtype=torch.int32).contiguous()
    u = _centres(centre_logits)
    n_cls = u.shape[1]
    t_own, t_off = _centre_targets(beta, smooth, n_cls, aligned)
    du = _empty(tuple(u.shape), u.dtype, dev)
    n_here = n_anchor if anchors is None else anchors.stop - anchors.start
    if anchors is not None and anchors.start != 0:
        # this slice's labels, stats and upstream gradients, in fresh (aligned) buffers
        y, stats, coef = (x[anchors].clone() for x in (y, stats, coef))
    prior = log_prior.to(device=dev, dtype=torch.float32).contiguous() if log_prior is not None else stats
    grid = (triton.cdiv(n_here, CENTRE_BLOCK_M), triton.cdiv(n_cls, CENTRE_BLOCK_C))
    if n_here > 0:
        K._centre_bwd_kernel[grid](
            u, prior, y, stats, coef, du, n_here, n_cls, u.stride(0), du.stride(0), 1.0 / supt, t_own, t_off,
            HAS_PRIOR=log_prior is not None, ALIGNED=aligned,
            BLOCK_M=CENTRE_BLOCK_M, BLOCK_C=CENTRE_BLOCK_C, **_centre_opts(),
        )  # fmt: skip
    return du.to(centre_logits.dtype)


# ---- the op's kernels for this device (schemas, fakes, autograd: op.py) --------------------------

register_kernels("CPU" if INTERPRET else "CUDA", fwd, bwd)


# ---- dispatcher hooks ---------------------------------------------------------------------------


def refuses(p: LossProblem) -> list[str]:
    """Reasons the Triton backend cannot compute `p` ([] = it can; a process group goes through
    `row_statistics` / `row_gradients`)."""
    reasons = []
    if p.pos_mask is not None:
        reasons.append("an explicit positive mask (SupCon `mask=`) is served by impl='torch' (and 'reference')")
    if p.z.dtype not in DTYPES:
        reasons.append(f"features of dtype {p.z.dtype} (the kernels take fp16/bf16/fp32; use impl='torch')")
    if p.z.is_cuda:
        if p.z.dtype == torch.bfloat16 and torch.cuda.get_device_capability(p.z.device) < (8, 0):
            reasons.append("bf16 needs a GPU of compute capability 8.0 or newer")
    elif not INTERPRET:
        reasons.append(
            f"tensors on {p.z.device.type} (the Triton kernels need CUDA tensors; set TRITON_INTERPRET=1 "
            "before importing acl_kernels to run them on CPU through the interpreter)"
        )
    return reasons


def triton_loss(p: LossProblem) -> Tensor:
    """op.loss, after the Triton backend's refusals (an explicit impl='triton' says why it cannot)."""
    reasons = refuses(p)
    if reasons:
        raise ValueError("impl='triton' cannot compute this loss: " + "; ".join(reasons))
    return op.loss(p)


# a process group: the same op (its kernel for this device is the Triton launchers above)
row_statistics, row_gradients = op.row_statistics, op.row_gradients


# ---- what the launchers can compile (sm90 compile test, bench/kernel_cost.py) -----------------

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Data types by name; "tf32" is fp32 data with torch.backends.cuda.matmul.allow_tf32 set.
DTYPE_NAMES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32": (torch.float32, False),
               "tf32": (torch.float32, True)}  # fmt: skip
_PTR = [["tt.divisibility", 16]]


class Spec(NamedTuple):
    """One compilable kernel specialisation and what the cost report needs to know about it."""

    kernel: object  # triton JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict  # num_warps, num_stages (triton.compile options)
    info: dict  # kernel, mode, dtype, d, centres, block_m, block_n, grid_multiplicity, loops, similarity_passes


def _sample_spec(kind: str, name: str, d: int, mode: str, centres: bool, tiles: Tiles, arch: int = 90) -> Spec:
    dtype, tf32 = DTYPE_NAMES[name]
    D = feature_block(d)
    t = "*" + _TL[dtype]
    consts = sample_constexprs(dtype, mode == "aligned", D, False, tf32)
    consts |= {"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "INT64": False}

    def loop(label, fraction, width=tiles.block_n):
        return {"label": label, "elements_per_iteration": tiles.block_m * width, "fraction": fraction, "inner_trips": 1}

    # fraction "band" / "off-band": the share of element pairs the cost report assumes for the band
    # (its --band-fraction) and for the rest; the forward's band tiles are half-width (its BAND_N)
    band = loop("band", "band", tiles.block_n // 2 if kind == "fwd" else tiles.block_n)
    if kind == "fwd":
        sig = {"zs_ptr": t, "y_ptr": "*i32", "band_ptr": "*i32", "bias_ptr": "*fp32", "arow_ptr": "*i32",
               "cstats_ptr": "*fp32", "loss_ptr": "*fp32", "stats_ptr": "*fp32", "n_rows": "i32", "M": "i32",
               "d": "i32", "k2": "fp32", "alpha": "fp32"}  # fmt: skip
        consts["HAS_CENTRES"] = centres
        loops = [band, loop("off-band", "off-band")]
        if mode == "aligned":
            loops.append(dict(band, label="band positives"))
        kernel, multiplicity = K._fwd_kernel, 1
    else:
        sig = {"zs_ptr": t, "y_ptr": "*i32", "band_ptr": "*i32", "bias_ptr": "*fp32", "rowv_ptr": "*fp32",
               "orow_ptr": "*i32", "scal_ptr": "*fp32", "dz_ptr": t, "n_out": "i32", "M": "i32", "d": "i32",
               "k2": "fp32", "alpha": "fp32"}  # fmt: skip
        consts["BLOCK_DO"] = min(D, WHOLE_D_MAX)
        loops = [band, loop("off-band", "off-band"), loop("off-band two-exp", 0.0)]
        kernel, multiplicity = K._bwd_kernel, triton.cdiv(D, consts["BLOCK_DO"])
    attrs = {(i,): _PTR for i in range(8)} | {(10,): _PTR}  # d: a multiple of ROW_ALIGN
    info = {"arch": arch, "kernel": kind, "mode": mode, "dtype": name, "d": d, "centres": centres,
            "block_m": tiles.block_m, "block_n": tiles.block_n, "grid_multiplicity": multiplicity, "loops": loops,
            "similarity_passes": gemm_passes(kind, mode, d)[0]}  # fmt: skip
    options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    return Spec(kernel, sig, consts, attrs, options, info)


def _centre_specs(name: str, mode: str, prior: bool, arch: int):
    dtype = DTYPE_NAMES[name][0]
    t = "*" + _TL[dtype]
    c = {"HAS_PRIOR": prior, "ALIGNED": mode == "aligned", "BLOCK_M": CENTRE_BLOCK_M, "BLOCK_C": CENTRE_BLOCK_C}
    options = {"num_warps": CENTRE_WARPS, "num_stages": 3}
    loop = {"label": "centres", "elements_per_iteration": CENTRE_BLOCK_M * CENTRE_BLOCK_C, "fraction": 1.0,
            "inner_trips": 1}  # fmt: skip
    info = {"arch": arch, "mode": mode, "dtype": name, "d": None, "centres": True, "block_m": CENTRE_BLOCK_M,
            "block_n": CENTRE_BLOCK_C, "grid_multiplicity": 1, "similarity_passes": 0.0}  # fmt: skip
    sig = {"u_ptr": t, "prior_ptr": "*fp32", "y_ptr": "*i32", "cstats_ptr": "*fp32", "n_anchor": "i32", "C": "i32",
           "stride_u": "i32", "inv_supt": "fp32", "t_own": "fp32", "t_off": "fp32"}  # fmt: skip
    yield Spec(K._centre_fwd_kernel, sig, dict(c), {(i,): _PTR for i in range(4)}, options,
               dict(info, kernel="centre_fwd", loops=[loop]))  # fmt: skip
    sig = {"u_ptr": t, "prior_ptr": "*fp32", "y_ptr": "*i32", "stats_ptr": "*fp32", "coef_ptr": "*fp32",
           "du_ptr": t, "n_anchor": "i32", "C": "i32", "stride_u": "i32", "stride_du": "i32", "inv_supt": "fp32",
           "t_own": "fp32", "t_off": "fp32"}  # fmt: skip
    yield Spec(K._centre_bwd_kernel, sig, dict(c), {(i,): _PTR for i in range(6)}, options,
               dict(info, kernel="centre_bwd", loops=[]))  # fmt: skip


def specialisations(dtypes=("bf16", "fp16", "tf32"), dims=(128, 512), modes=("softmax", "aligned"),
                    centres=(False, True), all_tiles=False, arch: int = 90):  # fmt: skip
    """Every kernel specialisation the launchers produce on compute capability `arch` (80, 89, 90,
    100, 120, ...: its family's tile tables) for these data types ("bf16", "fp16", "fp32", "tf32"),
    feature widths, modes and centre blocks: the default tiles of each width class (all_tiles: the
    whole autotune set), with the 16-divisibility hint of PyTorch allocations on the pointers and on
    d (the launchers pad the rows to ROW_ALIGN). Centre kernels come with centres=True."""
    for name in dtypes:
        for d in dims:
            dtype, D = DTYPE_NAMES[name][0], feature_block(d)
            for mode in modes:
                for tiles in tile_set("fwd", dtype, D, arch)[: None if all_tiles else 1]:
                    for c in centres:
                        yield _sample_spec("fwd", name, d, mode, c, tiles, arch)
                for tiles in tile_set("bwd", dtype, D, arch)[: None if all_tiles else 1]:
                    yield _sample_spec("bwd", name, d, mode, any(centres), tiles, arch)
        if True in centres and name != "tf32":
            for mode in modes:
                for prior in (False, True):
                    yield from _centre_specs(name, mode, prior, arch)


def compile_set(arch: int = 90):
    """What the compile test builds for `arch`, each specialisation once. Every autotune config of
    every width class and mode for bf16 and tf32 (2- and 4-byte data: fp16 and fp32 use the same
    shared memory or less); the centre variants with default tiles; fp16 and fp32 (ieee, slow to
    compile) with default tiles at d = 128; the centre kernels for bf16."""
    seen = set()
    for spec in itertools.chain(
        specialisations(("bf16", "tf32"), (128, 256, 512), centres=(False,), all_tiles=True, arch=arch),
        specialisations(("bf16", "tf32"), (128,), centres=(True,), arch=arch),
        specialisations(("fp16", "fp32"), (128,), centres=(False,), arch=arch),
    ):
        key = (spec.kernel, str(spec.signature), str(spec.constexprs), str(spec.attrs), str(spec.options))
        if key not in seen:
            seen.add(key)
            yield spec


__all__ = [
    "refuses",
    "triton_loss",
    "row_statistics",
    "row_gradients",
    "contrastive_fwd",
    "contrastive_bwd",
    "fwd",
    "bwd",
]
