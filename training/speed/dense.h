// Evaluated MLX arrays read as row-major data, for the speed layer's primitives (native.cpp, quad_fit.cpp). Part of
// both builds' cache keys (native.py).
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/array.h"

namespace speed {

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

}  // namespace speed
