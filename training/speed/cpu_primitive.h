// What the speed layer's native primitives (native.cpp, quad_fit.cpp) share: their base class, evaluated MLX
// arrays read as row-major data, and what their one-line errors say of an array they refuse. Part of both builds'
// cache keys (native.py).
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace speed {

// ", not a float16 (2, 3) array" (", not an int32 ..."): what a one-line error names of the array it refuses.
inline std::string given(const mlx::core::array& a) {
  std::ostringstream dtype, text;
  dtype << a.dtype();
  text << (dtype.str()[0] == 'i' ? ", not an " : ", not a ") << dtype.str() << " (";
  for (int i = 0; i < a.ndim(); ++i) text << (i ? ", " : "") << a.shape(i);
  text << (a.ndim() == 1 ? ",) array" : ") array");
  return text.str();
}

// A row-major copy of an array of any rank in `storage`, or its data itself when it is row-major already.
template <typename T>
const T* dense(const T* data, const mlx::core::Shape& shape, const mlx::core::Strides& strides,
               std::vector<T>& storage) {
  int64_t size = 1;
  bool row_major = true;
  for (int axis = static_cast<int>(shape.size()) - 1; axis >= 0; --axis) {
    row_major = row_major && (shape[axis] == 1 || strides[axis] == size);
    size *= shape[axis];
  }
  if (row_major) return data;
  storage.resize(size);
  for (int64_t n = 0; n < size; ++n) {
    int64_t rest = n, offset = 0;
    for (int axis = static_cast<int>(shape.size()) - 1; axis >= 0; --axis) {
      offset += (rest % shape[axis]) * strides[axis];
      rest /= shape[axis];
    }
    storage[n] = data[offset];
  }
  return storage.data();
}

// An evaluated input read as row-major in the dispatched task (its strides are known in eval_cpu, its data
// only in the task).
template <typename T>
struct Dense {
  const T* data;
  mlx::core::Shape shape;
  mlx::core::Strides strides;
  std::vector<T> storage;

  explicit Dense(const mlx::core::array& a) : data(a.data<T>()), shape(a.shape()), strides(a.strides()) {}
  const T* get() { return dense(data, shape, strides, storage); }
};

// The base of the primitives: they run on the CPU only; `encoder` allocates the outputs and gives the
// stream's command encoder with the inputs and outputs registered.
class CpuPrimitive : public mlx::core::Primitive {
 public:
  using mlx::core::Primitive::Primitive;

  void eval_gpu(const std::vector<mlx::core::array>&, std::vector<mlx::core::array>&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU only");
  }

 protected:
  mlx::core::cpu::CommandEncoder& encoder(const std::vector<mlx::core::array>& inputs, std::vector<mlx::core::array>& outputs) {
    for (auto& o : outputs) o.set_data(mlx::core::allocator::malloc(o.nbytes()));
    auto& encoder = mlx::core::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    for (auto& o : outputs) encoder.set_output_array(o);
    return encoder;
  }
};

}  // namespace speed
