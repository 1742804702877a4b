// mx.random.bits and mx.random.bernoulli of MLX's CPU backend, restated as loops the compiler vectorizes.
//
// MLX hashes each pair of 32-bit counters with Threefry-2x32 (20 rounds; Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC 2011), one pair at a time (mlx/backend/cpu/threefry.cpp). For one key and
// n words it hashes the counters (i, i + h) for i < n / 2, h = n / 2 + n % 2, into words i and i + h, and for
// odd n the counters (n / 2, 0) into word n / 2 (RandomBits::eval_cpu). bernoulli(p) is
// float(bits) < float32(p) * upper, compared in float32. The same words and comparisons come out here.
#include <cstddef>
#include <cstdint>

namespace {

inline uint32_t rotate_left(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

// Four rounds, then the key injection s (1..5).
#define ROUNDS(r0, r1, r2, r3, ka, kb, s)                                                  \
  x0 += x1; x1 = rotate_left(x1, r0); x1 ^= x0;                                              \
  x0 += x1; x1 = rotate_left(x1, r1); x1 ^= x0;                                              \
  x0 += x1; x1 = rotate_left(x1, r2); x1 ^= x0;                                              \
  x0 += x1; x1 = rotate_left(x1, r3); x1 ^= x0;                                              \
  x0 += ka; x1 += kb + s;

inline void threefry2x32(uint32_t k0, uint32_t k1, uint32_t& c0, uint32_t& c1) {
  const uint32_t k2 = k0 ^ k1 ^ 0x1BD11BDAu;
  uint32_t x0 = c0 + k0, x1 = c1 + k1;
  ROUNDS(13, 15, 26, 6, k1, k2, 1)
  ROUNDS(17, 29, 16, 24, k2, k0, 2)
  ROUNDS(13, 15, 26, 6, k0, k1, 3)
  ROUNDS(17, 29, 16, 24, k1, k2, 4)
  ROUNDS(13, 15, 26, 6, k2, k0, 5)
  c0 = x0;
  c1 = x1;
}

// Calls put(word index, word) for the n words of key (k0, k1), in MLX's layout.
template <class Put>
inline void random_words(uint32_t k0, uint32_t k1, size_t n, Put put) {
  const size_t half = n / 2, odd = n % 2;
  for (size_t i = 0; i < half; i++) {
    uint32_t a = static_cast<uint32_t>(i), b = static_cast<uint32_t>(i + half + odd);
    threefry2x32(k0, k1, a, b);
    put(i, a);
    put(i + half + odd, b);
  }
  if (odd) {
    uint32_t a = static_cast<uint32_t>(half), b = 0;
    threefry2x32(k0, k1, a, b);
    put(half, a);
  }
}

}  // namespace

extern "C" {

// mx.random.bits((n,), key=(k0, k1)) into out.
void random_bits(uint32_t k0, uint32_t k1, size_t n, uint32_t* out) {
  random_words(k0, k1, n, [out](size_t i, uint32_t w) { out[i] = w; });
}

// mx.random.bernoulli(p, (n,), key=(k0, k1)) into out (0 or 1), threshold = float32(p) * upper.
void bernoulli(uint32_t k0, uint32_t k1, size_t n, float threshold, uint8_t* out) {
  random_words(k0, k1, n, [out, threshold](size_t i, uint32_t w) { out[i] = static_cast<float>(w) < threshold; });
}

}
