"""Triton backend: launchers of the fused kernels, the autograd glue and the dispatcher hooks.

Layers (Liger style): `triton_kernels.py` holds only the `@triton.jit` kernels; here `fwd()` /
`bwd()` check, allocate and launch; two `torch.library` custom ops (`acl_kernels::contrastive_fwd`,
`acl_kernels::contrastive_bwd`, each with a fake implementation) carry them through
`torch.compile` without a graph break, and `register_autograd` ties the backward to the forward.
`refuses()` / `triton_loss()` are what `acl_kernels.dispatch` calls.

Under the Triton interpreter (TRITON_INTERPRET=1 set before this module is first imported) the
kernels run on CPU tensors; that is how they are tested without a GPU.
"""

import contextlib
import functools
import inspect

import torch
import triton
from torch import Tensor

from . import triton_kernels as K
from .problem import LossProblem

# True when the kernels were built by the interpreter (decided when triton_kernels was imported).
INTERPRET = not isinstance(K._fwd_kernel, triton.runtime.JITFunction)
# Tests set this to fill every buffer the launchers allocate with NaN, so unwritten tails fail.
POISON = False

BLOCK_M = 64  # anchor rows per program
BLOCK_N = 64  # contrast columns per step
BLOCK_D = 64  # feature chunk of the similarity dot (any d: a loop over chunks)
BLOCK_DO = 64  # feature chunk of the gradient one backward program writes
CENTRE_BLOCK_M = 32
CENTRE_BLOCK_C = 128
NUM_WARPS = 4
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def _launch_opts() -> dict:
    return {} if INTERPRET else {"num_warps": NUM_WARPS}


def sample_constexprs(dtype: torch.dtype, aligned: bool) -> dict:
    """The constexpr arguments the sample kernels get for data of `dtype` (one specialisation)."""
    return _sample_constexprs(dtype, aligned, INTERPRET, torch.backends.cuda.matmul.allow_tf32)


def _sample_constexprs(dtype: torch.dtype, aligned: bool, interpret: bool, tf32: bool) -> dict:
    # fp16 data: the backward product of fp32 dl with the rows runs in tf32 (fp16's mantissa, fp32's
    # range); fp32 data: tf32 only where PyTorch's own matmuls use it.
    precision = "tf32" if dtype == torch.float16 or (dtype == torch.float32 and tf32) else "ieee"
    return {
        "ALIGNED": aligned,
        "UPCAST": interpret and dtype == torch.bfloat16,
        "PRECISION": precision,
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": BLOCK_N,
        "BLOCK_D": BLOCK_D,
    }


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
    """(t of the own centre, t of every other centre), as problem.tile()."""
    if aligned or smooth == 0:
        return beta, 0.0
    return beta * (1.0 - smooth), (beta * smooth / (n_cls - 1) if n_cls > 1 else 0.0)


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
    y = labels.to(torch.int32).contiguous()
    ws = w_same.to(torch.float32).contiguous()
    wo = w_other.to(torch.float32).contiguous()
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
        y_here = y if first == 0 else y[first:end].clone()  # a fresh (aligned) buffer, as in one process
        K._centre_fwd_kernel[(triton.cdiv(n_here, CENTRE_BLOCK_M),)](
            u, prior, y_here, cstats, n_here, n_cls, u.stride(0), 1.0 / supt, t_own, t_off,
            HAS_PRIOR=log_prior is not None, ALIGNED=aligned,
            BLOCK_M=CENTRE_BLOCK_M, BLOCK_C=CENTRE_BLOCK_C, **_launch_opts(),
        )  # fmt: skip
    K._fwd_kernel[(triton.cdiv(n_here, BLOCK_M),)](
        zc, y, ws, wo, cstats if cstats is not None else loss, loss, stats,
        first, end, m_rows, d, 1.0 / temperature, alpha,
        HAS_CENTRES=cstats is not None, **sample_constexprs(zc.dtype, aligned), **_launch_opts(),
    )  # fmt: skip
    return loss, stats


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

    A process group passes out_rows ([n_own] ascending global indices of its rows: dz is their
    gradient, [n_own, d]; no queue gradient) and anchors (its slice of the anchors, whose rows
    centre_logits holds); stats and coef are always those of all n_anchor anchors.
    """
    zc = _contrast(z, queue)
    m_rows, d = zc.shape
    n = z.shape[0]
    dev = zc.device
    y = labels.to(torch.int32).contiguous()
    coef = coef.to(torch.float32).contiguous()
    stats = stats.contiguous()
    dz = dq = du = None
    if out_rows is not None and need_queue:
        raise ValueError("triton backend: a process group's queue is a constant and gets no gradient")
    if need_z or need_queue:
        n_out = (m_rows if need_queue else n) if out_rows is None else out_rows.shape[0]
        dzc = _empty((n_out, d), z.dtype, dev)
        # int32 output-row indices (one process: the labels stand in, unread, for the same signature)
        idx = y if out_rows is None else out_rows.to(device=dev, dtype=torch.int32).contiguous()
        consts = sample_constexprs(zc.dtype, aligned)
        consts["DL_LOW"] = zc.dtype == torch.bfloat16 and not INTERPRET
        if n_out > 0:
            K._bwd_kernel[(triton.cdiv(n_out, BLOCK_M), triton.cdiv(d, BLOCK_DO))](
                zc, y, w_same.to(torch.float32).contiguous(), w_other.to(torch.float32).contiguous(), stats, coef,
                dzc, idx, n_anchor, m_rows, n_out, d, 1.0 / temperature, alpha,
                ROW_INDEX=out_rows is not None, BLOCK_DO=BLOCK_DO, **consts, **_launch_opts(),
            )  # fmt: skip
        dz = (dzc[:n] if out_rows is None else dzc) if need_z else None
        dq = dzc[n:].clone() if need_queue else None  # outputs of an op may not alias
    if need_centres:
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
                BLOCK_M=CENTRE_BLOCK_M, BLOCK_C=CENTRE_BLOCK_C, **_launch_opts(),
            )  # fmt: skip
        du = du.to(centre_logits.dtype)
    return dz, dq, du


# ---- torch.library registration ---------------------------------------------------------------


@torch.library.custom_op("acl_kernels::contrastive_fwd", mutates_args=())
def contrastive_fwd(
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
) -> tuple[Tensor, Tensor]:
    """Fused forward: ([n_anchor] fp32 per-anchor losses, [n_anchor, 4] fp32 row statistics)."""
    return fwd(z, labels, queue, centre_logits, log_prior, w_same, w_other, n_anchor, aligned,
               temperature, alpha, beta, supt, smooth)  # fmt: skip


@contrastive_fwd.register_fake
def _(z, labels, queue, centre_logits, log_prior, w_same, w_other, n_anchor, aligned, temperature, alpha,
      beta, supt, smooth):  # fmt: skip
    return z.new_empty((n_anchor,), dtype=torch.float32), z.new_empty((n_anchor, 4), dtype=torch.float32)


@torch.library.custom_op("acl_kernels::contrastive_bwd", mutates_args=())
def contrastive_bwd(
    grad_loss: Tensor,
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused backward: (dz, dqueue, dcentre_logits); an input that needs no gradient gets an empty tensor."""
    dz, dq, du = bwd(grad_loss, stats, z, labels, queue, centre_logits, log_prior, w_same, w_other, n_anchor,
                     aligned, temperature, alpha, beta, supt, smooth, need_z, need_queue, need_centres)  # fmt: skip
    none = z.new_empty((0,))
    return (dz if dz is not None else none, dq if dq is not None else none.clone(),
            du if du is not None else none.clone())  # fmt: skip


@contrastive_bwd.register_fake
def _(grad_loss, stats, z, labels, queue, centre_logits, log_prior, w_same, w_other, n_anchor, aligned,
      temperature, alpha, beta, supt, smooth, need_z, need_queue, need_centres):  # fmt: skip
    # contiguous like the real outputs (empty_like would copy the strides of a non-contiguous input)
    dz = z.new_empty(z.shape) if need_z else z.new_empty((0,))
    dq = z.new_empty(queue.shape) if need_queue else z.new_empty((0,))
    du = centre_logits.new_empty(centre_logits.shape) if need_centres else z.new_empty((0,))
    return dz, dq, du


_FWD_ARGS = ("z", "labels", "queue", "centre_logits", "log_prior", "w_same", "w_other", "n_anchor", "aligned",
             "temperature", "alpha", "beta", "supt", "smooth")  # fmt: skip


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs))
    _, stats = output
    ctx.save_for_backward(stats, args["z"], args["labels"], args["queue"], args["centre_logits"],
                          args["log_prior"], args["w_same"], args["w_other"])  # fmt: skip
    ctx.scalars = tuple(args[k] for k in _FWD_ARGS[7:])


def _backward(ctx, grad_loss, grad_stats):
    stats, z, labels, queue, centre_logits, log_prior, w_same, w_other = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_z, need_q, need_u = need[0], need[2] and queue is not None, need[3] and centre_logits is not None
    if not (need_z or need_q or need_u):
        return (None,) * len(_FWD_ARGS)
    dz, dq, du = contrastive_bwd(grad_loss, stats, z, labels, queue, centre_logits, log_prior, w_same,
                                 w_other, *ctx.scalars, need_z, need_q, need_u)  # fmt: skip
    return (dz if need_z else None, None, dq if need_q else None, du if need_u else None) + (None,) * 10


torch.library.register_autograd("acl_kernels::contrastive_fwd", _backward, setup_context=_setup_context)


# ---- dispatcher hooks ---------------------------------------------------------------------------


def refuses(p: LossProblem) -> list[str]:
    """Reasons the Triton backend cannot compute `p` ([] = it can; a process group goes through
    `row_statistics` / `row_gradients`)."""
    reasons = []
    if p.pos_mask is not None:
        reasons.append("an explicit positive mask (SupCon `mask=`) is only supported by impl='reference'")
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
    """[n_anchor] per-anchor losses (times loss_scale), differentiable in z, queue and centre_logits."""
    assert not p.distributed, "a process group goes through acl_kernels.distributed"
    reasons = refuses(p)
    if reasons:
        raise ValueError("impl='triton' cannot compute this loss: " + "; ".join(reasons))
    loss, _ = contrastive_fwd(
        p.z, p.contrast_labels(), p.queue, p.centre_logits, p.log_prior, p.w_same, p.w_other, p.n_anchor,
        p.mode == "aligned", float(p.temperature), float(p.alpha), float(p.beta), float(p.supt), float(p.smooth),
    )  # fmt: skip
    return loss * p.loss_scale


def row_statistics(p: LossProblem) -> tuple[Tensor, Tensor]:
    """RowStats.forward: (losses [a] times loss_scale, stats [a, 4] fp32) of the anchors p.anchors
    against all M columns (p.centre_logits holds those anchors' rows)."""
    loss, stats = fwd(
        p.z, p.contrast_labels(), p.queue, p.centre_logits, p.log_prior, p.w_same, p.w_other, p.n_anchor,
        p.mode == "aligned", float(p.temperature), float(p.alpha), float(p.beta), float(p.supt), float(p.smooth),
        anchors=p.anchors,
    )  # fmt: skip
    return loss * p.loss_scale, stats


def row_gradients(
    p: LossProblem, stats: Tensor, grad: Tensor, need_z: bool, need_u: bool
) -> tuple[Tensor | None, Tensor | None]:
    """RowStats.backward: (dL/dz of the rows p.own_rows [n_own, d], dL/du of the anchors p.anchors).

    stats [n_anchor, 4] and grad [n_anchor] are every rank's anchors'. The same backward kernel as
    one process, its output rows taken from the index vector p.own_rows: the row term of the own
    anchors and the column term of all anchors against the own rows, from one similarity tile.
    """
    coef = grad.to(torch.float32) * p.loss_scale
    need_u = need_u and p.centre_logits is not None
    dz, _, du = bwd(
        coef, stats, p.z, p.contrast_labels(), p.queue, p.centre_logits, p.log_prior, p.w_same, p.w_other,
        p.n_anchor, p.mode == "aligned", float(p.temperature), float(p.alpha), float(p.beta), float(p.supt),
        float(p.smooth), need_z, False, need_u, out_rows=p.own_rows, anchors=p.anchors,
    )  # fmt: skip
    return dz, du


_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def specialisations():
    """Every (kernel, signature, constexprs, attrs) the launchers above can compile on a GPU.

    One entry per combination of data dtype (fp32 both with and without tf32), mode, centre block
    and prior, and for the backward kernel with and without the output-row index vector of a
    process group (ROW_INDEX); pointers carry the 16-byte divisibility hint of PyTorch allocations
    (the per-anchor slices a process group needs are passed as fresh copies, not offset views),
    and the sample kernels come with and without the hint on d. The forward kernel's row_start is
    never specialised. (Triton also specialises integer arguments equal to 1; those variants are
    not listed.) Used by the sm90 compile test.
    """
    ptr = [["tt.divisibility", 16]]
    for dtype in DTYPES:
        tf32_options = (False, True) if dtype == torch.float32 else (None,)
        for tf32 in tf32_options:
            t = "*" + _TL[dtype]
            for aligned in (False, True):
                consts = _sample_constexprs(dtype, aligned, False, bool(tf32))
                for d_hint in (False, True):
                    for centres in (False, True):
                        sig = {"zc_ptr": t, "y_ptr": "*i32", "ws_ptr": "*fp32", "wo_ptr": "*fp32",
                               "cstats_ptr": "*fp32", "loss_ptr": "*fp32", "stats_ptr": "*fp32",
                               "row_start": "i32", "row_end": "i32", "M": "i32", "D": "i32", "scale": "fp32",
                               "alpha": "fp32"}
                        c = dict(consts, HAS_CENTRES=centres)
                        attrs = {(i,): ptr for i in range(7)} | ({(10,): ptr} if d_hint else {})
                        yield K._fwd_kernel, sig, c, attrs
                    for row_index in (False, True):  # one process / a process group's own rows
                        sig = {"zc_ptr": t, "y_ptr": "*i32", "ws_ptr": "*fp32", "wo_ptr": "*fp32",
                               "stats_ptr": "*fp32", "coef_ptr": "*fp32", "dzc_ptr": t, "rows_ptr": "*i32",
                               "n_anchor": "i32", "M": "i32", "n_out": "i32", "D": "i32", "scale": "fp32",
                               "alpha": "fp32"}
                        c = dict(consts, BLOCK_DO=BLOCK_DO, DL_LOW=dtype == torch.bfloat16, ROW_INDEX=row_index)
                        attrs = {(i,): ptr for i in range(8)} | ({(11,): ptr} if d_hint else {})
                        yield K._bwd_kernel, sig, c, attrs
            if tf32:
                continue
            for aligned in (False, True):
                for prior in (False, True):
                    c = {"HAS_PRIOR": prior, "ALIGNED": aligned, "BLOCK_M": CENTRE_BLOCK_M,
                         "BLOCK_C": CENTRE_BLOCK_C}
                    sig = {"u_ptr": t, "prior_ptr": "*fp32", "y_ptr": "*i32", "cstats_ptr": "*fp32",
                           "n_anchor": "i32", "C": "i32", "stride_u": "i32", "inv_supt": "fp32",
                           "t_own": "fp32", "t_off": "fp32"}
                    yield K._centre_fwd_kernel, sig, dict(c), {(i,): ptr for i in range(4)}
                    sig = {"u_ptr": t, "prior_ptr": "*fp32", "y_ptr": "*i32", "stats_ptr": "*fp32",
                           "coef_ptr": "*fp32", "du_ptr": t, "n_anchor": "i32", "C": "i32", "stride_u": "i32",
                           "stride_du": "i32", "inv_supt": "fp32", "t_own": "fp32", "t_off": "fp32"}
                    yield K._centre_bwd_kernel, sig, dict(c), {(i,): ptr for i in range(6)}


def similarity_flops(n_anchor: int, n_contrast: int, d: int) -> float:
    """FLOPs of the three similarity-sized GEMM passes (forward, backward recompute, gradient)."""
    return 3 * 2.0 * n_anchor * n_contrast * d


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
