// Native CPU kernel of the fused contrastive loss: the CPU dispatch key of the ops
// acl_kernels::contrastive_fwd / contrastive_bwd (schemas: acl_kernels/ops/contrastive/op.py).
// The tile loops live in contrastive_tiles.h, compiled below once per instruction set (the x86-64
// baseline and AVX2 + FMA, picked per call); this file holds the op kernels around them.
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
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string_view>
#include <vector>

namespace {

constexpr int64_t BM = 128;  // rows of a tile
constexpr int64_t BN = 256;  // columns of a tile
constexpr int64_t MAX_PARTS = 4;  // column-gradient accumulators of the symmetric backward (memory)
constexpr double LOG2E = 1.4426950408889634;
constexpr double LN2 = 0.6931471805599453;

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
  for (auto* v : {&t.coef, &t.inv_a, &t.r, &t.mass}) v->assign(p.M, T(0));
  // a row with coef 0 gets the shift +inf, so its dl is 0 * 2^-inf = 0: a shift of 0 makes it
  // 0 * g * 2^127 = NaN once a column weight g >= 2 (exp2_fast clamps at 2^127)
  t.shift.assign(p.M, std::numeric_limits<T>::infinity());
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

// ---- the tile loops, once per instruction set ---------------------------------------------------

namespace isa_default {
#include "contrastive_tiles.h"
}  // namespace isa_default

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ACL_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "contrastive_tiles.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#else
#define ACL_HAVE_AVX2 0
#endif

// The instruction set of the tile loops: AVX2 + FMA where the CPU has them, unless the environment
// sets ACL_KERNELS_NATIVE_ISA=default (read per call: the tests run both).
bool use_avx2() {
#if ACL_HAVE_AVX2
  const char* isa = std::getenv("ACL_KERNELS_NATIVE_ISA");
  if (isa != nullptr && std::string_view(isa) == "default") return false;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

#if ACL_HAVE_AVX2
#define ACL_TILES(fn, ...) (use_avx2() ? isa_avx2::fn(__VA_ARGS__) : isa_default::fn(__VA_ARGS__))
#else
#define ACL_TILES(fn, ...) isa_default::fn(__VA_ARGS__)
#endif


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
    ACL_TILES(forward, p, r0, r1, max_pos, loss.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>());
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
        ACL_TILES(backward_rows, p, rt, rows.data_ptr<int64_t>(), rows.numel(), dz.data_ptr<scalar_t>());
      });
    } else if (need_z || need_queue) {
      const int64_t n_out = need_queue ? m_rows : n;
      at::Tensor dzc = at::empty({n_out, d}, z.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dzc.scalar_type(), "contrastive_bwd_sym", [&] {
        ACL_TILES(backward_symmetric, p, rt, n_out, dzc.data_ptr<scalar_t>());
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
        ACL_TILES(backward_centres, p, rt, a1 - a0, du.data_ptr<scalar_t>());
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

// `import acl_kernels._C` loads the library, which registers the kernels above. Its one function
// says which instruction set the tile loops run with now.
static PyObject* isa(PyObject*, PyObject*) { return PyUnicode_FromString(use_avx2() ? "avx2" : "default"); }
static PyMethodDef methods[] = {
    {"isa", isa, METH_NOARGS, "The instruction set of the tile loops: 'avx2' (AVX2 + FMA) or 'default'."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
