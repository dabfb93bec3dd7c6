"""Triton kernels of the fused contrastive loss (only `@triton.jit` code; launchers: triton_backend.py).

The launcher sorts the M contrast rows `[z; queue]` by label (stable), so every same-label pair,
the diagonal included, lies in a band of column tiles per row tile. Names (README.md, "Triton
kernels"): `zs` [M, d] the sorted rows; `y` [M] int32 their labels; `band` [2, M] int32 = the first
and one-past-last sorted position of each row's label; `bias` [2, M] fp32 = log2 of the
denominator weight of each column for an anchor of its own label / of another label (-inf where
the weight is 0). Logits live in the exp2 domain: `x = s * k2 + bias`, `k2 = log2(e) / T`.

Per anchor the forward writes `stats` [a, 4] fp32 = (m, log_mass, 1/A, R) in log2 units (the
units the sweeps round in, so that the backward's x - m cancels exactly):
log2(sum_k g_k e^l_k) = m + log_mass (softmax; aligned: the negative mass N), and, aligned only,
R = 2^m * sum_p (t_p / A) / (e^l_p + N). Everything is accumulated in fp32.

Off-band tiles (no label shared by a row and a column, no diagonal) run a lean loop: one FFMA for
x, one exp2, the online max and sum. Band tiles run the full logic (self, positives, both weights).
"""

import triton
import triton.language as tl

# Start value of a running max: finite, so that exp2(m_old - m_new) is never exp2(-inf + inf).
NO_MAX = tl.constexpr(-1.0e30)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Rows of the backward's per-row vectors `rowv` [ROWV, M] (structure of arrays, sorted order):
# c (log2 shift: dl of a denominator column = coef 2^(x - c); +inf off the anchors), coef (upstream
# gradient x loss scale x the fp16 guard scale; 0 off the anchors and for anchors without a
# target), m and lm (the stats' m and log_mass), 1/A, F = coef 2^(cbar - c), W = 2^bias_other.
ROW_C, ROW_COEF, ROW_M, ROW_LM = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
ROW_IA, ROW_F, ROW_W = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6)
ROWV = 7


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
def _offsets(rows, d, INT64: tl.constexpr):
    """Element offsets of the starts of `rows` in a row-major [*, d] tensor (int64 only if needed)."""
    if INT64:
        return rows.to(tl.int64) * d
    return rows * d


@triton.jit
def _rows_tile(ptr, rows, rmask, d, k0, BLOCK_K: tl.constexpr, INT64: tl.constexpr):
    """[len(rows), BLOCK_K] features k0 .. k0 + BLOCK_K of `rows` (0 beyond d and off the mask)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    off = _offsets(rows, d, INT64)
    return tl.load(ptr + off[:, None] + kk[None, :], mask=rmask[:, None] & (kk < d)[None, :], other=0.0)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:  # the interpreter's bf16 dot is wrong: compute it in fp32 there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _similarity(zs_ptr, a, rows, rmask, cols, cmask, d, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                INT64: tl.constexpr):  # fmt: skip
    """(s [BLOCK_M, BLOCK_N] fp32 = zs[rows] . zs[cols], the column tile). Whole d (D == BLOCK_K):
    `a` is the anchor tile loaded once per program and the column tile [BLOCK_N, D] is returned for
    reuse as the B operand of the gradient product; larger d: chunks of BLOCK_K, nothing returned."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if D == BLOCK_K:
        b = _rows_tile(zs_ptr, cols, cmask, d, 0, BLOCK_K, INT64)
        acc = _dot(a, tl.trans(b), acc, UPCAST, PRECISION)
    else:
        b = a
        for k0 in range(0, D, BLOCK_K):  # a loop, not unrolled: one set of chunk buffers
            ak = _rows_tile(zs_ptr, rows, rmask, d, k0, BLOCK_K, INT64)
            bk = _rows_tile(zs_ptr, cols, cmask, d, k0, BLOCK_K, INT64)
            acc = _dot(ak, tl.trans(bk), acc, UPCAST, PRECISION)
    return acc, b


@triton.jit
def _band(band_ptr, rows, rmask, M, BLOCK_N: tl.constexpr):
    """Column tiles [t_lo, t_hi) that hold every column sharing a label with one of `rows`."""
    lo = tl.min(tl.load(band_ptr + rows, mask=rmask, other=M), 0)
    hi = tl.max(tl.load(band_ptr + M + rows, mask=rmask, other=0), 0)
    t_lo = lo // BLOCK_N
    return t_lo, tl.maximum(tl.cdiv(hi, BLOCK_N), t_lo)


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
def _fwd_kernel(
    zs_ptr,
    y_ptr,
    band_ptr,
    bias_ptr,
    arow_ptr,
    cstats_ptr,
    loss_ptr,
    stats_ptr,
    n_rows,
    M,
    d,
    k2,
    alpha,
    HAS_CENTRES: tl.constexpr,
    ALIGNED: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INT64: tl.constexpr,
):
    """One program per tile of anchors; writes per anchor the loss (without loss_scale) and stats.

    arow [2, n_rows] int32: the anchors' sorted positions (ascending, so a tile spans few labels)
    and the index under which each one's loss, stats and centre statistics (cstats) are stored.

    softmax: one sweep (band tiles with the full logic, then the lean off-band tiles).
    aligned: the same sweep gives the max and the negative mass N (positives are left out of the
    mass); a second sweep over the band tiles only adds sum t softplus(log N - l_p) and R.
    """
    idx = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = idx < n_rows
    rows = tl.load(arow_ptr + idx, mask=rmask, other=0)
    dst = tl.load(arow_ptr + n_rows + idx, mask=rmask, other=0)
    ya = tl.load(y_ptr + rows, mask=rmask, other=-1)
    t_lo, t_hi = _band(band_ptr, rows, rmask, M, BLOCK_N)
    if D == BLOCK_K:
        a = _rows_tile(zs_ptr, rows, rmask, d, 0, BLOCK_K, INT64)
    else:
        a = tl.zeros((BLOCK_M, BLOCK_K), dtype=zs_ptr.dtype.element_ty)  # unused: chunks are reloaded
    if HAS_CENTRES:
        cs = cstats_ptr + dst * 5
        m = tl.load(cs + 0, mask=rmask, other=NO_MAX) * LOG2E
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
    pos_s = tl.zeros((BLOCK_M,), tl.float32)
    # band tiles, in halves (BAND_N columns: fewer live registers for the full logic): self,
    # positives, the weight of each column for an anchor of its label or another label's
    BAND_N: tl.constexpr = BLOCK_N // 2
    for t in range(t_lo * 2, t_hi * 2):
        cols = t * BAND_N + tl.arange(0, BAND_N)
        cmask = cols < M
        s, _ = _similarity(zs_ptr, a, rows, rmask, cols, cmask, d, UPCAST, PRECISION, D, BLOCK_K, BLOCK_M,
                           BAND_N, INT64)  # fmt: skip
        yc = tl.load(y_ptr + cols, mask=cmask, other=-2)
        b_same = tl.load(bias_ptr + cols, mask=cmask, other=float("-inf"))
        b_other = tl.load(bias_ptr + M + cols, mask=cmask, other=float("-inf"))
        same = ya[:, None] == yc[None, :]
        diag = rows[:, None] == cols[None, :]
        pos = same & (~diag)
        sk = s * k2
        x = tl.where(diag, float("-inf"), sk + tl.where(same, b_same[None, :], b_other[None, :]))
        if ALIGNED:  # positives are not in N, nor in its max: N / e^m >= 1 cannot underflow
            x = tl.where(pos, float("-inf"), x)
        m_new = tl.maximum(m, tl.max(x, 1))
        mass = mass * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(x - m_new[:, None]), 1)
        n_pos += tl.sum(pos.to(tl.float32), 1)
        pos_s += tl.sum(tl.where(pos, s, 0.0), 1)
        m = m_new
    # off-band tiles: every column is another label's (weight 2^b_other), none is the anchor itself
    n_band = t_hi - t_lo
    for t in range(0, tl.cdiv(M, BLOCK_N) - n_band):
        cols = (t + n_band * (t >= t_lo).to(tl.int32)) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < M
        b_other = tl.load(bias_ptr + M + cols, mask=cmask, other=float("-inf"))
        s, _ = _similarity(zs_ptr, a, rows, rmask, cols, cmask, d, UPCAST, PRECISION, D, BLOCK_K, BLOCK_M,
                           BLOCK_N, INT64)  # fmt: skip
        x = s * k2 + b_other[None, :]
        m_new = tl.maximum(m, tl.max(x, 1))
        mass = mass * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(x - m_new[:, None]), 1)
        m = m_new
    m2 = tl.where(m > 0.5 * NO_MAX, m, 0.0)  # no column at all: shift 0
    m = m2 * LN2  # natural units
    a_mass = tsum + alpha * n_pos
    inv_a = tl.where(a_mass > 0, 1.0 / tl.where(a_mass > 0, a_mass, 1.0), 0.0)
    if ALIGNED:
        log_mass = tl.log(mass)
        neg_log_p = tl.zeros((BLOCK_M,), tl.float32)
        r = tl.zeros((BLOCK_M,), tl.float32)
        for t in range(t_lo * 2, t_hi * 2):  # the positives: band tiles only
            cols = t * BAND_N + tl.arange(0, BAND_N)
            cmask = cols < M
            s, _ = _similarity(zs_ptr, a, rows, rmask, cols, cmask, d, UPCAST, PRECISION, D, BLOCK_K, BLOCK_M,
                               BAND_N, INT64)  # fmt: skip
            yc = tl.load(y_ptr + cols, mask=cmask, other=-2)
            pos = (ya[:, None] == yc[None, :]) & (rows[:, None] != cols[None, :])
            lp = (s * k2 - m2[:, None]) * LN2  # as the forward sweep rounded it: l - m cancels exactly
            neg_log_p += tl.sum(tl.where(pos, _softplus(log_mass[:, None] - lp), 0.0), 1)
            r += tl.sum(tl.where(pos, 1.0 / (tl.exp(tl.where(pos, lp, 0.0)) + mass[:, None]), 0.0), 1)
        neg_log_p = alpha * neg_log_p
        r = alpha * r
        if HAS_CENTRES:  # the own centre is a positive with target weight tsum (= beta)
            lp = l_own - m
            neg_log_p += tsum * _softplus(log_mass - lp)
            r += tsum / (tl.exp(lp) + mass)
        loss = neg_log_p * inv_a
        # without negatives R multiplies nothing; 1 / e^(l_p - m) could overflow to inf (l_p << 0) and
        # the backward's exp2(-inf - log2 R) would be NaN
        r = tl.where(mass > 0, r * inv_a, 0.0)
    else:
        log_mass = tl.where(mass == 0, 0.0, tl.log(mass))  # a NaN mass stays NaN
        # m - mean positive logit in log2 units first, rounded as the sweep rounded the logits: the
        # loss of a row whose positives dominate is a small difference of large terms
        lead = (m2 - (alpha * inv_a) * (pos_s * k2)) * LN2
        loss = tl.where(a_mass > 0, lead + log_mass - tsum_l * inv_a, 0.0)
        r = tl.zeros((BLOCK_M,), tl.float32)
    tl.store(loss_ptr + dst, loss, mask=rmask)
    out = stats_ptr + dst * 4
    tl.store(out + 0, m2, mask=rmask)
    tl.store(out + 1, log_mass * LOG2E, mask=rmask)
    tl.store(out + 2, inv_a, mask=rmask)
    tl.store(out + 3, r, mask=rmask)


@triton.jit
def _bwd_kernel(
    zs_ptr,
    y_ptr,
    band_ptr,
    bias_ptr,
    rowv_ptr,
    orow_ptr,
    scal_ptr,
    dz_ptr,
    n_out,
    M,
    d,
    k2,
    alpha,
    ALIGNED: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    INT64: tl.constexpr,
):
    """Gradient of the rows of one tile (features [BLOCK_DO chunk]), no atomics:

        dz_i = (1/T) sum_j (dl_ij + dl_ji) z_j    (dl_ij: anchor i's row term, dl_ji: anchor j's)

    dl_ji needs only anchor j's statistics (rowv), so one sweep over the column tiles gives the whole
    gradient of the tile, from one similarity tile per pair. orow [2, n_out] int32: the rows' sorted
    positions (ascending) and their output rows in dz. scal [3] fp32: cbar (a shift shared by all
    anchors), the output scale 1 / (T * guard scale), and whether the one-exp form is safe.

    Off-band, both terms are denominator terms of another label's column and share one exp:
    dl_ij + dl_ji = 2^(s k2 - cbar) (F_i W_j + W_i F_j), F = coef 2^(cbar - c), W = 2^b_other.
    The launcher checks that 2^(s k2 - cbar) cannot overflow and F cannot underflow; otherwise
    (very small T, a large spread of centre logits) the off-band tiles take two exps.
    """
    idx = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = idx < n_out
    rows = tl.load(orow_ptr + idx, mask=rmask, other=0)
    dst = tl.load(orow_ptr + n_out + idx, mask=rmask, other=0)
    ya = tl.load(y_ptr + rows, mask=rmask, other=-1)
    t_lo, t_hi = _band(band_ptr, rows, rmask, M, BLOCK_N)
    c_r = tl.load(rowv_ptr + ROW_C * M + rows, mask=rmask, other=float("inf"))
    co_r = tl.load(rowv_ptr + ROW_COEF * M + rows, mask=rmask, other=0.0)
    f_r = tl.load(rowv_ptr + ROW_F * M + rows, mask=rmask, other=0.0)
    w_r = tl.load(rowv_ptr + ROW_W * M + rows, mask=rmask, other=0.0)
    bs_r = tl.load(bias_ptr + rows, mask=rmask, other=float("-inf"))
    bo_r = tl.load(bias_ptr + M + rows, mask=rmask, other=float("-inf"))
    m_r = tl.load(rowv_ptr + ROW_M * M + rows, mask=rmask, other=0.0)
    lm_r = tl.load(rowv_ptr + ROW_LM * M + rows, mask=rmask, other=0.0)
    ia_r = tl.load(rowv_ptr + ROW_IA * M + rows, mask=rmask, other=0.0)
    cbar = tl.load(scal_ptr)
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    if D == BLOCK_K:
        a = _rows_tile(zs_ptr, rows, rmask, d, 0, BLOCK_K, INT64)
    else:
        a = tl.zeros((BLOCK_M, BLOCK_K), dtype=zs_ptr.dtype.element_ty)  # unused: chunks are reloaded
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    for t in range(t_lo, t_hi):  # band tiles: the full logic, two exps
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < M
        s, b = _similarity(zs_ptr, a, rows, rmask, cols, cmask, d, UPCAST, PRECISION, D, BLOCK_K, BLOCK_M,
                           BLOCK_N, INT64)  # fmt: skip
        yc = tl.load(y_ptr + cols, mask=cmask, other=-2)
        c_c = tl.load(rowv_ptr + ROW_C * M + cols, mask=cmask, other=float("inf"))
        co_c = tl.load(rowv_ptr + ROW_COEF * M + cols, mask=cmask, other=0.0)
        ia_c = tl.load(rowv_ptr + ROW_IA * M + cols, mask=cmask, other=0.0)
        bs_c = tl.load(bias_ptr + cols, mask=cmask, other=float("-inf"))
        bo_c = tl.load(bias_ptr + M + cols, mask=cmask, other=float("-inf"))
        same = ya[:, None] == yc[None, :]
        diag = rows[:, None] == cols[None, :]
        pos = same & (~diag)
        sk = s * k2
        # row term: anchor i, column j with j's weight; column term: anchor j, column i with i's weight
        x_r = tl.where(diag, float("-inf"), sk + tl.where(same, bs_c[None, :], bo_c[None, :]))
        x_c = tl.where(diag, float("-inf"), sk + tl.where(same, bs_r[:, None], bo_r[:, None]))
        m_c = tl.load(rowv_ptr + ROW_M * M + cols, mask=cmask, other=0.0)
        lm_c = tl.load(rowv_ptr + ROW_LM * M + cols, mask=cmask, other=0.0)
        # (x - m) - log_mass: x - m is exact near the max, where a positive's dl cancels
        if ALIGNED:  # positives: attraction -(t/A) N / (e^l + N); negatives: repulsion g e^l R
            e_r = tl.math.exp2(tl.where(pos, (sk - m_r[:, None]) - lm_r[:, None], 0.0))
            e_c = tl.math.exp2(tl.where(pos, (sk - m_c[None, :]) - lm_c[None, :], 0.0))
            att_r = -(alpha * ia_r[:, None]) / (1.0 + e_r)
            att_c = -(alpha * ia_c[None, :]) / (1.0 + e_c)
            rep_r = tl.math.exp2(tl.where(pos, float("-inf"), x_r) - c_r[:, None])
            rep_c = tl.math.exp2(tl.where(pos, float("-inf"), x_c) - c_c[None, :])
            dl = co_r[:, None] * tl.where(pos, att_r, rep_r) + co_c[None, :] * tl.where(pos, att_c, rep_c)
        else:  # g e^(l - LSE) - t / A
            dl_r = tl.math.exp2((x_r - m_r[:, None]) - lm_r[:, None]) - tl.where(pos, alpha * ia_r[:, None], 0.0)
            dl_c = tl.math.exp2((x_c - m_c[None, :]) - lm_c[None, :]) - tl.where(pos, alpha * ia_c[None, :], 0.0)
            dl = co_r[:, None] * dl_r + co_c[None, :] * dl_c
        acc = _grad_product(zs_ptr, dl, b, acc, cols, cmask, d, do, UPCAST, PRECISION, D, BLOCK_K, INT64)
    n_band = t_hi - t_lo
    n_off = tl.cdiv(M, BLOCK_N) - n_band
    if tl.load(scal_ptr + 2) > 0:  # off-band tiles, one exp
        for t in range(0, n_off):
            cols = (t + n_band * (t >= t_lo).to(tl.int32)) * BLOCK_N + tl.arange(0, BLOCK_N)
            cmask = cols < M
            f_c = tl.load(rowv_ptr + ROW_F * M + cols, mask=cmask, other=0.0)
            w_c = tl.load(rowv_ptr + ROW_W * M + cols, mask=cmask, other=0.0)
            s, b = _similarity(zs_ptr, a, rows, rmask, cols, cmask, d, UPCAST, PRECISION, D, BLOCK_K, BLOCK_M,
                               BLOCK_N, INT64)  # fmt: skip
            e = tl.math.exp2(s * k2 - cbar)
            dl = e * (f_r[:, None] * w_c[None, :] + w_r[:, None] * f_c[None, :])
            acc = _grad_product(zs_ptr, dl, b, acc, cols, cmask, d, do, UPCAST, PRECISION, D, BLOCK_K, INT64)
    else:  # off-band tiles, two exps (the shared one could overflow)
        for t in range(0, n_off):
            cols = (t + n_band * (t >= t_lo).to(tl.int32)) * BLOCK_N + tl.arange(0, BLOCK_N)
            cmask = cols < M
            c_c = tl.load(rowv_ptr + ROW_C * M + cols, mask=cmask, other=float("inf"))
            co_c = tl.load(rowv_ptr + ROW_COEF * M + cols, mask=cmask, other=0.0)
            bo_c = tl.load(bias_ptr + M + cols, mask=cmask, other=float("-inf"))
            s, b = _similarity(zs_ptr, a, rows, rmask, cols, cmask, d, UPCAST, PRECISION, D, BLOCK_K, BLOCK_M,
                               BLOCK_N, INT64)  # fmt: skip
            sk = s * k2
            dl = co_r[:, None] * tl.math.exp2(sk + (bo_c[None, :] - c_r[:, None]))
            dl += co_c[None, :] * tl.math.exp2(sk + (bo_r[:, None] - c_c[None, :]))
            acc = _grad_product(zs_ptr, dl, b, acc, cols, cmask, d, do, UPCAST, PRECISION, D, BLOCK_K, INT64)
    out = dz_ptr + _offsets(dst, d, INT64)[:, None] + do[None, :]
    scale = tl.load(scal_ptr + 1)
    tl.store(out, (acc * scale).to(dz_ptr.dtype.element_ty), mask=rmask[:, None] & (do < d)[None, :])


@triton.jit
def _grad_product(zs_ptr, dl, b, acc, cols, cmask, d, do, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                  D: tl.constexpr, BLOCK_K: tl.constexpr, INT64: tl.constexpr):  # fmt: skip
    """acc += dl @ zs[cols, do]: the column tile of the similarity (whole d) or a fresh chunk load.
    Half data: dl is rounded to the data's type (fp16: after the launcher's guard scale) so the
    product runs on tensor cores at the data's rate, fp32 accumulation."""
    if D != BLOCK_K:
        off = _offsets(cols, d, INT64)
        b = tl.load(zs_ptr + off[:, None] + do[None, :], mask=cmask[:, None] & (do < d)[None, :], other=0.0)
    if b.dtype != tl.float32:
        dl = dl.to(b.dtype)
    return _dot(dl, b, acc, UPCAST, PRECISION)


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
    every centre (softmax) or every other class's centre (aligned: the own centre is a positive,
    left out of the max too).
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
        if ALIGNED:  # the own centre is a positive: neither in the mass nor in its max
            l_den = tl.where(own, float("-inf"), l)
        else:
            l_den = l
        m_new = tl.maximum(m, tl.max(l_den, 1))
        e = tl.exp(l_den - m_new[:, None])
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
    m, log_mass = m * LN2, log_mass * LN2  # the stats are in log2 units
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
