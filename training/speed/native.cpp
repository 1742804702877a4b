// The speed layer's native MLX primitives for the CPU backend, each one pass over its arrays, with its
// vector-Jacobian product as another: causal attention over a few positions, the SiLU gate, RMSNorm, the rotary
// embedding and the cross-entropy loss.
//
// Attention. MLX's fallback for mx.fast.scaled_dot_product_attention on the CPU computes the scores and the output as
// batched matmuls: for a (B, H, 4, d) query that is B x H BLAS calls of a 4 x d by d x 4 product each, plus
// the transposes into and out of the (B, H, L, d) layout, the scaling, the mask and the softmax as separate
// passes. Here each (row, head) pair is a few dot products of length d, done in registers, on arrays in the
// (B, L, H, d) layout the projections produce, with any strides (copied first where d's is not 1).
//
// Query i of Lq attends to key j of Lk when j <= i + Lk - Lq: the causal mask when Lq == Lk, every key for a
// read-out position (Lq == 1), and the keys of a prefix cache followed by the new ones. The keys and values
// may come in several parts along the sequence (a prefix cache and the new positions), read in place rather
// than concatenated.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
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

// A (B, L, H, d) float32 array read in place: its data and its strides along B, L and H, with unit stride
// along d (see unit_inner); with `rows`, row b of it is row rows[b] of the array (a prefix cache shared by many
// rows). Strides are only known once the array is evaluated: views are made in eval_cpu, and the data is read
// in the dispatched task, when it is there.
struct View {
  const float* data;
  mx::Shape shape;
  mx::Strides strides;
  const int32_t* rows = nullptr;
  int64_t rows_stride = 0;
  std::vector<float> storage;

  int length() const { return shape[1]; }

  // Copies the array to row-major storage if its stride along d is not 1 (the kernels' inner loops need it).
  void unit_inner() {
    if (strides[3] != 1) {
      data = speed::dense(data, shape, strides, storage);
      strides = {int64_t(shape[1]) * shape[2] * shape[3], int64_t(shape[2]) * shape[3], shape[3], 1};
    }
  }

  const float* at(int64_t b, int64_t j, int64_t h) const {
    return data + (rows ? rows[b * rows_stride] : b) * strides[0] + j * strides[1] + h * strides[2];
  }
};

View view_of(const mx::array& a) { return {a.data<float>(), a.shape(), a.strides()}; }

// a . b in LANES independent partial sums, added at the end: a fixed order the compiler can vectorize (one sum
// would be a chain of dependent adds, which it may not reorder).
constexpr int LANES = 16;

float dot(const float* a, const float* b, int d) {
  float lanes[LANES] = {};
  int t = 0;
  for (; t + LANES <= d; t += LANES)
    for (int l = 0; l < LANES; ++l) lanes[l] += a[t + l] * b[t + l];
  for (; t < d; ++t) lanes[t % LANES] += a[t] * b[t];
  float sum = 0.0f;
  for (int l = 0; l < LANES; ++l) sum += lanes[l];
  return sum;
}

// With `rows`, that each of the B rows names a row of `part` (their values are only known in the task; MLX
// raises the error on the main thread at the next evaluation).
void check_rows(const View& part, int64_t B) {
  if (!part.rows) return;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = part.rows[b * part.rows_stride];
    if (r < 0 || r >= part.shape[0])
      throw std::out_of_range("attention's rows[" + std::to_string(b) + "] = " + std::to_string(r) +
                              " must name one of the " + std::to_string(part.shape[0]) +
                              " rows of the first key and value parts");
  }
}

// Pointers to key / value j of (row b, head h) over the parts, in sequence order.
void gather_rows(const std::vector<View>& parts, int64_t b, int64_t h, std::vector<const float*>& out) {
  out.clear();
  for (const View& p : parts)
    for (int j = 0; j < p.length(); ++j) out.push_back(p.at(b, j, h));
}

// y += w x over d elements. (The kernels are free functions of restrict pointers and local sizes: the build
// has -fno-strict-aliasing, for nanobind, under which a float store might change any size or pointer in
// memory, and loops over them would not be vectorized.)
void add_scaled(float w, const float* __restrict x, float* __restrict y, int d) {
  for (int t = 0; t < d; ++t) y[t] += w * x[t];
}

// One query's attention over its `visible` keys k[j] and values v[j] (of Lk): the probabilities p (Lk, zero
// past `visible`) and the output out (d). `scaled` is scratch of d floats.
void attend_query(const float* __restrict q, const float* const* k, const float* const* v, int visible, int Lk,
                  int d, float scale, float* __restrict scaled, float* __restrict p, float* __restrict out) {
  for (int t = 0; t < d; ++t) scaled[t] = q[t] * scale;  // the query scaled first, as MLX does
  float top = -INFINITY;
  for (int j = 0; j < visible; ++j) top = std::max(top, p[j] = dot(scaled, k[j], d));
  float total = 0.0f;
  for (int j = 0; j < visible; ++j) total += (p[j] = std::exp(p[j] - top));
  for (int j = 0; j < visible; ++j) p[j] /= total;
  for (int j = visible; j < Lk; ++j) p[j] = 0.0f;
  std::fill_n(out, d, 0.0f);
  for (int j = 0; j < visible; ++j) add_scaled(p[j], v[j], out, d);
}

// The vector-Jacobian product of one (row, head) pair: from the rows q[i], k[j], v[j], the output's cotangent
// g[i] and the forward probabilities p (Lq, Lk), the cotangents dq[i], dk[j], dv[j]. `ds` is scratch (Lq, Lk).
void attend_backward(const float* const* q, const float* const* k, const float* const* v, const float* const* g,
                     const float* __restrict p, int Lq, int Lk, int d, float scale, float* __restrict ds,
                     float* const* dq, float* const* dk, float* const* dv) {
  for (int j = 0; j < Lk; ++j) {
    std::fill_n(dk[j], d, 0.0f);
    std::fill_n(dv[j], d, 0.0f);
  }
  for (int i = 0; i < Lq; ++i) {
    // dP_ij = g_i . v_j; dS_ij = P_ij (dP_ij - sum_j' P_ij' dP_ij') scale; dv_j += P_ij g_i.
    const int visible = i + Lk - Lq + 1;
    const float* pi = p + i * Lk;
    float* dsi = ds + i * Lk;
    float weighted = 0.0f;
    for (int j = 0; j < visible; ++j) {
      dsi[j] = dot(g[i], v[j], d);
      weighted += pi[j] * dsi[j];
      add_scaled(pi[j], g[i], dv[j], d);
    }
    for (int j = 0; j < visible; ++j) dsi[j] = pi[j] * (dsi[j] - weighted) * scale;
    // dq_i = sum_j dS_ij k_j (the scale is in dS).
    std::fill_n(dq[i], d, 0.0f);
    for (int j = 0; j < visible; ++j) add_scaled(dsi[j], k[j], dq[i], d);
    // dk_j += dS_ij q_i.
    for (int j = 0; j < visible; ++j) add_scaled(dsi[j], q[i], dk[j], d);
  }
}

void check_input(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32 || a.ndim() != 4)
    throw std::invalid_argument(std::string(what) + " must be a float32 (B, L, H, d) array" + given(a));
}

// The forward pass. Inputs: q, then the key parts, then the value parts, then (`indexed`) the int32 rows (B,)
// of the first parts that each row of q reads. Outputs: the attention output (B, Lq, H, d) and the
// probabilities (B, H, Lq, Lk), which the backward pass reuses.
class Attention : public CpuPrimitive {
 public:
  Attention(mx::Stream stream, float scale, int parts, bool indexed)
      : CpuPrimitive(stream), scale_(scale), parts_(parts), indexed_(indexed) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = this->encoder(inputs, outputs);
    mx::array& out = outputs[0];
    mx::array& probs = outputs[1];
    const mx::array& q = inputs[0];
    std::vector<View> keys, values;
    for (int p = 0; p < parts_; ++p) {
      keys.push_back(view_of(inputs[1 + p]));
      values.push_back(view_of(inputs[1 + parts_ + p]));
    }
    if (indexed_) {
      keys[0].rows = values[0].rows = inputs.back().data<int32_t>();
      keys[0].rows_stride = values[0].rows_stride = inputs.back().strides()[0];
    }
    encoder.dispatch([q = view_of(q), keys = std::move(keys), values = std::move(values), B = q.shape(0),
                      H = q.shape(2), d = static_cast<int>(q.shape(3)), out = out.data<float>(),
                      probs = probs.data<float>(), scale = scale_]() mutable {
      check_rows(keys[0], B);
      q.unit_inner();
      for (auto* parts : {&keys, &values})
        for (View& p : *parts) p.unit_inner();
      const int Lq = q.length();
      int Lk = 0;
      for (const View& p : keys) Lk += p.length();
      std::vector<const float*> k, v;
      std::vector<float> scaled(d);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
          gather_rows(keys, b, h, k);
          gather_rows(values, b, h, v);
          for (int i = 0; i < Lq; ++i)
            attend_query(q.at(b, i, h), k.data(), v.data(), i + Lk - Lq + 1,
                         Lk, d, scale, scaled.data(), probs + ((b * H + h) * Lq + i) * Lk,
                         out + ((b * Lq + i) * H + h) * d);
        }
      }
    });
  }

  const char* name() const override { return "FewPositionAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Attention&>(other);
    return scale_ == o.scale_ && parts_ == o.parts_ && indexed_ == o.indexed_;
  }

 private:
  float scale_;
  int parts_;
  bool indexed_;
};

// The vector-Jacobian product of one-part attention. Inputs: q, k, v, the forward probabilities and the
// output's cotangent. Outputs: the cotangents of q, k and v, each (B, L, H, d).
class AttentionBackward : public CpuPrimitive {
 public:
  AttentionBackward(mx::Stream stream, float scale) : CpuPrimitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = this->encoder(inputs, outputs);
    const mx::array& q = inputs[0];
    encoder.dispatch([q = view_of(q), k = view_of(inputs[1]), v = view_of(inputs[2]),
                      p = view_of(inputs[3]), g = view_of(inputs[4]), B = q.shape(0), H = q.shape(2),
                      d = static_cast<int>(q.shape(3)), dq = outputs[0].data<float>(),
                      dk = outputs[1].data<float>(), dv = outputs[2].data<float>(), scale = scale_]() mutable {
      for (View* a : {&q, &k, &v, &g}) a->unit_inner();
      const float* probs = speed::dense(p.data, p.shape, p.strides, p.storage);
      const int Lq = q.length(), Lk = k.length();
      std::vector<float> ds(Lq * Lk);
      std::vector<const float*> qs(Lq), ks(Lk), vs(Lk), gs(Lq);
      std::vector<float*> dqs(Lq), dks(Lk), dvs(Lk);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
          for (int i = 0; i < Lq; ++i) {
            qs[i] = q.at(b, i, h);
            gs[i] = g.at(b, i, h);
            dqs[i] = dq + ((b * Lq + i) * H + h) * d;
          }
          for (int j = 0; j < Lk; ++j) {
            ks[j] = k.at(b, j, h);
            vs[j] = v.at(b, j, h);
            dks[j] = dk + ((b * Lk + j) * H + h) * d;
            dvs[j] = dv + ((b * Lk + j) * H + h) * d;
          }
          attend_backward(qs.data(), ks.data(), vs.data(), gs.data(), probs + (b * H + h) * Lq * Lk, Lq, Lk, d,
                          scale, ds.data(), dqs.data(), dks.data(), dvs.data());
        }
      }
    });
  }

  const char* name() const override { return "FewPositionAttentionBackward"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const AttentionBackward&>(other).scale_;
  }

 private:
  float scale_;
};

std::vector<mx::array> attention(const mx::array& q, const std::vector<mx::array>& keys,
                                 const std::vector<mx::array>& values, float scale,
                                 const std::optional<mx::array>& rows) {
  auto s = mx::to_stream({});
  check_input(q, "queries");
  if (keys.empty() || keys.size() != values.size())
    throw std::invalid_argument("keys and values must come in the same number of parts, at least one");
  const int B = q.shape(0), H = q.shape(2), d = q.shape(3), Lq = q.shape(1);
  int Lk = 0;
  std::vector<mx::array> inputs = {q};
  for (const auto* group : {&keys, &values}) {
    for (size_t p = 0; p < group->size(); ++p) {
      const mx::array& a = (*group)[p];
      check_input(a, "keys and values");
      if ((a.shape(0) != B && !(rows && p == 0)) || a.shape(2) != H || a.shape(3) != d)
        throw std::invalid_argument("keys and values must match the queries' (B, _, H, d)" + given(a));
      inputs.push_back(a);
    }
  }
  if (rows) {
    if (rows->ndim() != 1 || rows->shape(0) != B)
      throw std::invalid_argument("rows must be a (B,) array, one row of the first parts per query row" + given(*rows));
    if (values[0].shape(0) != keys[0].shape(0))
      throw std::invalid_argument("the first key and value parts must have the same rows");
    inputs.push_back(mx::astype(*rows, mx::int32, s));
  }
  for (const auto& a : keys) Lk += a.shape(1);
  for (size_t p = 0; p < keys.size(); ++p)
    if (values[p].shape(1) != keys[p].shape(1)) throw std::invalid_argument("each key part needs its values");
  if (Lq > Lk) throw std::invalid_argument("more queries than keys");
  return mx::array::make_arrays(
      {{B, Lq, H, d}, {B, H, Lq, Lk}}, {mx::float32, mx::float32},
      std::make_shared<Attention>(s, scale, static_cast<int>(keys.size()), rows.has_value()), inputs);
}

std::vector<mx::array> attention_backward(const mx::array& q, const mx::array& k, const mx::array& v,
                                          const mx::array& probs, const mx::array& cotangent, float scale) {
  auto s = mx::to_stream({});
  std::vector<mx::array> inputs;
  for (const auto* a : {&q, &k, &v, &cotangent}) {
    check_input(*a, "attention_backward's arrays");
    inputs.push_back(*a);
  }
  inputs.insert(inputs.begin() + 3, probs);
  return mx::array::make_arrays({q.shape(), k.shape(), v.shape()}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<AttentionBackward>(s, scale), inputs);
}

// The SiLU gate. MLX's CPU exp calls the C library's fmaf for every polynomial step, and its kernel fusion
// splits kernels.fast_sigmoid (the same polynomial as plain multiply-adds) into three loops at its bit casts,
// and the gate and its gradients into more. Here the forward pass is one loop and the backward pass another,
// which recomputes the sigmoid rather than storing it. Every operation is kernels.fast_sigmoid's and
// kernels.silu_gate's, in their order, in float32 (the build keeps a * b + c two roundings): the same bits.

// kernels.fast_sigmoid: 1 / (1 + 2**n 2**f), n = round(-x log2 e) by the 1.5 * 2**23 trick, 2**f by Cephes'
// polynomial in Estrin's order.
inline float fast_sigmoid(float x) {
  constexpr float round = 12582912.0f;
  constexpr uint32_t exponent = 127u - 0x4B400000u;
  constexpr float c0 = 1.535336188319500e-4f, c1 = 1.339887440266574e-3f, c2 = 9.618437357674640e-3f,
                  c3 = 5.550332471162809e-2f, c4 = 2.402264791363012e-1f, c5 = 6.931472028550421e-1f, c6 = 1.0f;
  const float t = std::min(std::max(x * -1.4426950408889634f, -126.0f), 126.0f);
  const float rounded = t + round;
  uint32_t bits;
  std::memcpy(&bits, &rounded, sizeof bits);
  bits = (bits + exponent) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  const float f = t - (rounded - round), f2 = f * f;
  const float two_f = ((c6 + c5 * f) + f2 * (c4 + c3 * f)) + (f2 * f2) * ((c2 + c1 * f) + f2 * c0);
  return 1.0f / (1.0f + two_f * two_n);
}

void gate_forward(const float* __restrict a, const float* __restrict b, const uint8_t* __restrict keep, float scale,
                  float* __restrict h, int64_t n) {
  if (keep) {
    for (int64_t e = 0; e < n; ++e) h[e] = (((a[e] * fast_sigmoid(a[e])) * float(keep[e])) * scale) * b[e];
  } else {
    for (int64_t e = 0; e < n; ++e) h[e] = (a[e] * fast_sigmoid(a[e])) * b[e];
  }
}

// d silu(a) / da = s (1 + a (1 - s)).
void gate_backward(const float* __restrict a, const float* __restrict b, const uint8_t* __restrict keep,
                   const float* __restrict g, float scale, float* __restrict da, float* __restrict db, int64_t n) {
  if (keep) {
    for (int64_t e = 0; e < n; ++e) {
      const float s = fast_sigmoid(a[e]), kept = (g[e] * float(keep[e])) * scale;
      da[e] = (kept * b[e]) * (s * (1.0f + a[e] * (1.0f - s)));
      db[e] = (kept * a[e]) * s;
    }
  } else {
    for (int64_t e = 0; e < n; ++e) {
      const float s = fast_sigmoid(a[e]);
      da[e] = (g[e] * b[e]) * (s * (1.0f + a[e] * (1.0f - s)));
      db[e] = (g[e] * a[e]) * s;
    }
  }
}

// Inputs: a, b, (masked) the boolean dropout mask, then (backward) the output's cotangent. Outputs: the gate
// (a * sigmoid(a) * keep * scale * b), or (backward) the cotangents of a and b.
class SiluGate : public CpuPrimitive {
 public:
  SiluGate(mx::Stream stream, float scale, bool masked, bool backward)
      : CpuPrimitive(stream), scale_(scale), masked_(masked), backward_(backward) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = this->encoder(inputs, outputs);
    std::optional<Dense<uint8_t>> keep;  // MLX stores a bool in a byte
    if (masked_) keep.emplace(inputs[2]);
    std::optional<Dense<float>> g;
    if (backward_) g.emplace(inputs.back());
    encoder.dispatch([a = Dense<float>(inputs[0]), b = Dense<float>(inputs[1]), keep = std::move(keep),
                      g = std::move(g), n = static_cast<int64_t>(inputs[0].size()),
                      first = outputs[0].data<float>(), second = backward_ ? outputs[1].data<float>() : nullptr,
                      scale = scale_]() mutable {
      const uint8_t* mask = keep ? keep->get() : nullptr;
      if (g)
        gate_backward(a.get(), b.get(), mask, g->get(), scale, first, second, n);
      else
        gate_forward(a.get(), b.get(), mask, scale, first, n);
    });
  }

  const char* name() const override { return backward_ ? "SiluGateBackward" : "SiluGate"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const SiluGate&>(other);
    return scale_ == o.scale_ && masked_ == o.masked_ && backward_ == o.backward_;
  }

 private:
  float scale_;
  bool masked_, backward_;
};

std::vector<mx::array> gate_inputs(const mx::array& a, const mx::array& b, const std::optional<mx::array>& keep,
                                   const std::optional<mx::array>& cotangent) {
  std::vector<mx::array> inputs = {a, b};
  if (cotangent) inputs.push_back(*cotangent);
  for (const auto& x : inputs)
    if (x.dtype() != mx::float32)
      throw std::invalid_argument("the gate's a, b and cotangent must be float32" + given(x));
  if (keep) {
    if (keep->dtype() != mx::bool_) throw std::invalid_argument("the gate's mask must be bool" + given(*keep));
    inputs.insert(inputs.begin() + 2, *keep);
  }
  for (const auto& x : inputs)
    if (x.shape() != a.shape())
      throw std::invalid_argument("the gate's arrays must all have the shape of a" + given(x));
  return inputs;
}

mx::array silu_gate(const mx::array& a, const mx::array& b, const std::optional<mx::array>& keep, float scale) {
  auto s = mx::to_stream({});
  return mx::array(a.shape(), mx::float32, std::make_shared<SiluGate>(s, scale, keep.has_value(), false),
                   gate_inputs(a, b, keep, std::nullopt));
}

std::vector<mx::array> silu_gate_backward(const mx::array& a, const mx::array& b,
                                          const std::optional<mx::array>& keep, const mx::array& cotangent,
                                          float scale) {
  auto s = mx::to_stream({});
  return mx::array::make_arrays({a.shape(), a.shape()}, {mx::float32, mx::float32},
                                std::make_shared<SiluGate>(s, scale, keep.has_value(), true),
                                gate_inputs(a, b, keep, cotangent));
}

// RMSNorm. MLX's fallback on the CPU is its definition as ops: a square, a mean (a reduction and a multiply),
// an add and an rsqrt, two multiplies, and their derivatives, a dozen passes and graph nodes each way. Here each
// row is one pass forward and one back (the backward recomputes the row's scale), with the weight's gradient
// summed over the rows in order.

// The row scale 1 / sqrt(mean(x^2) + eps).
inline float row_scale(const float* __restrict x, int d, float eps) {
  return 1.0f / std::sqrt(dot(x, x, d) * (1.0f / d) + eps);
}

void norm_forward(const float* __restrict x, const float* __restrict w, float eps, int64_t rows, int d,
                  float* __restrict y) {
  for (int64_t r = 0; r < rows; ++r, x += d, y += d) {
    const float scale = row_scale(x, d, eps);
    for (int t = 0; t < d; ++t) y[t] = (x[t] * scale) * w[t];
  }
}

// With y = w x s, s = (mean(x^2) + eps)^(-1/2): dx = s (g w) - x s^3 mean(g w x), dw = sum over rows of g x s.
void norm_backward(const float* __restrict x, const float* __restrict w, const float* __restrict g, float eps,
                   int64_t rows, int d, float* __restrict dx, float* __restrict dw, float* __restrict gw) {
  std::fill_n(dw, d, 0.0f);
  for (int64_t r = 0; r < rows; ++r, x += d, g += d, dx += d) {
    const float scale = row_scale(x, d, eps);
    for (int t = 0; t < d; ++t) gw[t] = g[t] * w[t];
    const float c = scale * scale * scale * (dot(gw, x, d) * (1.0f / d));
    for (int t = 0; t < d; ++t) {
      dx[t] = scale * gw[t] - c * x[t];
      dw[t] += (g[t] * x[t]) * scale;
    }
  }
}

// Inputs: x (..., d), the weight (d,), then (backward) the output's cotangent. Outputs: the normalized x, or
// (backward) the cotangents of x and of the weight.
class RmsNorm : public CpuPrimitive {
 public:
  RmsNorm(mx::Stream stream, float eps, bool backward) : CpuPrimitive(stream), eps_(eps), backward_(backward) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = this->encoder(inputs, outputs);
    std::optional<Dense<float>> g;
    if (backward_) g.emplace(inputs[2]);
    const int d = inputs[0].shape(-1);
    encoder.dispatch([x = Dense<float>(inputs[0]), w = Dense<float>(inputs[1]), g = std::move(g), d,
                      rows = static_cast<int64_t>(inputs[0].size() / d), first = outputs[0].data<float>(),
                      second = backward_ ? outputs[1].data<float>() : nullptr, eps = eps_]() mutable {
      if (g) {
        std::vector<float> gw(d);
        norm_backward(x.get(), w.get(), g->get(), eps, rows, d, first, second, gw.data());
      } else {
        norm_forward(x.get(), w.get(), eps, rows, d, first);
      }
    });
  }

  const char* name() const override { return backward_ ? "RmsNormBackward" : "RmsNorm"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const RmsNorm&>(other);
    return eps_ == o.eps_ && backward_ == o.backward_;
  }

 private:
  float eps_;
  bool backward_;
};

void check_norm(const mx::array& x, const mx::array& w) {
  for (const auto* a : {&x, &w})
    if (a->dtype() != mx::float32) throw std::invalid_argument("rms_norm's x and weight must be float32" + given(*a));
  if (x.ndim() < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1))
    throw std::invalid_argument("rms_norm's weight must be a vector as long as x's last axis" + given(w));
}

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps) {
  check_norm(x, w);
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(mx::to_stream({}), eps, false), {x, w});
}

std::vector<mx::array> rms_norm_backward(const mx::array& x, const mx::array& w, const mx::array& cotangent,
                                         float eps) {
  check_norm(x, w);
  if (cotangent.shape() != x.shape() || cotangent.dtype() != mx::float32)
    throw std::invalid_argument("rms_norm_backward's cotangent must be float32 and shaped as x" + given(cotangent));
  return mx::array::make_arrays({x.shape(), w.shape()}, {mx::float32, mx::float32},
                                std::make_shared<RmsNorm>(mx::to_stream({}), eps, true), {x, w, cotangent});
}

// The rotary embedding of kernels.rope: x (B, L, H, D), its features in kernels.rope_order (each head's first halves
// of the pairs, then their second halves), the tables C, S (L, 1, 2, D / 2) of kernels.rope_tables. MLX runs
// kernels.rope as one fused kernel, but on its strided path (the tables are broadcast over B and H, and the swap of
// the halves is a view with a negative stride), ~4x slower per element than a contiguous loop. Here each (b, l, h)
// row is one loop over its pairs: the first half x1 c1 + x2 s1, the second x2 c2 + x1 s2, with (inverse: the
// backward pass, the inverse rotation) the sines negated. x is read in place (a View: the first block's queries and
// keys are column slices of one looked-up (B, L, 3D) array); y is row-major.
void rotate_rows(const View& x, const float* __restrict C, const float* __restrict S, bool inverse,
                 float* __restrict y) {
  const int L = x.shape[1], H = x.shape[2], D = x.shape[3], half = D / 2;
  const float sign = inverse ? -1.0f : 1.0f;  // exact: the sines negated, as kernels.rope's backward passes -S
  for (int64_t b = 0; b < x.shape[0]; ++b)
    for (int l = 0; l < L; ++l) {
      const float* c = C + int64_t(l) * D;
      const float* s = S + int64_t(l) * D;
      for (int h = 0; h < H; ++h, y += D) {
        const float* __restrict r = x.at(b, l, h);
        for (int j = 0; j < half; ++j) y[j] = r[j] * c[j] + r[half + j] * (sign * s[j]);
        for (int j = 0; j < half; ++j) y[half + j] = r[half + j] * c[half + j] + r[j] * (sign * s[half + j]);
      }
    }
}

// Inputs: x (B, L, H, D), C, S (L, 1, 2, D / 2). Output: x rotated (inverse: by the inverse rotation).
class Rope : public CpuPrimitive {
 public:
  Rope(mx::Stream stream, bool inverse) : CpuPrimitive(stream), inverse_(inverse) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = this->encoder(inputs, outputs);
    encoder.dispatch([x = view_of(inputs[0]), C = Dense<float>(inputs[1]), S = Dense<float>(inputs[2]),
                      y = outputs[0].data<float>(), inverse = inverse_]() mutable {
      x.unit_inner();
      rotate_rows(x, C.get(), S.get(), inverse, y);
    });
  }

  const char* name() const override { return inverse_ ? "RopeInverse" : "Rope"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return inverse_ == static_cast<const Rope&>(other).inverse_;
  }

 private:
  bool inverse_;
};

mx::array rope(const mx::array& x, const mx::array& C, const mx::array& S, bool inverse) {
  if (x.dtype() != mx::float32 || x.ndim() != 4 || x.shape(3) % 2 != 0)
    throw std::invalid_argument("rope's x must be a float32 (B, L, H, D) array with D even" + given(x));
  for (const auto* t : {&C, &S})
    if (t->dtype() != mx::float32 || t->ndim() != 4 || t->shape(0) != x.shape(1) || t->shape(1) != 1 ||
        t->shape(2) != 2 || t->shape(3) != x.shape(3) / 2)
      throw std::invalid_argument("rope's tables must be float32 (L, 1, 2, D / 2) arrays for x's L and D" +
                                  given(*t));
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(mx::to_stream({}), inverse), {x, C, S});
}

// Cross-entropy. MLX computes nn.losses.cross_entropy's logsumexp (and, backward, its softmax) with its scalar exp,
// which calls the C library's fmaf for every polynomial step: ~12 ns an element, 3 ms for an evaluation's 2328 x 99
// logits per stream, against 0.2 ms for the row maxima. Here each row is one pass for its maximum and one for the
// sum of exponentials forward; backward, the same two and one that writes softmax - one-hot, scaled by the
// cotangent. The exponential is a vectorizable one (below), within a few ulps of float64, so the loss matches
// MLX's to float rounding.

// exp(x) for x <= 0 (the logits less their row maximum): x = n ln 2 + r with |r| <= ln 2 / 2 (ln 2 split in two
// parts, so that n ln 2 is exact to float precision), exp(r) by a degree-6 polynomial (Cephes' expf
// coefficients), times 2^n built in the exponent bits; 0 below -87.3, where exp(x) is no longer a normal float.
// NaN stays NaN. n is rounded by adding and subtracting 1.5 * 2^23, not by std::floor, which g++ does not
// vectorize without -fno-trapping-math: with it the loops over the exponentials are vectorized (-fopt-info-vec).
inline float exp_nonpositive(float x) {
  constexpr float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  constexpr float p0 = 1.9875691500e-4f, p1 = 1.3981999507e-3f, p2 = 8.3334519073e-3f, p3 = 4.1665795894e-2f,
                  p4 = 1.6666665459e-1f, p5 = 5.0000001201e-1f, to_integer = 12582912.0f;
  const float clamped = std::max(x, -87.3f);
  const float n = (clamped * log2e + to_integer) - to_integer;
  const float r = (clamped - n * ln2_hi) - n * ln2_lo;
  const float poly = (((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5) * (r * r) + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.3f ? 0.0f : poly * two_n;
}

// A row's maximum over LANES partial maxima (a NaN may be passed over: the sum of exponentials is NaN then) and
// log sum exp(x - max) over LANES partial sums.
inline float row_max(const float* __restrict x, int V) {
  float tops[LANES];
  std::fill_n(tops, LANES, -INFINITY);
  int j = 0;
  for (; j + LANES <= V; j += LANES)
    for (int l = 0; l < LANES; ++l) tops[l] = std::max(tops[l], x[j + l]);
  for (int l = 0; j < V; ++j, ++l) tops[l] = std::max(tops[l], x[j]);
  return *std::max_element(tops, tops + LANES);
}

inline float log_sum_exp(const float* __restrict x, int V) {
  const float top = row_max(x, V);
  float lanes[LANES] = {};
  int j = 0;
  for (; j + LANES <= V; j += LANES)
    for (int l = 0; l < LANES; ++l) lanes[l] += exp_nonpositive(x[j + l] - top);
  for (int l = 0; j < V; ++j, ++l) lanes[l] += exp_nonpositive(x[j] - top);
  float total = 0.0f;
  for (int l = 0; l < LANES; ++l) total += lanes[l];
  return top + std::log(total);
}

// The target's index, or -1 where it is not one of the V classes (the row's loss and gradient are then NaN).
inline int target_of(const int32_t* y, int64_t r, int V) { return 0 <= y[r] && y[r] < V ? y[r] : -1; }

void cross_entropy_rows(const float* __restrict x, const int32_t* __restrict y, int64_t rows, int V,
                        float* __restrict loss) {
  for (int64_t r = 0; r < rows; ++r, x += V) {
    const int t = target_of(y, r, V);
    loss[r] = t < 0 ? NAN : log_sum_exp(x, V) - x[t];
  }
}

// d loss_r / d x_rj = softmax(x_r)_j - [j == y_r].
void cross_entropy_rows_backward(const float* __restrict x, const int32_t* __restrict y, const float* __restrict g,
                                 int64_t rows, int V, float* __restrict dx) {
  for (int64_t r = 0; r < rows; ++r, x += V, dx += V) {
    const int t = target_of(y, r, V);
    const float lse = t < 0 ? NAN : log_sum_exp(x, V), gr = g[r];
    for (int j = 0; j < V; ++j) dx[j] = gr * exp_nonpositive(x[j] - lse);
    if (t >= 0) dx[t] -= gr;
  }
}

// Inputs: the logits (N, V), the int32 targets (N,), then (backward) the losses' cotangent (N,). Output: the
// losses (N,), or (backward) the logits' cotangent.
class CrossEntropy : public CpuPrimitive {
 public:
  CrossEntropy(mx::Stream stream, bool backward) : CpuPrimitive(stream), backward_(backward) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = this->encoder(inputs, outputs);
    std::optional<Dense<float>> g;
    if (backward_) g.emplace(inputs[2]);
    encoder.dispatch([x = Dense<float>(inputs[0]), y = Dense<int32_t>(inputs[1]), g = std::move(g),
                      rows = static_cast<int64_t>(inputs[0].shape(0)), V = inputs[0].shape(1),
                      out = outputs[0].data<float>()]() mutable {
      if (g)
        cross_entropy_rows_backward(x.get(), y.get(), g->get(), rows, V, out);
      else
        cross_entropy_rows(x.get(), y.get(), rows, V, out);
    });
  }

  const char* name() const override { return backward_ ? "CrossEntropyBackward" : "CrossEntropy"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return backward_ == static_cast<const CrossEntropy&>(other).backward_;
  }

 private:
  bool backward_;
};

void check_cross_entropy(const mx::array& logits, const mx::array& targets) {
  if (logits.dtype() != mx::float32 || logits.ndim() != 2)
    throw std::invalid_argument("cross_entropy's logits must be a float32 (N, V) array" + given(logits));
  if (targets.dtype() != mx::int32 || targets.ndim() != 1 || targets.shape(0) != logits.shape(0))
    throw std::invalid_argument("cross_entropy's targets must be an int32 (N,) array, one per row of the logits" +
                                given(targets));
}

mx::array cross_entropy(const mx::array& logits, const mx::array& targets) {
  check_cross_entropy(logits, targets);
  return mx::array({logits.shape(0)}, mx::float32, std::make_shared<CrossEntropy>(mx::to_stream({}), false),
                   {logits, targets});
}

mx::array cross_entropy_backward(const mx::array& logits, const mx::array& targets, const mx::array& cotangent) {
  check_cross_entropy(logits, targets);
  if (cotangent.dtype() != mx::float32 || cotangent.shape() != targets.shape())
    throw std::invalid_argument("cross_entropy_backward's cotangent must be float32 and shaped as the targets" +
                                given(cotangent));
  return mx::array(logits.shape(), mx::float32, std::make_shared<CrossEntropy>(mx::to_stream({}), true),
                   {logits, targets, cotangent});
}

}  // namespace

NB_MODULE(_native, m) {
  m.def("attention", &attention, nb::arg("q"), nb::arg("keys"), nb::arg("values"), nb::arg("scale"),
        nb::arg("rows") = nb::none());
  m.def("attention_backward", &attention_backward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("probs"),
        nb::arg("cotangent"), nb::arg("scale"));
  m.def("silu_gate", &silu_gate, nb::arg("a"), nb::arg("b"), nb::arg("keep").none(), nb::arg("scale"));
  m.def("silu_gate_backward", &silu_gate_backward, nb::arg("a"), nb::arg("b"), nb::arg("keep").none(),
        nb::arg("cotangent"), nb::arg("scale"));
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("weight"), nb::arg("eps"));
  m.def("rms_norm_backward", &rms_norm_backward, nb::arg("x"), nb::arg("weight"), nb::arg("cotangent"),
        nb::arg("eps"));
  m.def("rope", &rope, nb::arg("x"), nb::arg("C"), nb::arg("S"), nb::arg("inverse"));
  m.def("cross_entropy", &cross_entropy, nb::arg("logits"), nb::arg("targets"));
  m.def("cross_entropy_backward", &cross_entropy_backward, nb::arg("logits"), nb::arg("targets"),
        nb::arg("cotangent"));
}
