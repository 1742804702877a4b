// One PSGD-QUAD preconditioner fit of a stack of factored tensors as a native MLX primitive for the CPU backend:
// optimizers.quad.quad_iteration for a (S, m, n) stack, in float32 or float64; and the momentum step before it
// (optimizers.quad.momentum_update, the same bits).
//
// MLX computes quad_iteration as about 70 graph nodes per parameter group (its matmuls, and a dozen element-wise
// passes and reductions per factor), each dispatched on its own; on the grokking model that is most of QUAD's
// cost over AdamW's that is not matrix products. Here each slice is one loop: its matrix products go to the BLAS
// MLX itself calls (the one fastblas loads into the global scope, found with dlsym), and the element-wise work
// and reductions run between them on data still in cache. The products of a matrix with its own transpose
// (Q Q for a symmetric factor Q, Pg Pg^T, Pg^T Pg) are BLAS syrk calls, which compute one triangle: about a
// quarter less time than the full product here.
//
// Every operation is quad_iteration's, in its order, except the order of the sums inside the matrix products and
// reductions, so the results agree with it to rounding (tests/test_quad_native.py).

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

#include "cpu_primitive.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

using speed::CpuPrimitive;
using speed::Dense;
using speed::given;

// CBLAS's enumerations.
constexpr int ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, LOWER = 122;

template <typename T>
using Gemm = void (*)(int, int, int, int, int, int, T, const T*, int, const T*, int, T, T*, int);
template <typename T>
using Syrk = void (*)(int, int, int, int, int, T, const T*, int, T, T*, int);

// The BLAS in the process's global scope, or null members where there is none.
struct Blas {
  Gemm<float> sgemm = reinterpret_cast<Gemm<float>>(dlsym(RTLD_DEFAULT, "cblas_sgemm"));
  Gemm<double> dgemm = reinterpret_cast<Gemm<double>>(dlsym(RTLD_DEFAULT, "cblas_dgemm"));
  Syrk<float> ssyrk = reinterpret_cast<Syrk<float>>(dlsym(RTLD_DEFAULT, "cblas_ssyrk"));
  Syrk<double> dsyrk = reinterpret_cast<Syrk<double>>(dlsym(RTLD_DEFAULT, "cblas_dsyrk"));

  bool complete() const { return sgemm && dgemm && ssyrk && dsyrk; }
};

const Blas& blas() {
  static const Blas found;
  return found;
}

// C (rows, cols) = alpha A (rows, inner) B (inner, cols), all row-major.
template <typename T>
void product(const T* A, const T* B, T* C, int rows, int inner, int cols, T alpha = T(1)) {
  if constexpr (std::is_same_v<T, float>)
    blas().sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, rows, cols, inner, alpha, A, inner, B, cols, 0.0f, C, cols);
  else
    blas().dgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, rows, cols, inner, alpha, A, inner, B, cols, 0.0, C, cols);
}

constexpr int TILE = 16;

// C = A A^T (rows x rows) or, with `transpose`, A^T A (cols x cols), of A (rows, cols), both triangles.
template <typename T>
void gram(const T* A, int rows, int cols, bool transpose, T* __restrict C) {
  const int d = transpose ? cols : rows, k = transpose ? rows : cols;
  if constexpr (std::is_same_v<T, float>)
    blas().ssyrk(ROW_MAJOR, LOWER, transpose ? TRANS : NO_TRANS, d, k, 1.0f, A, cols, 0.0f, C, d);
  else
    blas().dsyrk(ROW_MAJOR, LOWER, transpose ? TRANS : NO_TRANS, d, k, 1.0, A, cols, 0.0, C, d);
  for (int bi = 0; bi < d; bi += TILE)  // the upper triangle from the lower, tile by tile (cache-friendly)
    for (int bj = bi; bj < d; bj += TILE)
      for (int i = bi; i < std::min(bi + TILE, d); ++i)
        for (int j = std::max(bj, i + 1); j < std::min(bj + TILE, d); ++j) C[i * d + j] = C[j * d + i];
}

// out = (p + p^T) * half, tile by tile.
template <typename T>
void symmetrize(const T* __restrict p, int d, T half, T* __restrict out) {
  for (int bi = 0; bi < d; bi += TILE)
    for (int bj = 0; bj < d; bj += TILE)
      for (int i = bi; i < std::min(bi + TILE, d); ++i)
        for (int j = bj; j < std::min(bj + TILE, d); ++j) out[i * d + j] = (p[i * d + j] + p[j * d + i]) * half;
}

// sum x^2 over n elements, in LANES partial sums added at the end (a fixed order the compiler vectorizes).
constexpr int LANES = 16;

template <typename T>
T energy(const T* __restrict x, int n) {
  T lanes[LANES] = {};
  int j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int l = 0; l < LANES; ++l) lanes[l] += x[j + l] * x[j + l];
  for (; j < n; ++j) lanes[j % LANES] += x[j] * x[j];
  T sum = T(0);
  for (int l = 0; l < LANES; ++l) sum += lanes[l];
  return sum;
}

// mx.maximum: NaN when the first operand is NaN, else the larger (so NaN from either side).
template <typename T>
inline T maximum(T x, T y) {
  return std::isnan(x) ? x : (x > y ? x : y);
}

// The settings of one fit, as quad_iteration has them; the targets N / m and N / n.
struct Settings {
  int slices, m, n;
  bool diag_left, diag_right;
  double precond_lr, precond_beta, target_left, target_right;

  bool operator==(const Settings&) const = default;
};

// lipschitz_step: the Lipschitz estimate L updated from `ell` and the step size a, or L as it was and a = 0.
template <typename T>
T lipschitz_step(T& L, T ell, bool gate, const Settings& s) {
  if (!gate) return T(0);
  L = maximum(T(s.precond_beta) * L + T(1 - s.precond_beta) * ell, ell);
  return T(s.precond_lr / 2) / L;
}

// lower_bound_norm of a symmetric (d, d) matrix: ||v T|| with v the row of largest norm (the first on ties),
// normalized. `v` and `w` are scratch of d.
template <typename T>
T lower_bound_norm(const T* __restrict G, int d, T* __restrict v, T* __restrict w) {
  int best = 0;
  T top = T(0);
  for (int i = 0; i < d; ++i) {
    const T r = energy(G + i * d, d);
    if (i == 0 || r > top) top = r, best = i;
  }
  const T root = std::sqrt(top > 0 ? top : T(1));
  for (int j = 0; j < d; ++j) v[j] = G[best * d + j] / root, w[j] = T(0);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) w[j] += v[i] * G[i * d + j];
  T sum = T(0);
  for (int j = 0; j < d; ++j) sum += w[j] * w[j];
  return std::sqrt(sum);
}

// update_dense_side for one slice: Q (d, d) scaled by `scale` moves towards E[T] = target I, with T = Pg Pg^T
// (d = m) or Pg^T Pg (`right`, d = n), into Q_out; L updated in place. `work` is scratch of 3 d^2 + 2 d.
template <typename T>
void dense_side(const T* Pg, const T* Q, T& L, T scale, bool gate, bool right, T target, const Settings& s,
                T* __restrict work, T* __restrict Q_out) {
  const int d = right ? s.n : s.m;
  T* E = work;
  T* EQ = E + d * d;
  T* p = EQ + d * d;
  gram(Pg, s.m, s.n, right, E);  // T, made E in place below
  const T ell = lower_bound_norm(E, d, p, p + d) + target;
  const T a = lipschitz_step(L, ell, gate, s);
  const T diagonal = T(1) + a * target;
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) E[i * d + j] = (i == j ? diagonal : T(0)) - a * E[i * d + j];
  product(E, Q, EQ, d, d, d);
  product(EQ, E, p, d, d, d);
  symmetrize(p, d, scale / T(2), Q_out);
}

// update_diag_side for one slice: q (d) scaled by `scale` moves towards E[t] = target, t the row energies of Pg
// (d = m) or its column energies (`right`, d = n), into q_out; L updated in place. `t` is scratch of d.
template <typename T>
void diag_side(const T* __restrict Pg, const T* __restrict q, T& L, T scale, bool gate, bool right, T target,
               const Settings& s, T* __restrict t, T* __restrict q_out) {
  const int m = s.m, n = s.n, d = right ? n : m;
  for (int j = 0; j < d; ++j) t[j] = T(0);
  if (right) {
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) t[j] += Pg[i * n + j] * Pg[i * n + j];
  } else {
    for (int i = 0; i < m; ++i) t[i] = energy(Pg + i * n, n);
  }
  T top = t[0];
  for (int j = 1; j < d; ++j) top = maximum(t[j], top);
  const T a = lipschitz_step(L, top + target, gate, s);
  for (int j = 0; j < d; ++j) {
    const T gamma = T(1) - a * (t[j] - target);
    q_out[j] = q[j] * (scale * (gamma * gamma));
  }
}

// The elements of the larger dense factor (0 without one).
size_t dense_square(const Settings& s) {
  const size_t left = s.diag_left ? 0 : size_t(s.m) * s.m, right = s.diag_right ? 0 : size_t(s.n) * s.n;
  return std::max(left, right);
}

// y = p x over n elements; y = x p element by element.
template <typename T>
void scale_row(const T* __restrict x, T p, int n, T* __restrict y) {
  for (int j = 0; j < n; ++j) y[j] = p * x[j];
}

template <typename T>
void scale_columns(const T* __restrict x, const T* __restrict p, int n, T* __restrict y) {
  for (int j = 0; j < n; ++j) y[j] = x[j] * p[j];
}

// The fit of one slice: Pg = scale_pg P_l G P_r (the scale on a diagonal factor if there is one, else on P_l), then
// both factors from that Pg. `work` is scratch (see fit_scratch).
template <typename T>
void fit_slice(const T* __restrict G, const T* __restrict Ql, const T* __restrict Qr, T* Ll, T* Lr, T scale_l,
               T scale_r, T scale_pg, bool gate, const Settings& s, T* __restrict work, T* __restrict Pg,
               T* __restrict Ql_out, T* __restrict Qr_out) {
  const int m = s.m, n = s.n;
  const bool on_right = s.diag_right && !s.diag_left;
  T* X = work;  // P_l G
  T* P = X + m * n;  // a dense factor's square
  T* scratch = P + dense_square(s);
  if (s.diag_left) {
    for (int i = 0; i < m; ++i) {
      const T p = on_right ? Ql[i] * Ql[i] : (Ql[i] * Ql[i]) * scale_pg;
      scale_row(G + i * n, p, n, X + i * n);
    }
  } else {
    gram(Ql, m, m, false, P);  // Q Q^T = Q Q: the factors are symmetric
    product(P, G, X, m, m, n, on_right ? T(1) : scale_pg);
  }
  if (s.diag_right) {
    T* p = scratch;
    for (int j = 0; j < n; ++j) p[j] = on_right ? (Qr[j] * Qr[j]) * scale_pg : Qr[j] * Qr[j];
    for (int i = 0; i < m; ++i) scale_columns(X + i * n, p, n, Pg + i * n);
  } else {
    gram(Qr, n, n, false, P);
    product(X, P, Pg, m, n, n);
  }
  const T target_l = T(s.target_left), target_r = T(s.target_right);
  if (s.diag_left)
    diag_side(Pg, Ql, *Ll, scale_l, gate, false, target_l, s, scratch, Ql_out);
  else
    dense_side(Pg, Ql, *Ll, scale_l, gate, false, target_l, s, scratch, Ql_out);
  if (s.diag_right)
    diag_side(Pg, Qr, *Lr, scale_r, gate, true, target_r, s, scratch, Qr_out);
  else
    dense_side(Pg, Qr, *Lr, scale_r, gate, true, target_r, s, scratch, Qr_out);
}

// The scratch fit_slice needs: P_l G, a dense factor's square, and a side's scratch (3 d^2 + 2 d dense, d diagonal).
size_t fit_scratch(const Settings& s) {
  size_t side = 0;
  for (auto [d, diag] : {std::pair{size_t(s.m), s.diag_left}, std::pair{size_t(s.n), s.diag_right}})
    side = std::max(side, diag ? d : 3 * d * d + 2 * d);
  return size_t(s.m) * s.n + dense_square(s) + side;
}

// Inputs: G (S, m, n), Q_l, Q_r ((S, d, d) dense or (S, d) diagonal), L_l, L_r (S values each), the per-slice
// scale_l, scale_r, scale_pg and gate (bool), all (S,). Outputs: Pg, Q_l, Q_r, L_l, L_r, shaped as G and as the
// inputs.
class QuadFit : public CpuPrimitive {
 public:
  QuadFit(mx::Stream stream, Settings settings) : CpuPrimitive(stream), s_(settings) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    if (inputs[0].dtype() == mx::float32)
      run<float>(inputs, outputs);
    else
      run<double>(inputs, outputs);
  }

  const char* name() const override { return "QuadFit"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return s_ == static_cast<const QuadFit&>(other).s_;
  }

 private:
  template <typename T>
  void run(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
    auto& encoder = this->encoder(inputs, outputs);
    std::vector<Dense<T>> in;
    for (int i = 0; i < 9; ++i)
      if (i != 8) in.emplace_back(inputs[i]);
    encoder.dispatch([in = std::move(in), gate = Dense<uint8_t>(inputs[8]), s = s_, Pg = outputs[0].data<T>(),
                      Ql = outputs[1].data<T>(), Qr = outputs[2].data<T>(), Ll = outputs[3].data<T>(),
                      Lr = outputs[4].data<T>()]() mutable {
      const T* G = in[0].get();
      const T* Ql_in = in[1].get();
      const T* Qr_in = in[2].get();
      const T* Ll_in = in[3].get();
      const T* Lr_in = in[4].get();
      const T* scale_l = in[5].get();
      const T* scale_r = in[6].get();
      const T* scale_pg = in[7].get();
      const uint8_t* on = gate.get();
      const int64_t mn = int64_t(s.m) * s.n;
      const int64_t left = s.diag_left ? s.m : int64_t(s.m) * s.m, right = s.diag_right ? s.n : int64_t(s.n) * s.n;
      std::unique_ptr<T[]> work(new T[fit_scratch(s)]);  // not zero-filled
      for (int k = 0; k < s.slices; ++k) {
        Ll[k] = Ll_in[k];
        Lr[k] = Lr_in[k];
        fit_slice(G + k * mn, Ql_in + k * left, Qr_in + k * right, Ll + k, Lr + k, scale_l[k], scale_r[k],
                  scale_pg[k], on[k] != 0, s, work.get(), Pg + k * mn, Ql + k * left, Qr + k * right);
      }
    });
  }

  Settings s_;
};

// The momentum of a stack of S slices: M + w (G / n - M) element by element, w and n per slice (without `norm`,
// G itself), in optimizers.quad.momentum_update's operations and order: the same bits. MLX runs it as one fused
// kernel, but on its strided path (the per-slice factors are broadcast operands), ~3x slower than this loop.
template <typename T>
void momentum_slice(const T* __restrict M, const T* __restrict G, T w, T n, bool normalized, int64_t size,
                    T* __restrict out) {
  if (normalized)
    for (int64_t e = 0; e < size; ++e) out[e] = M[e] + w * (G[e] / n - M[e]);
  else
    for (int64_t e = 0; e < size; ++e) out[e] = M[e] + w * (G[e] - M[e]);
}

// Inputs: M, G (S, ...), the weights (S,) and (`normalized`) the norms (S,). Output: the new M.
class MomentumUpdate : public CpuPrimitive {
 public:
  MomentumUpdate(mx::Stream stream, bool normalized) : CpuPrimitive(stream), normalized_(normalized) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    if (inputs[0].dtype() == mx::float32)
      run<float>(inputs, outputs);
    else
      run<double>(inputs, outputs);
  }

  const char* name() const override { return "MomentumUpdate"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return normalized_ == static_cast<const MomentumUpdate&>(other).normalized_;
  }

 private:
  template <typename T>
  void run(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
    auto& encoder = this->encoder(inputs, outputs);
    std::vector<Dense<T>> in;
    for (const auto& a : inputs) in.emplace_back(a);
    const int64_t slices = inputs[0].shape(0), size = inputs[0].size() / std::max<int64_t>(slices, 1);
    encoder.dispatch([in = std::move(in), normalized = normalized_, slices, size, out = outputs[0].data<T>()]() mutable {
      const T* M = in[0].get();
      const T* G = in[1].get();
      const T* w = in[2].get();
      const T* n = normalized ? in[3].get() : nullptr;
      for (int64_t s = 0; s < slices; ++s)
        momentum_slice(M + s * size, G + s * size, w[s], normalized ? n[s] : T(1), normalized, size, out + s * size);
    });
  }

  bool normalized_;
};

bool available() { return blas().complete(); }

mx::array momentum_update(const mx::array& M, const mx::array& G, const mx::array& weight,
                          const std::optional<mx::array>& norm) {
  const auto dtype = M.dtype();
  if ((dtype != mx::float32 && dtype != mx::float64) || M.ndim() < 1 || G.shape() != M.shape() || G.dtype() != dtype)
    throw std::invalid_argument("momentum_update's M and G must be float32 or float64 arrays of one shape and dtype" +
                                given(G.shape() != M.shape() || G.dtype() != dtype ? G : M));
  std::vector<mx::array> inputs{M, G, weight};
  if (norm) inputs.push_back(*norm);
  for (size_t i = 2; i < inputs.size(); ++i)
    if (inputs[i].dtype() != dtype || inputs[i].size() != size_t(M.shape(0)))
      throw std::invalid_argument("momentum_update's weight and norm must have one entry per slice, of M's dtype" +
                                  given(inputs[i]));
  return mx::array(M.shape(), dtype, std::make_shared<MomentumUpdate>(mx::to_stream({}), norm.has_value()),
                   std::move(inputs));
}

std::vector<mx::array> quad_fit(const mx::array& G, const mx::array& Ql, const mx::array& Qr, const mx::array& Ll,
                                const mx::array& Lr, const mx::array& scale_l, const mx::array& scale_r,
                                const mx::array& scale_pg, const mx::array& gate, double precond_lr,
                                double precond_beta, double target_left, double target_right) {
  if (!available()) throw std::runtime_error("quad_fit needs a CBLAS (cblas_sgemm, ...) in the global scope");
  const auto dtype = G.dtype();
  if ((dtype != mx::float32 && dtype != mx::float64) || G.ndim() != 3 || G.shape(1) < 1 || G.shape(2) < 1)
    throw std::invalid_argument("quad_fit's G must be a float32 or float64 (S, m, n) array with m, n >= 1" + given(G));
  const int S = G.shape(0), m = G.shape(1), n = G.shape(2);
  auto factor = [&](const mx::array& q, int d, const char* what) {
    const bool diag = q.ndim() == 2;
    if (q.dtype() != dtype || q.shape(0) != S || q.shape(1) != d || (!diag && (q.ndim() != 3 || q.shape(2) != d)))
      throw std::invalid_argument(std::string("quad_fit's ") + what + " must be (S, d, d) or (S, d), of G's dtype" +
                                  given(q));
    return diag;
  };
  const bool diag_left = factor(Ql, m, "Q_l"), diag_right = factor(Qr, n, "Q_r");
  for (const auto* v : {&Ll, &Lr, &scale_l, &scale_r, &scale_pg})
    if (v->dtype() != dtype || v->size() != size_t(S))
      throw std::invalid_argument("quad_fit's L and scales must have one entry per slice, of G's dtype" + given(*v));
  if (gate.dtype() != mx::bool_ || gate.size() != size_t(S))
    throw std::invalid_argument("quad_fit's gate must be a bool vector with one entry per slice" + given(gate));
  Settings settings{S, m, n, diag_left, diag_right, precond_lr, precond_beta, target_left, target_right};
  return mx::array::make_arrays({G.shape(), Ql.shape(), Qr.shape(), Ll.shape(), Lr.shape()},
                                {dtype, dtype, dtype, dtype, dtype},
                                std::make_shared<QuadFit>(mx::to_stream({}), settings),
                                {G, Ql, Qr, Ll, Lr, scale_l, scale_r, scale_pg, gate});
}

}  // namespace

NB_MODULE(_quad_fit, m) {
  m.def("available", &available);
  m.def("momentum_update", &momentum_update, nb::arg("M"), nb::arg("G"), nb::arg("weight"), nb::arg("norm").none());
  m.def("quad_fit", &quad_fit, nb::arg("G"), nb::arg("Q_left"), nb::arg("Q_right"), nb::arg("L_left"),
        nb::arg("L_right"), nb::arg("scale_left"), nb::arg("scale_right"), nb::arg("scale_pg"), nb::arg("gate"),
        nb::arg("precond_lr"), nb::arg("precond_beta"), nb::arg("target_left"), nb::arg("target_right"));
}
