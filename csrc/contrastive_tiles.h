// The tile loops of the native CPU kernel (included by contrastive_cpu.cpp, once per instruction
// set: isa_default, the x86-64 baseline, and isa_avx2, compiled for AVX2 + FMA and picked at run
// time when the CPU has them). Everything here is a template or inline, in the namespace of the
// #include; the headers it needs, Problem<T>, RowTerms<T> and the tile sizes come from the includer.
//
// The tile loops load every operand unconditionally and combine conditions with & and |, not &&
// and ||: a conditional load is control flow, and the loop would not vectorise. On the x86-64
// baseline (SSE2) GCC still leaves them scalar; with AVX2 they run 8 lanes wide.
// 2^x for float that the compiler vectorises (no call, no branch): x = n + r, |r| <= 1/2, a
// degree-7 polynomial of e^(r ln 2) (relative error ~1e-8, below fp32 rounding) times 2^n from the
// exponent bits. Arguments below -126 give 0, above 127 are clamped: the result is finite for any
// finite x, so a left-out column's weight of 0 times it is 0 (the kernels need the true value only
// for x <= 0).
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
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < -126.0f ? 0.0f : p * scale;
}

// (clamped like the float one: finite for any finite x, so a left-out column's 0 * 2^x is 0)
inline double exp2_fast(double x) { return std::exp2(std::min(x, 1000.0)); }

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
  T tile_max = no_max<T>();
  const bool keep_same = !p.aligned;  // aligned: the max of the negatives only (the mass / 2^m >= 1)
#pragma omp simd reduction(max : tile_max)
  for (int64_t j = 0; j < nb; ++j) {
    const bool same = y[j] == yi, other_kept = wo[j] > 0;
    const bool keep = (j != self) & (same ? keep_same : other_kept);
    tile_max = std::max(tile_max, keep ? s[j] * k2 : no_max<T>());
  }
  if (tile_max > st.m) {
    st.mass *= exp2_fast(st.m - tile_max);
    st.m = tile_max;
  }
  const T m = st.m;
  const T same_in_mass = p.aligned ? T(0) : T(1);  // aligned: the positives are not in the mass
  T mass = 0, sum_l = 0, count = 0;
#pragma omp simd reduction(+ : mass, sum_l, count)
  for (int64_t j = 0; j < nb; ++j) {
    const bool not_self = j != self;
    const bool same = (y[j] == yi) & not_self;
    const T l = s[j] * k2, w_same = ws[j], w_other = wo[j];
    // weight of the column in the mass (0: left out; exp2_fast is finite, so 0 * it is 0)
    const T g = same ? same_in_mass * w_same : (not_self ? w_other : T(0));
    mass += g * exp2_fast(l - m);
    sum_l += same ? l : T(0);
    count += same ? T(1) : T(0);
  }
  st.mass += mass;
  st.sum_tl += static_cast<double>(p.alpha) * sum_l;
  st.a += p.alpha * count;
  if (p.aligned && count > 0) {
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
    log_mass = st.mass == 0 ? T(0) : std::log2(st.mass);  // NaN stays NaN
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
    r = st.mass > 0 ? static_cast<T>(rr * inv_a) : T(0);  // R multiplies negatives only (none: may be inf)
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

// dl of one logit l for an anchor with the given terms (coef 0: not an anchor, or no target);
// g its denominator weight, pos whether the column is a positive (target weight alpha).
// Branch-free: products with 0 instead of selects where exp2_fast's result is finite, so that the
// tile loops vectorise.
template <bool ALIGNED, typename T>
inline T dlogit(T l, T g, bool pos, T alpha, T coef, T shift, T inv_a, T r, T mass) {
  const T e = exp2_fast(l - shift);
  T v;
  if constexpr (!ALIGNED) {
    v = g * e - (pos ? alpha * inv_a : T(0));
  } else {
    const T denom = e + mass;
    const T attract = denom > 0 ? -(alpha * inv_a) * mass / denom : T(0);
    v = pos ? attract : g * e * r;
  }
  return coef * v;
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
    const bool same = y[j] == yi, not_self = j != self, pos = same & not_self;
    T b = 0;
    if constexpr (ROW) {
      const T w_same = ws[j], w_other = wo[j];
      const T g = not_self ? (same ? w_same : w_other) : T(0);
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
