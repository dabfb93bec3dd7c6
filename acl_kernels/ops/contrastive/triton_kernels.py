"""Triton kernels of the fused contrastive loss (only `@triton.jit` code; launchers: triton_backend.py).

Shapes and names (README.md, "Triton kernels"): `zc` [M, D] contrast rows `[z; queue]`, the anchors
are its first `n_anchor` rows; `y` [M] int32 labels; `ws`/`wo` [M] fp32 denominator weights of a
sample column of the anchor's class / of another class; `u` [n_anchor, C] centre logits. Per-anchor
statistics `stats` [n_anchor, 4] fp32 = (m, log_mass, 1/A, R): the shift m, log of the shifted
denominator (softmax) or negative (aligned) mass, the inverse target mass, and, aligned mode only,
R = e^m * sum_p (t_p / A) / (e^l_p + N). Everything is accumulated in fp32.
"""

import triton
import triton.language as tl

# Start value of a running max: finite, so that exp(m_old - m_new) is never exp(-inf + inf).
NO_MAX = tl.constexpr(-1.0e30)


@triton.jit
def _log1p(t):
    # log(1 + t) accurate for tiny t (Goldberg's trick: the rounding of 1 + t cancels out)
    u = 1.0 + t
    return tl.where(u == 1.0, t, tl.log(u) * (t / (u - 1.0)))


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow and accurate where it is tiny (x << 0); 0 at x = -inf
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _similarity(
    zc_ptr,
    rows,
    rmask,
    cols,
    cmask,
    D,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] fp32 dot products zc[rows] . zc[cols], d in chunks of BLOCK_D."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dk = tl.arange(0, BLOCK_D)
    ra = zc_ptr + rows.to(tl.int64)[:, None] * D
    cb = zc_ptr + cols.to(tl.int64)[:, None] * D
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + dk
        km = kk < D
        a = tl.load(ra + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        b = tl.load(cb + kk[None, :], mask=cmask[:, None] & km[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong: compute it in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _anchor_terms(stats_ptr, coef_ptr, idx, mask):
    """(m, log_mass, 1/A, R, coef) of anchors `idx`; coef (upstream gradient x loss scale) is 0 for an
    anchor without a target, whose loss is the constant 0. 0 where `mask` is off."""
    st = stats_ptr + idx * 4
    m = tl.load(st + 0, mask=mask, other=0.0)
    log_mass = tl.load(st + 1, mask=mask, other=0.0)
    inv_a = tl.load(st + 2, mask=mask, other=0.0)
    r = tl.load(st + 3, mask=mask, other=0.0)
    coef = tl.load(coef_ptr + idx, mask=mask, other=0.0)
    return m, log_mass, inv_a, r, tl.where(inv_a > 0, coef, 0.0)


@triton.jit
def _dlogits(l, pos, g, m, log_mass, inv_a, r, alpha, ALIGNED: tl.constexpr):
    """dL_i/dl of sample logits (without the upstream coefficient); the stats broadcast along i.

    softmax: g e^(l - m - log_mass) - t / A.  aligned: -(t / A) N / (e^l + N) on positives,
    g e^(l - m) R on negatives (g > 0 and not positive), 0 elsewhere; t = alpha on positives.
    """
    if ALIGNED:
        lp = l - m
        attract = -(alpha * inv_a) / (1.0 + tl.exp(lp - log_mass))
        repel = g * tl.exp(lp) * r
        dl = tl.where(pos, attract, tl.where(g > 0, repel, 0.0))
    else:
        prob = tl.where(g > 0, g * tl.exp((l - m) - log_mass), 0.0)  # l - m first: exact near the max
        dl = prob - tl.where(pos, alpha * inv_a, 0.0)
    return dl


@triton.jit
def _centre_fwd_kernel(
    u_ptr,
    prior_ptr,
    y_ptr,
    cstats_ptr,
    n_anchor,
    C,
    stride_u,
    inv_supt,
    t_own,
    t_off,
    HAS_PRIOR: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per anchor, over the C centre columns l = (u + log prior) / supt (weight g = 1):
    cstats [n_anchor, 5] = (m, mass / e^m, sum t l, sum t, l of the own class). The mass holds
    every centre (softmax) or every other class's centre (aligned: the own centre is a positive).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_anchor
    ya = tl.load(y_ptr + rows, mask=rmask, other=-1)
    m = tl.full((BLOCK_M,), NO_MAX, tl.float32)
    mass = tl.zeros((BLOCK_M,), tl.float32)
    tsum_l = tl.zeros((BLOCK_M,), tl.float32)
    tsum = tl.zeros((BLOCK_M,), tl.float32)
    l_own = tl.zeros((BLOCK_M,), tl.float32)
    base = u_ptr + rows.to(tl.int64)[:, None] * stride_u
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cmask = cls < C
        valid = rmask[:, None] & cmask[None, :]
        l = tl.load(base + cls[None, :], mask=valid, other=0.0).to(tl.float32)
        if HAS_PRIOR:
            l += tl.load(prior_ptr + cls, mask=cmask, other=0.0)[None, :]
        l = tl.where(valid, l * inv_supt, float("-inf"))
        own = cls[None, :] == ya[:, None]
        m_new = tl.maximum(m, tl.max(l, 1))
        e = tl.exp(l - m_new[:, None])
        if ALIGNED:
            e = tl.where(own, 0.0, e)
        mass = mass * tl.exp(m - m_new) + tl.sum(e, 1)
        t = tl.where(own, t_own, t_off)
        lv = tl.where(valid, l, 0.0)
        tsum_l += tl.sum(tl.where(valid, t * lv, 0.0), 1)
        tsum += tl.sum(tl.where(valid, t, 0.0), 1)
        l_own += tl.sum(tl.where(valid & own, lv, 0.0), 1)
        m = m_new
    out = cstats_ptr + rows * 5
    tl.store(out + 0, m, mask=rmask)
    tl.store(out + 1, mass, mask=rmask)
    tl.store(out + 2, tsum_l, mask=rmask)
    tl.store(out + 3, tsum, mask=rmask)
    tl.store(out + 4, l_own, mask=rmask)


# row_start is 0 in one process and any value for a process group's slice of the anchors: it is
# not specialised (no divisibility variant), so both use the same compiled kernels.
@triton.jit(do_not_specialize=["row_start"])
def _fwd_kernel(
    zc_ptr,
    y_ptr,
    ws_ptr,
    wo_ptr,
    cstats_ptr,
    loss_ptr,
    stats_ptr,
    row_start,
    row_end,
    M,
    D,
    scale,
    alpha,
    HAS_CENTRES: tl.constexpr,
    ALIGNED: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per tile of the anchor rows [row_start, row_end); streams the M sample columns
    and writes, per anchor, the loss (without loss_scale) and stats (m, log_mass, 1/A, R), merging
    the centre statistics. cstats, loss and stats are indexed from row_start (a process group's
    slice of the anchors; 0 in one process).

    softmax: one sweep (online max, weighted sum-exp over g > 0, sum of positive logits).
    aligned: sweep 1 gives the max over negatives and positives and the negative mass N; sweep 2
    visits the positives: sum t softplus(log N - l_p) and R.
    """
    rows = row_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    local = rows - row_start
    ya = tl.load(y_ptr + rows, mask=rmask, other=-1)
    if HAS_CENTRES:
        cs = cstats_ptr + local * 5
        m = tl.load(cs + 0, mask=rmask, other=NO_MAX)
        mass = tl.load(cs + 1, mask=rmask, other=0.0)
        tsum_l = tl.load(cs + 2, mask=rmask, other=0.0)
        tsum = tl.load(cs + 3, mask=rmask, other=0.0)
        l_own = tl.load(cs + 4, mask=rmask, other=0.0)
    else:
        m = tl.full((BLOCK_M,), NO_MAX, tl.float32)
        mass = tl.zeros((BLOCK_M,), tl.float32)
        tsum_l = tl.zeros((BLOCK_M,), tl.float32)
        tsum = tl.zeros((BLOCK_M,), tl.float32)
        l_own = tl.zeros((BLOCK_M,), tl.float32)
    n_pos = tl.zeros((BLOCK_M,), tl.float32)
    pos_l = tl.zeros((BLOCK_M,), tl.float32)
    for j0 in range(0, M, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < M
        yc = tl.load(y_ptr + cols, mask=cmask, other=-2)
        ws = tl.load(ws_ptr + cols, mask=cmask, other=0.0)
        wo = tl.load(wo_ptr + cols, mask=cmask, other=0.0)
        l = _similarity(zc_ptr, rows, rmask, cols, cmask, D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        l = l * scale
        same = ya[:, None] == yc[None, :]
        other = (rows[:, None] != cols[None, :]) & cmask[None, :]
        pos = same & other
        g = tl.where(other, tl.where(same, ws[None, :], wo[None, :]), 0.0)
        if ALIGNED:
            den = (g > 0) & (~pos)
        else:
            den = g > 0
        m_new = tl.maximum(m, tl.max(tl.where(den | pos, l, float("-inf")), 1))
        e = tl.where(den, g * tl.exp(l - m_new[:, None]), 0.0)
        mass = mass * tl.exp(m - m_new) + tl.sum(e, 1)
        n_pos += tl.sum(pos.to(tl.float32), 1)
        pos_l += tl.sum(tl.where(pos, l, 0.0), 1)
        m = m_new
    m = tl.where(m > 0.5 * NO_MAX, m, 0.0)  # no column at all: shift 0 as the torch backend
    a = tsum + alpha * n_pos
    inv_a = tl.where(a > 0, 1.0 / tl.where(a > 0, a, 1.0), 0.0)
    if ALIGNED:
        log_mass = tl.log(mass)
        neg_log_p = tl.zeros((BLOCK_M,), tl.float32)
        r = tl.zeros((BLOCK_M,), tl.float32)
        for j0 in range(0, M, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            cmask = cols < M
            yc = tl.load(y_ptr + cols, mask=cmask, other=-2)
            l = _similarity(zc_ptr, rows, rmask, cols, cmask, D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
            lp = l * scale - m[:, None]
            pos = (ya[:, None] == yc[None, :]) & (rows[:, None] != cols[None, :]) & cmask[None, :]
            neg_log_p += tl.sum(tl.where(pos, _softplus(log_mass[:, None] - lp), 0.0), 1)
            r += tl.sum(tl.where(pos, 1.0 / (tl.exp(lp) + mass[:, None]), 0.0), 1)
        neg_log_p = alpha * neg_log_p
        r = alpha * r
        if HAS_CENTRES:  # the own centre is a positive with target weight tsum (= beta)
            lp = l_own - m
            neg_log_p += tsum * _softplus(log_mass - lp)
            r += tsum / (tl.exp(lp) + mass)
        loss = neg_log_p * inv_a
        r = r * inv_a
    else:
        log_mass = tl.where(mass > 0, tl.log(mass), 0.0)
        loss = tl.where(a > 0, m + log_mass - (tsum_l + alpha * pos_l) * inv_a, 0.0)
        r = tl.zeros((BLOCK_M,), tl.float32)
    tl.store(loss_ptr + local, loss, mask=rmask)
    out = stats_ptr + local * 4
    tl.store(out + 0, m, mask=rmask)
    tl.store(out + 1, log_mass, mask=rmask)
    tl.store(out + 2, inv_a, mask=rmask)
    tl.store(out + 3, r, mask=rmask)


@triton.jit
def _bwd_kernel(
    zc_ptr,
    y_ptr,
    ws_ptr,
    wo_ptr,
    stats_ptr,
    coef_ptr,
    dzc_ptr,
    rows_ptr,
    n_anchor,
    M,
    n_out,
    D,
    scale,
    alpha,
    ALIGNED: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    DL_LOW: tl.constexpr,
    ROW_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """dzc of rows i of one tile (output columns [BLOCK_DO chunk]), no atomics:

        dzc_i = scale * ( sum_j dl_ij zc_j   [i an anchor, j every column]
                        + sum_j dl_ji zc_j ) [j every anchor, i as a column]

    dl_ji needs only anchor j's stats, so one sweep over column tiles gives the whole gradient of
    the tile; where both terms exist (j < n_anchor) they share one similarity tile. Rows i beyond
    n_anchor (PaCo's keys, queue rows) get the second term only.

    Output row k of dzc [n_out, D] is the gradient of row k (ROW_INDEX false: the rows [0, n_out))
    or of row rows_ptr[k] (ROW_INDEX: a process group's own rows, ascending global indices).
    """
    pid = tl.program_id(0)
    local = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = local < n_out
    if ROW_INDEX:
        rows = tl.load(rows_ptr + local, mask=rmask, other=M)
    else:
        rows = local
    ranchor = rows < n_anchor
    ya = tl.load(y_ptr + rows, mask=rmask, other=-1)
    ws_r = tl.load(ws_ptr + rows, mask=rmask, other=0.0)
    wo_r = tl.load(wo_ptr + rows, mask=rmask, other=0.0)
    m_r, lm_r, ia_r, r_r, co_r = _anchor_terms(stats_ptr, coef_ptr, rows, ranchor)
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    # a tile with an anchor row sees every column; otherwise only the anchor columns matter
    if ROW_INDEX:
        hi = tl.where(tl.min(rows) < n_anchor, M, n_anchor)
    else:
        hi = tl.where(pid * BLOCK_M < n_anchor, M, n_anchor)
    for j0 in range(0, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < M
        canchor = cols < n_anchor
        yc = tl.load(y_ptr + cols, mask=cmask, other=-2)
        ws_c = tl.load(ws_ptr + cols, mask=cmask, other=0.0)
        wo_c = tl.load(wo_ptr + cols, mask=cmask, other=0.0)
        m_c, lm_c, ia_c, r_c, co_c = _anchor_terms(stats_ptr, coef_ptr, cols, canchor)
        l = _similarity(zc_ptr, rows, rmask, cols, cmask, D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        l = l * scale
        same = ya[:, None] == yc[None, :]
        other = rows[:, None] != cols[None, :]
        pos = same & other
        # row term: anchor i (stats along rows), column j (weights of j)
        g = tl.where(other, tl.where(same, ws_c[None, :], wo_c[None, :]), 0.0)
        dl = _dlogits(l, pos, g, m_r[:, None], lm_r[:, None], ia_r[:, None], r_r[:, None], alpha, ALIGNED)
        dl = tl.where(ranchor[:, None] & cmask[None, :], dl * co_r[:, None], 0.0)
        # column term: anchor j (stats along columns), column i (weights of i)
        g = tl.where(other, tl.where(same, ws_r[:, None], wo_r[:, None]), 0.0)
        dlt = _dlogits(l, pos, g, m_c[None, :], lm_c[None, :], ia_c[None, :], r_c[None, :], alpha, ALIGNED)
        dl += tl.where(rmask[:, None] & canchor[None, :], dlt * co_c[None, :], 0.0)
        zj = tl.load(
            zc_ptr + cols.to(tl.int64)[:, None] * D + do[None, :],
            mask=cmask[:, None] & domask[None, :],
            other=0.0,
        )
        if DL_LOW:  # bf16 data: dl in bf16 (fp32's exponent range), fp32 accumulation
            acc = tl.dot(dl.to(zj.dtype), zj, acc)
        else:  # fp16 or fp32 data: dl can underflow fp16, so the product runs in fp32 (or tf32)
            acc = tl.dot(dl, zj.to(tl.float32), acc, input_precision=PRECISION)
    out = dzc_ptr + local.to(tl.int64)[:, None] * D + do[None, :]
    tl.store(out, (acc * scale).to(dzc_ptr.dtype.element_ty), mask=rmask[:, None] & domask[None, :])


@triton.jit
def _centre_bwd_kernel(
    u_ptr,
    prior_ptr,
    y_ptr,
    stats_ptr,
    coef_ptr,
    du_ptr,
    n_anchor,
    C,
    stride_u,
    stride_du,
    inv_supt,
    t_own,
    t_off,
    HAS_PRIOR: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """du [n_anchor, C] = dL/dl / supt of the centre columns, one [BLOCK_M, BLOCK_C] tile each."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < n_anchor
    cmask = cls < C
    valid = rmask[:, None] & cmask[None, :]
    ya = tl.load(y_ptr + rows, mask=rmask, other=-1)
    m, log_mass, inv_a, r, coef = _anchor_terms(stats_ptr, coef_ptr, rows, rmask)
    m, log_mass, inv_a, r, coef = m[:, None], log_mass[:, None], inv_a[:, None], r[:, None], coef[:, None]
    l = tl.load(u_ptr + rows.to(tl.int64)[:, None] * stride_u + cls[None, :], mask=valid, other=0.0)
    l = l.to(tl.float32)
    if HAS_PRIOR:
        l += tl.load(prior_ptr + cls, mask=cmask, other=0.0)[None, :]
    l = l * inv_supt
    own = cls[None, :] == ya[:, None]
    if ALIGNED:
        lp = l - m
        attract = -(t_own * inv_a) / (1.0 + tl.exp(lp - log_mass))
        dl = tl.where(own, attract, tl.exp(lp) * r)
    else:
        dl = tl.exp((l - m) - log_mass) - tl.where(own, t_own, t_off) * inv_a
    du = tl.where(valid, dl * coef * inv_supt, 0.0)
    out = du_ptr + rows.to(tl.int64)[:, None] * stride_du + cls[None, :]
    tl.store(out, du.to(du_ptr.dtype.element_ty), mask=valid)
