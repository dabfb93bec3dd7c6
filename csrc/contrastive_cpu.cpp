// Native CPU kernel of the fused contrastive loss: the CPU dispatch key of the ops
// acl_kernels::contrastive_fwd / contrastive_bwd (schemas: acl_kernels/ops/contrastive/op.py).
//
// The same streaming algorithm as the Triton kernels (acl_kernels/ops/contrastive/README.md):
// anchors in row blocks of BM (at::parallel_for), contrast columns in tiles of BN, the similarity
// tile on a BLAS call (at::mm_out on views of the tile buffers), then masks, weights, the online
// max and the sum-exp fused over the tile while it is in cache. Nothing N x N is ever allocated: workspace is
// O(threads x BM x (BN + d)) per call, plus the positives of a row block in aligned mode and the
// one-process backward's column accumulators (at most MAX_PARTS x rows x d).
//
// Backward: from one similarity tile S_IJ, B_ij = dl_ij [i an anchor] + dl_ji [j an anchor] (dl_ij
// needs row i's statistics and column j's weights only), the row term and the column term of
// README.md's "Gradients of the rows" in one matrix. One process: every pair of rows i < j with i
// an anchor once (dz_I += B zc_J, dz_J += B^T zc_I) into per-part accumulators summed in a fixed
// order. Process group: one program per block of the requested rows, dz_I += B zc_J over all
// columns. No atomics; repeatable bit for bit for a given thread count.
//
// Statistics per anchor (the op's contract, shared with the Triton kernels): stats [a, 4] =
// (m, log_mass, 1/A, R) with m and log_mass in log2 units (log2 of the shift and of the mass),
// 1/A and R as in README.md. fp32 data (and fp16/bf16, upcast once to fp32) is computed in fp32,
// fp64 data in fp64.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t BM = 64;   // rows of a tile
constexpr int64_t BN = 256;  // columns of a tile
constexpr int64_t MAX_PARTS = 4;  // column-gradient accumulators of the symmetric backward (memory)
constexpr double LOG2E = 1.4426950408889634;
constexpr double LN2 = 0.6931471805599453;

// 2^x for float that the compiler vectorises (no call, no branch): x = n + r, |r| <= 1/2, a
// degree-7 polynomial of e^(r ln 2) (relative error ~1e-8, below fp32 rounding) times 2^n from the
// exponent bits. Arguments below -126 give 0 (the kernels only exponentiate x <= 0, or discard the
// result), above 127 are clamped.
inline float exp2_fast(float x) {
  const float xc = std::min(std::max(x, -126.0f), 127.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (xc + shifter) - shifter;
  const float y = (xc - n) * 0.693147180559945f;
  float p = 1.0f / 5040.0f;
  p = p * y + 1.0f / 720.0f;
  p = p * y + 1.0f / 120.0f;
  p = p * y + 1.0f / 24.0f;
  p = p * y + 1.0f / 6.0f;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -126.0f ? 0.0f : p * scale;
}

inline double exp2_fast(double x) { return std::exp2(x); }

template <typename T>
T softplus(T x) {
  return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}

// The two products of a tile, on ATen's CPU matmul (BLAS) over views of the kernel's buffers.
// Called inside at::parallel_for, where ATen and BLAS run them on the calling thread.
template <typename T>
at::Tensor view(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, options);
}

// C[rows, cols] (row-major, ldc) = A[rows, d] B[cols, d]^T: the similarity tile.
template <typename T>
void gemm_abt(int64_t rows, int64_t cols, int64_t d, const T* a, const T* b, T* c, int64_t ldc) {
  at::Tensor out = view(c, rows, cols, ldc);
  at::mm_out(out, view(a, rows, d, d), view(b, cols, d, d).t());
}

// C[k, d] += A[rows, k]^T (A row-major, lda) B[rows, d]: the transposed gradient product.
template <typename T>
void gemm_atb_acc(int64_t rows, int64_t k, int64_t d, const T* a, int64_t lda, const T* b, T* c) {
  view(c, k, d, d).addmm_(view(a, rows, k, lda).t(), view(b, rows, d, d));
}

// C[rows, d] += A[rows, k] (row-major, lda) B[k, d]: the gradient product.
template <typename T>
void gemm_ab_acc(int64_t rows, int64_t k, int64_t d, const T* a, int64_t lda, const T* b, T* c) {
  view(c, rows, d, d).addmm_(view(a, rows, k, lda), view(b, k, d, d));
}

// Everything a kernel reads, in the compute type T, indexed by global contrast row.
template <typename T>
struct Problem {
  const T* zc;           // [M, d] contrast rows [z; queue], contiguous
  int64_t M, d;
  const int64_t* y;      // [M] labels (a centre column c is the own class of anchor i when c == y[i])
  const int32_t* cls;    // [M] dense class ids of the labels (what the tiles compare)
  const T* w_same;       // [M] denominator weight of column j for an anchor of its label
  const T* w_other;      // [M] ... of another label
  int64_t n_anchor;
  bool aligned;
  T k2, alpha;      // logits in log2 units: x = s k2, k2 = log2(e) / temperature
  T inv_tau;
  // centre block (C = 0: none); u holds the rows of the anchors [a0, a0 + rows), row stride C
  const T* u;
  const T* log_prior;    // [C] or null
  int64_t C, a0;
  T c2, inv_supt, t_own, t_off;  // centre logit in log2 units: (u + log prior) c2, c2 = log2(e) / supt
};

// ---- forward ---------------------------------------------------------------------------------

// Running statistics of one anchor row.
template <typename T>
struct RowState {
  T m;             // running max over the columns that enter the loss
  T mass;          // sum g e^(l - m): the denominator (softmax) or the negatives only (aligned)
  double sum_tl;   // sum t l over the targets (softmax)
  T a;             // sum t
  int64_t n_pos;   // positives stored (aligned)
  T l_own;         // the own centre logit (aligned, with centres)
};

template <typename T>
T no_max() {
  return -std::numeric_limits<T>::max();
}

// The centre columns of anchor i start its state: l = (u + log prior) / supt, g = 1.
template <typename T>
void centre_forward(const Problem<T>& p, int64_t i, RowState<T>& st) {
  const T* u = p.u + (i - p.a0) * p.C;
  const int64_t yi = p.y[i];
  T m = no_max<T>();
  for (int64_t c = 0; c < p.C; ++c) {  // aligned: the max of the negatives only (the mass / 2^m >= 1)
    const T l = (u[c] + (p.log_prior ? p.log_prior[c] : T(0))) * p.c2;
    if (!(p.aligned && c == yi)) m = std::max(m, l);
  }
  T mass = 0, a = 0;
  double tl = 0;
  for (int64_t c = 0; c < p.C; ++c) {
    const T l = (u[c] + (p.log_prior ? p.log_prior[c] : T(0))) * p.c2;
    const bool own = c == yi;
    const T t = own ? p.t_own : p.t_off;
    if (p.aligned && own) {
      st.l_own = l;
    } else {
      mass += exp2_fast(l - m);
    }
    tl += static_cast<double>(t) * l;
    a += t;
  }
  st.m = m;
  st.mass = mass;
  st.sum_tl = tl;
  st.a = a;
}

// One row of a similarity tile: columns [j0, j0 + nb) of anchor i, s = the row of dot products.
// pos: where the aligned forward stores the row's positive logits.
template <typename T>
void row_forward(const Problem<T>& p, int64_t i, const T* s, int64_t j0, int64_t nb, RowState<T>& st, T* pos) {
  const int32_t yi = p.cls[i];
  const int32_t* y = p.cls + j0;
  const T* ws = p.w_same + j0;
  const T* wo = p.w_other + j0;
  const T k2 = p.k2;
  const int64_t self = i - j0;  // column of the anchor itself (outside [0, nb) for most tiles)
  const bool only_negatives = p.aligned;  // aligned: the max of the negatives only (the mass / 2^m >= 1)
  T tile_max = no_max<T>();
#pragma omp simd reduction(max : tile_max)
  for (int64_t j = 0; j < nb; ++j) {
    const bool same = y[j] == yi;
    const bool keep = j != self && (only_negatives ? !same && wo[j] > 0 : same || wo[j] > 0);
    tile_max = std::max(tile_max, keep ? s[j] * k2 : no_max<T>());
  }
  if (tile_max > st.m) {
    st.mass *= exp2_fast(st.m - tile_max);
    st.m = tile_max;
  }
  const T m = st.m;
  const bool aligned = p.aligned;
  T mass = 0, sum_l = 0, count = 0;
#pragma omp simd reduction(+ : mass, sum_l, count)
  for (int64_t j = 0; j < nb; ++j) {
    const bool same = y[j] == yi && j != self;
    const T l = s[j] * k2;
    const T g = j == self ? T(0) : (same ? ws[j] : wo[j]);
    const bool in_mass = g > 0 && !(aligned && same);
    mass += in_mass ? g * exp2_fast(l - m) : T(0);
    sum_l += same ? l : T(0);
    count += same ? T(1) : T(0);
  }
  st.mass += mass;
  st.sum_tl += static_cast<double>(p.alpha) * sum_l;
  st.a += p.alpha * count;
  if (aligned && count > 0) {
    for (int64_t j = 0; j < nb; ++j) {
      if (y[j] == yi && j != self) pos[st.n_pos++] = s[j] * k2;
    }
  }
}

// Loss (without loss_scale) and stats of a finished row; the state is in log2 units.
template <typename T>
void row_finish(const Problem<T>& p, RowState<T>& st, const T* pos, T* loss, T* stats) {
  const T inv_a = st.a > 0 ? T(1) / st.a : T(0);
  const T m = st.m > no_max<T>() ? st.m : T(0);
  T out = 0, r = 0, log_mass;
  if (!p.aligned) {
    log_mass = st.mass > 0 ? std::log2(st.mass) : T(0);
    if (st.a > 0) out = static_cast<T>(((static_cast<double>(m) - st.sum_tl * inv_a) + log_mass) * LN2);
  } else {
    log_mass = std::log2(st.mass);  // -inf without negatives: every positive then has p = 1
    const double ln_mass = log_mass * LN2;
    double nlp = 0, rr = 0;
    for (int64_t k = 0; k < st.n_pos; ++k) {
      const double lp = static_cast<double>(pos[k] - m);
      nlp += softplus(ln_mass - lp * LN2);
      rr += 1.0 / (std::exp2(lp) + st.mass);
    }
    nlp *= p.alpha;
    rr *= p.alpha;
    if (p.C > 0) {  // the own centre is a positive of target weight t_own
      const double lp = static_cast<double>(st.l_own - m);
      nlp += p.t_own * softplus(ln_mass - lp * LN2);
      rr += p.t_own / (std::exp2(lp) + st.mass);
    }
    out = static_cast<T>(nlp * inv_a);
    r = static_cast<T>(rr * inv_a);
  }
  *loss = out;
  stats[0] = m;
  stats[1] = log_mass;
  stats[2] = inv_a;
  stats[3] = r;
}

// Losses and stats of anchors [r0, r1) (global rows); outputs indexed from 0.
template <typename T>
void forward(const Problem<T>& p, int64_t r0, int64_t r1, int64_t max_pos, T* loss, T* stats) {
  const int64_t n_blocks = (r1 - r0 + BM - 1) / BM;
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> s(BM * BN);
    std::vector<T> pos(p.aligned ? BM * max_pos : 0);
    std::vector<RowState<T>> st(BM);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = r0 + b * BM, rows = std::min(BM, r1 - i0);
      for (int64_t r = 0; r < rows; ++r) {
        st[r] = RowState<T>{no_max<T>(), 0, 0, 0, 0, 0};
        if (p.C > 0) centre_forward(p, i0 + r, st[r]);
      }
      for (int64_t j0 = 0; j0 < p.M; j0 += BN) {
        const int64_t nb = std::min(BN, p.M - j0);
        gemm_abt(rows, nb, p.d, p.zc + i0 * p.d, p.zc + j0 * p.d, s.data(), BN);
        for (int64_t r = 0; r < rows; ++r) {
          row_forward(p, i0 + r, s.data() + r * BN, j0, nb, st[r], pos.data() + r * max_pos);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t k = i0 + r - r0;
        row_finish(p, st[r], pos.data() + r * max_pos, loss + k, stats + 4 * k);
      }
    }
  });
}

// ---- backward --------------------------------------------------------------------------------

// Per contrast row (structure of arrays), what its dl needs when it is the anchor of a product:
// coef (0 off the anchors and for anchors without a target), the exponent shift (softmax:
// m + log_mass; aligned: m, in log2 units like the logits), 1/A, R and the negative mass (aligned).
template <typename T>
struct RowTerms {
  std::vector<T> coef, shift, inv_a, r, mass;
};

template <typename T>
RowTerms<T> row_terms(const Problem<T>& p, const T* stats, const T* grad) {
  RowTerms<T> t;
  for (auto* v : {&t.coef, &t.shift, &t.inv_a, &t.r, &t.mass}) v->assign(p.M, T(0));
  for (int64_t i = 0; i < p.n_anchor; ++i) {
    const T* st = stats + 4 * i;
    const T m = st[0], log_mass = st[1];
    if (!(st[2] > 0)) continue;
    t.coef[i] = grad[i];
    t.inv_a[i] = st[2];
    t.shift[i] = p.aligned ? m : m + log_mass;
    t.r[i] = st[3];
    t.mass[i] = std::exp2(log_mass);
  }
  return t;
}

// dl of one logit l for an anchor with the given terms (coef 0: not an anchor, or no target);
// g its denominator weight, pos whether the column is a positive (target weight alpha).
// Branch-free (selects only), so that the tile loops vectorise.
template <bool ALIGNED, typename T>
inline T dlogit(T l, T g, bool pos, T alpha, T coef, T shift, T inv_a, T r, T mass) {
  T v;
  if constexpr (!ALIGNED) {
    const T e = exp2_fast(g > 0 ? l - shift : T(-100));
    v = g * e - (pos ? alpha * inv_a : T(0));
  } else {
    const T e = exp2_fast(l - shift);
    const T denom = e + mass;
    const T attract = denom > 0 ? -(alpha * inv_a) * mass / denom : T(0);
    v = pos ? attract : (g > 0 ? g * e * r : T(0));
  }
  return coef != 0 ? coef * v : T(0);
}

// In place over one row of a similarity tile: s_j -> B_ij = dl_ij [i an anchor] + dl_ji [j an
// anchor] for row i against columns [j0, j0 + nb); columns before j_first (local) are set to 0.
template <bool ALIGNED, bool ROW, bool COL, typename T>
void tile_row_grad(const Problem<T>& p, const RowTerms<T>& rt, int64_t i, T* s, int64_t j0, int64_t nb,
                   int64_t j_first) {
  const int32_t yi = p.cls[i];
  const int32_t* y = p.cls + j0;
  const T *ws = p.w_same + j0, *wo = p.w_other + j0;
  const T *cc = rt.coef.data() + j0, *csh = rt.shift.data() + j0, *cia = rt.inv_a.data() + j0;
  const T *cr = rt.r.data() + j0, *cm = rt.mass.data() + j0;
  const T coef = rt.coef[i], shift = rt.shift[i], inv_a = rt.inv_a[i], r = rt.r[i], mass = rt.mass[i];
  const T ws_i = p.w_same[i], wo_i = p.w_other[i], k2 = p.k2, alpha = p.alpha;
  const int64_t self = i - j0;
#pragma omp simd
  for (int64_t j = 0; j < nb; ++j) {
    const T l = s[j] * k2;
    const bool same = y[j] == yi, not_self = j != self, pos = same && not_self;
    T b = 0;
    if constexpr (ROW) {
      const T g = not_self ? (same ? ws[j] : wo[j]) : T(0);
      b += dlogit<ALIGNED>(l, g, pos, alpha, coef, shift, inv_a, r, mass);
    }
    if constexpr (COL) {
      const T g = not_self ? (same ? ws_i : wo_i) : T(0);
      b += dlogit<ALIGNED>(l, g, pos, alpha, cc[j], csh[j], cia[j], cr[j], cm[j]);
    }
    s[j] = j >= j_first ? b : T(0);
  }
}

template <typename T>
void tile_row_grad(const Problem<T>& p, const RowTerms<T>& rt, int64_t i, T* s, int64_t j0, int64_t nb,
                   int64_t j_first, bool row, bool col) {
  using F = void (*)(const Problem<T>&, const RowTerms<T>&, int64_t, T*, int64_t, int64_t, int64_t);
  static constexpr F table[2][2][2] = {
      {{tile_row_grad<false, false, false, T>, tile_row_grad<false, false, true, T>},
       {tile_row_grad<false, true, false, T>, tile_row_grad<false, true, true, T>}},
      {{tile_row_grad<true, false, false, T>, tile_row_grad<true, false, true, T>},
       {tile_row_grad<true, true, false, T>, tile_row_grad<true, true, true, T>}}};
  table[p.aligned][row][col](p, rt, i, s, j0, nb, j_first);
}

// Single process: dz of the contrast rows [0, n_out) into dz [n_out, d] (type OutT), symmetric.
// Every pair of rows (i < j) with i an anchor (anchors are a prefix, so a pair without one has
// B = 0) is visited once, in the row block of i: B_ij from one similarity tile, then
// dz_I += B zc_J (row block) and dz_J += B^T zc_I (columns). The anchor row blocks are split into
// `parts` contiguous ranges of equal work, each with its own [n_out, d] accumulator, summed in
// part order at the end: no atomics, bitwise repeatable for a given thread count.
template <typename T, typename OutT>
void backward_symmetric(const Problem<T>& p, const RowTerms<T>& rt, int64_t n_out, OutT* dz) {
  const int64_t d = p.d, n_blocks = (p.n_anchor + BM - 1) / BM;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), MAX_PARTS, n_blocks}));
  std::vector<int64_t> first(parts + 1, n_blocks);  // block ranges of equal work (M - i0 columns each)
  first[0] = 0;
  double total = 0;
  for (int64_t b = 0; b < n_blocks; ++b) total += static_cast<double>(p.M - b * BM);
  double done = 0;
  for (int64_t b = 0, k = 1; b < n_blocks && k < parts; ++b) {
    done += static_cast<double>(p.M - b * BM);
    if (done >= total * k / parts) first[k++] = b + 1;
  }
  std::vector<T> acc(parts * n_out * d, T(0));
  at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
    std::vector<T> s(BM * BN);
    for (int64_t q = q0; q < q1; ++q) {
      T* out = acc.data() + q * n_out * d;
      for (int64_t b = first[q]; b < first[q + 1]; ++b) {
        const int64_t i0 = b * BM, rows = std::min(BM, p.n_anchor - i0);
        for (int64_t j0 = i0; j0 < p.M; j0 += BN) {
          const int64_t nb = std::min(BN, p.M - j0);
          gemm_abt(rows, nb, d, p.zc + i0 * d, p.zc + j0 * d, s.data(), BN);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = i0 + r;
            tile_row_grad(p, rt, i, s.data() + r * BN, j0, nb, std::max<int64_t>(0, i - j0 + 1), true,
                          j0 < p.n_anchor);
          }
          gemm_ab_acc(rows, nb, d, s.data(), BN, p.zc + j0 * d, out + i0 * d);
          const int64_t cols_out = std::min(nb, n_out - j0);
          if (cols_out > 0) gemm_atb_acc(rows, cols_out, d, s.data(), BN, p.zc + i0 * d, out + j0 * d);
        }
      }
    }
  });
  at::parallel_for(0, n_out, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t k = r0 * d; k < r1 * d; ++k) {
      T sum = 0;
      for (int64_t q = 0; q < parts; ++q) sum += acc[q * n_out * d + k];
      dz[k] = static_cast<OutT>(sum * p.inv_tau);
    }
  });
}

// Process group: dz of the contrast rows out_rows[k] (global indices) into dz [n_out, d] (type
// OutT). One program per block of output rows sweeps the columns: B_IJ as above from one tile,
// dz_I += B zc_J; rows without an anchor meet only the anchor columns (their column term).
template <typename T, typename OutT>
void backward_rows(const Problem<T>& p, const RowTerms<T>& rt, const int64_t* out_rows, int64_t n_out, OutT* dz) {
  const int64_t n_blocks = (n_out + BM - 1) / BM;
  const int64_t anchor_cols = std::min(p.M, p.n_anchor);
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> s(BM * BN), zi(BM * p.d), acc(BM * p.d);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t k0 = b * BM, rows = std::min(BM, n_out - k0);
      bool any_anchor = false;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = out_rows[k0 + r];
        any_anchor |= i < p.n_anchor;
        std::copy(p.zc + i * p.d, p.zc + (i + 1) * p.d, zi.data() + r * p.d);
      }
      std::fill(acc.begin(), acc.end(), T(0));
      const int64_t end = any_anchor ? p.M : anchor_cols;
      for (int64_t j0 = 0; j0 < end; j0 += BN) {
        const int64_t nb = std::min(BN, end - j0);
        gemm_abt(rows, nb, p.d, zi.data(), p.zc + j0 * p.d, s.data(), BN);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = out_rows[k0 + r];
          tile_row_grad(p, rt, i, s.data() + r * BN, j0, nb, 0, i < p.n_anchor, j0 < p.n_anchor);
        }
        gemm_ab_acc(rows, nb, p.d, s.data(), BN, p.zc + j0 * p.d, acc.data());
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < p.d; ++c) dz[(k0 + r) * p.d + c] = static_cast<OutT>(acc[r * p.d + c] * p.inv_tau);
      }
    }
  });
}

// dL/du of anchors [a0, a0 + n) into du [n, C] (type OutT).
template <typename T, typename OutT>
void backward_centres(const Problem<T>& p, const RowTerms<T>& rt, int64_t n, OutT* du) {
  at::parallel_for(0, n, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = p.a0 + k;
      const T* u = p.u + k * p.C;
      const int64_t yi = p.y[i];
      for (int64_t c = 0; c < p.C; ++c) {
        const T l = (u[c] + (p.log_prior ? p.log_prior[c] : T(0))) * p.c2;
        const bool own = c == yi;
        T dl;
        if (!p.aligned) {
          dl = rt.coef[i] * (exp2_fast(l - rt.shift[i]) - (own ? p.t_own : p.t_off) * rt.inv_a[i]);
        } else {
          dl = dlogit<true>(l, T(1), own, p.t_own, rt.coef[i], rt.shift[i], rt.inv_a[i], rt.r[i], rt.mass[i]);
        }
        du[k * p.C + c] = static_cast<OutT>(dl * p.inv_supt);
      }
    }
  });
}

// ---- the op kernels: argument checks, layout, dtype dispatch -------------------------------------

struct Scalars {
  int64_t n_anchor;
  bool aligned;
  double temperature, alpha, beta, supt, smooth;
};

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// [M, d] contiguous rows [z; queue] in the compute type (fp16/bf16 upcast once).
at::Tensor contrast_rows(const at::Tensor& z, const std::optional<at::Tensor>& queue) {
  const auto ct = compute_type(z.scalar_type());
  at::Tensor zc = queue.has_value() ? at::cat({z, queue->to(z.scalar_type())}) : z;
  return zc.to(ct).contiguous();
}

void check_inputs(const at::Tensor& z, const at::Tensor& labels, const std::optional<at::Tensor>& queue,
                  const std::optional<at::Tensor>& centre_logits, const at::Tensor& w_same,
                  const at::Tensor& w_other, const Scalars& sc) {
  TORCH_CHECK(z.dim() == 2, "contrastive op (CPU): z must be [N, d], got ", z.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "contrastive op (CPU): z must be floating point, got ",
              z.scalar_type());
  const int64_t m_rows = z.size(0) + (queue.has_value() ? queue->size(0) : 0);
  if (queue.has_value()) {
    TORCH_CHECK(queue->dim() == 2 && queue->size(1) == z.size(1),
                "contrastive op (CPU): queue must be [K, d] with the d of z, got ", queue->sizes());
  }
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == m_rows,
              "contrastive op (CPU): labels must hold one entry per contrast row (", m_rows, "), got ",
              labels.sizes());
  TORCH_CHECK(w_same.numel() == m_rows && w_other.numel() == m_rows,
              "contrastive op (CPU): w_same and w_other must hold one entry per contrast row (", m_rows, ")");
  TORCH_CHECK(sc.n_anchor >= 0 && sc.n_anchor <= z.size(0), "contrastive op (CPU): n_anchor must be in [0, ",
              z.size(0), "], got ", sc.n_anchor);
  TORCH_CHECK(sc.temperature > 0, "contrastive op (CPU): temperature must be > 0, got ", sc.temperature);
  if (centre_logits.has_value()) {
    TORCH_CHECK(centre_logits->dim() == 2 && centre_logits->size(1) > 0,
                "contrastive op (CPU): centre_logits must be [anchors, C], got ", centre_logits->sizes());
  }
}

// The problem in compute type T; `keep` holds the converted tensors alive.
template <typename T>
Problem<T> make_problem(const at::Tensor& zc, const at::Tensor& labels, const std::optional<at::Tensor>& centre_logits,
                        const std::optional<at::Tensor>& log_prior, const at::Tensor& w_same, const at::Tensor& w_other,
                        const Scalars& sc, int64_t a0, std::vector<at::Tensor>& keep) {
  const auto ct = zc.scalar_type();
  auto as = [&](const at::Tensor& t, at::ScalarType type) {
    keep.push_back(t.to(type).contiguous());
    return keep.back().data_ptr();
  };
  Problem<T> p{};
  p.zc = zc.data_ptr<T>();
  p.M = zc.size(0);
  p.d = zc.size(1);
  p.y = static_cast<const int64_t*>(as(labels, at::kLong));
  p.cls = static_cast<const int32_t*>(as(std::get<1>(at::_unique2(labels, true, true, false)), at::kInt));
  p.w_same = static_cast<const T*>(as(w_same.reshape(-1), ct));
  p.w_other = static_cast<const T*>(as(w_other.reshape(-1), ct));
  p.n_anchor = sc.n_anchor;
  p.aligned = sc.aligned;
  p.inv_tau = static_cast<T>(1.0 / sc.temperature);
  p.k2 = static_cast<T>(LOG2E / sc.temperature);
  p.alpha = static_cast<T>(sc.alpha);
  p.a0 = a0;
  if (centre_logits.has_value()) {
    p.C = centre_logits->size(1);
    p.u = static_cast<const T*>(as(*centre_logits, ct));
    if (log_prior.has_value()) {
      TORCH_CHECK(log_prior->numel() == p.C, "contrastive op (CPU): log_prior must hold C = ", p.C, " entries");
      p.log_prior = static_cast<const T*>(as(log_prior->reshape(-1), ct));
    }
    p.inv_supt = static_cast<T>(1.0 / sc.supt);
    p.c2 = static_cast<T>(LOG2E / sc.supt);
    const bool plain = sc.aligned || sc.smooth == 0;  // label smoothing: softmax mode only
    p.t_own = static_cast<T>(plain ? sc.beta : sc.beta * (1.0 - sc.smooth));
    p.t_off = static_cast<T>(plain || p.C == 1 ? 0.0 : sc.beta * sc.smooth / (p.C - 1));
  }
  return p;
}

// anchor_end < 0: n_anchor.
std::pair<int64_t, int64_t> anchor_range(int64_t start, int64_t end, int64_t n_anchor) {
  if (end < 0) end = n_anchor;
  TORCH_CHECK(0 <= start && start <= end && end <= n_anchor, "contrastive op (CPU): anchor range [", start, ", ",
              end, ") must lie in [0, n_anchor = ", n_anchor, "]");
  return {start, end};
}

std::tuple<at::Tensor, at::Tensor> contrastive_fwd_cpu(
    const at::Tensor& z, const at::Tensor& labels, const std::optional<at::Tensor>& queue,
    const std::optional<at::Tensor>& centre_logits, const std::optional<at::Tensor>& log_prior,
    const at::Tensor& w_same, const at::Tensor& w_other, int64_t n_anchor, bool aligned, double temperature,
    double alpha, double beta, double supt, double smooth, int64_t anchor_start, int64_t anchor_end) {
  const Scalars sc{n_anchor, aligned, temperature, alpha, beta, supt, smooth};
  check_inputs(z, labels, queue, centre_logits, w_same, w_other, sc);
  const auto [r0, r1] = anchor_range(anchor_start, anchor_end, n_anchor);
  if (centre_logits.has_value()) {
    TORCH_CHECK(centre_logits->size(0) == r1 - r0, "contrastive op (CPU): centre_logits must have one row per anchor (",
                r1 - r0, "), got ", centre_logits->size(0));
  }
  const at::Tensor zc = contrast_rows(z, queue);
  const auto ct = zc.scalar_type();
  at::Tensor loss = at::empty({r1 - r0}, z.options().dtype(ct));
  at::Tensor stats = at::empty({r1 - r0, 4}, z.options().dtype(ct));
  if (r1 == r0) return {loss, stats};
  // positives per anchor are bounded by its label's count among the contrast rows
  const at::Tensor lab = labels.to(at::kLong);
  // the positives of an anchor: at most its label's count among the contrast rows
  const int64_t max_pos = aligned ? std::get<2>(at::_unique2(lab, false, false, true)).max().item<int64_t>() : 0;
  AT_DISPATCH_FLOATING_TYPES(ct, "contrastive_fwd_cpu", [&] {
    std::vector<at::Tensor> keep;
    const auto p = make_problem<scalar_t>(zc, lab, centre_logits, log_prior, w_same, w_other, sc, r0, keep);
    forward(p, r0, r1, max_pos, loss.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>());
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& z, const at::Tensor& labels,
    const std::optional<at::Tensor>& queue, const std::optional<at::Tensor>& centre_logits,
    const std::optional<at::Tensor>& log_prior, const at::Tensor& w_same, const at::Tensor& w_other, int64_t n_anchor,
    bool aligned, double temperature, double alpha, double beta, double supt, double smooth, bool need_z,
    bool need_queue, bool need_centres, const std::optional<at::Tensor>& out_rows, int64_t anchor_start,
    int64_t anchor_end) {
  const Scalars sc{n_anchor, aligned, temperature, alpha, beta, supt, smooth};
  check_inputs(z, labels, queue, centre_logits, w_same, w_other, sc);
  const auto [a0, a1] = anchor_range(anchor_start, anchor_end, n_anchor);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == n_anchor && stats.size(1) == 4,
              "contrastive op (CPU): stats must be [n_anchor, 4], got ", stats.sizes());
  TORCH_CHECK(grad_loss.numel() == n_anchor, "contrastive op (CPU): grad_loss must hold n_anchor = ", n_anchor,
              " entries, got ", grad_loss.numel());
  TORCH_CHECK(!(out_rows.has_value() && need_queue),
              "contrastive op (CPU): with out_rows (a process group) the queue is a constant and gets no gradient");
  TORCH_CHECK(!need_queue || queue.has_value(), "contrastive op (CPU): need_queue without a queue");
  TORCH_CHECK(!need_centres || centre_logits.has_value(), "contrastive op (CPU): need_centres without centre_logits");
  const at::Tensor zc = contrast_rows(z, queue);
  const auto ct = zc.scalar_type();
  const int64_t n = z.size(0), m_rows = zc.size(0), d = zc.size(1);
  const at::Tensor st = stats.to(ct).contiguous(), g = grad_loss.to(ct).reshape(-1).contiguous();
  const at::Tensor lab = labels.to(at::kLong);
  at::Tensor none = at::empty({0}, z.options());
  at::Tensor dz = none, dq = none.clone(), du = none.clone();
  AT_DISPATCH_FLOATING_TYPES(ct, "contrastive_bwd_cpu", [&] {
    std::vector<at::Tensor> keep;
    const auto p = make_problem<scalar_t>(zc, lab, centre_logits, log_prior, w_same, w_other, sc, a0, keep);
    const auto rt = row_terms(p, st.data_ptr<scalar_t>(), g.data_ptr<scalar_t>());
    if (out_rows.has_value() && need_z) {
      const at::Tensor rows = out_rows->to(at::kLong).contiguous();
      TORCH_CHECK(rows.numel() == 0 || (rows.min().item<int64_t>() >= 0 && rows.max().item<int64_t>() < m_rows),
                  "contrastive op (CPU): out_rows must index the ", m_rows, " contrast rows");
      dz = at::empty({rows.numel(), d}, z.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dz.scalar_type(), "contrastive_bwd_rows", [&] {
        backward_rows(p, rt, rows.data_ptr<int64_t>(), rows.numel(), dz.data_ptr<scalar_t>());
      });
    } else if (need_z || need_queue) {
      const int64_t n_out = need_queue ? m_rows : n;
      at::Tensor dzc = at::empty({n_out, d}, z.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dzc.scalar_type(), "contrastive_bwd_sym", [&] {
        backward_symmetric(p, rt, n_out, dzc.data_ptr<scalar_t>());
      });
      if (need_z) dz = dzc.narrow(0, 0, n);
      if (need_queue) dq = dzc.narrow(0, n, m_rows - n).clone();  // outputs of an op may not alias
    }
    if (need_centres) {
      TORCH_CHECK(centre_logits->size(0) == a1 - a0,
                  "contrastive op (CPU): centre_logits must have one row per anchor (", a1 - a0, "), got ",
                  centre_logits->size(0));
      du = at::empty(centre_logits->sizes(), centre_logits->options().memory_format(at::MemoryFormat::Contiguous));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, du.scalar_type(), "contrastive_bwd_centres", [&] {
        backward_centres(p, rt, a1 - a0, du.data_ptr<scalar_t>());
      });
    }
  });
  return {dz, dq, du};
}

}  // namespace

TORCH_LIBRARY_IMPL(acl_kernels, CPU, m) {
  m.impl("contrastive_fwd", &contrastive_fwd_cpu);
  m.impl("contrastive_bwd", &contrastive_bwd_cpu);
}

// `import acl_kernels._C` loads the library, which registers the kernels above; no Python API.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
