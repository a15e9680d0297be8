// Batched crop + resample on CPU, applying a ResamplePlan (see medvistagym/kernels/plan.py).
//
// All boxes run in one call, OpenMP over boxes. Both passes combine whole rows
// (out row o = sum_k w[o][k] * in row first[o] + k), so inner loops run over contiguous memory;
// the horizontal pass runs on a transposed strip. uint8 sources follow Pillow's 8-bit arithmetic
// bit for bit: 22-bit fixed-point taps, int32 sums starting at 1 << 21, >> 22 and clamp to 0..255
// after each pass, in Pillow 13's pass order. Other sources resample in float32.
//
// Results leave through a sink: an image (with the output dtype's conversion) or Qwen-VL patch
// rows (windowed, normalised and written straight into patch order).

// Narrow includes rather than torch/extension.h: they halve the first-use build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <limits>
#include <new>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int kPrecisionBits = 22;  // Pillow's PRECISION_BITS
// Rows per strip: a strip's scratch (strip x span) stays in L2 while both passes run over it.
constexpr int64_t kStrip = 64;

// ---------------------------------------------------------------------------------------------
// Per-thread scratch, grown on demand and kept across boxes and calls: fresh pages cost more
// (first-touch faults) than the arithmetic of a small box.

enum Slot { kFirstX, kCountX, kWeightX, kFirstY, kCountY, kWeightY, kA, kAT, kB, kT, kStrips, kLevels, kRow, kSlots };

class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    for (Block& b : blocks_) std::free(b.ptr);
  }

  template <class T>
  T* get(Slot slot, int64_t n) {
    Block& b = blocks_[slot];
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    if (b.bytes < bytes) {
      std::free(b.ptr);
      b.bytes = (std::max(bytes, b.bytes + b.bytes / 2) + 63) / 64 * 64;
      b.ptr = std::aligned_alloc(64, b.bytes);
      if (b.ptr == nullptr) throw std::bad_alloc();
    }
    return static_cast<T*>(b.ptr);
  }

 private:
  struct Block {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  std::array<Block, kSlots> blocks_;
};

Workspace& workspace() {
  static thread_local Workspace ws;
  return ws;
}

// ---------------------------------------------------------------------------------------------
// Taps of one axis of one box, with `first` relative to the span [lo, hi) the box reads.

struct PlanTaps {
  const int64_t* first;  // (2N, O)
  const int64_t* count;  // (2N, O)
  const double* weight;  // (2N, O, K)
  int64_t o, k;
};

template <class W>
struct Axis {
  const int32_t* first;
  const int32_t* count;
  const W* weight;  // row o at weight + o * k
  int64_t k, lo, hi, out;
  int64_t span() const { return hi - lo; }
};

inline int32_t fixed_point(double w) {
  // Pillow's normalize_coeffs_8bpc: round half away from zero.
  const double s = w * (1 << kPrecisionBits);
  return static_cast<int32_t>(s < 0 ? std::ceil(s - 0.5) : std::floor(s + 0.5));
}

// The input interval [lo, hi) that the first `out` samples of taps row `row` read.
std::pair<int64_t, int64_t> tap_span(const PlanTaps& taps, int64_t row, int64_t out) {
  const int64_t* f = taps.first + row * taps.o;
  const int64_t* c = taps.count + row * taps.o;
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
  for (int64_t o = 0; o < out; ++o) {
    if (c[o] > 0) {
      lo = std::min(lo, f[o]);
      hi = std::max(hi, f[o] + c[o]);
    }
  }
  return {std::min(lo, hi), hi};
}

template <class W>
Axis<W> prepare_axis(const PlanTaps& taps, int64_t row, int64_t out, Workspace& ws, Slot first_slot) {
  const int64_t* f = taps.first + row * taps.o;
  const int64_t* c = taps.count + row * taps.o;
  const double* w = taps.weight + row * taps.o * taps.k;
  const auto [lo, hi] = tap_span(taps, row, out);
  auto* first = ws.get<int32_t>(first_slot, out);
  auto* count = ws.get<int32_t>(static_cast<Slot>(first_slot + 1), out);
  auto* weight = ws.get<W>(static_cast<Slot>(first_slot + 2), out * taps.k);
  for (int64_t o = 0; o < out; ++o) {
    first[o] = c[o] > 0 ? static_cast<int32_t>(f[o] - lo) : 0;
    count[o] = static_cast<int32_t>(c[o]);
    for (int64_t j = 0; j < c[o]; ++j) {
      const double v = w[o * taps.k + j];
      if constexpr (std::is_same_v<W, int32_t>) {
        weight[o * taps.k + j] = fixed_point(v);
      } else {
        weight[o * taps.k + j] = static_cast<float>(v);
      }
    }
  }
  return Axis<W>{first, count, weight, taps.k, lo, hi, out};
}

// ---------------------------------------------------------------------------------------------
// One output row from `count` input rows `stride` apart, over `n` contiguous samples.

#ifdef __AVX2__
inline __m256i widen8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
#endif

// 8-bit: Pillow's fixed-point sum; the clamp is clip8.
inline void combine_row(const uint8_t* in, int64_t stride, const int32_t* w, int count, int64_t n, uint8_t* out) {
  int64_t x = 0;
#ifdef __AVX2__
  const __m256i half = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  // packus leaves each 128-bit lane's bytes in 4-pixel groups; this puts them back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; x + 32 <= n; x += 32) {
    __m256i a0 = half, a1 = half, a2 = half, a3 = half;
    const uint8_t* p = in + x;
    for (int k = 0; k < count; ++k, p += stride) {
      // 8-byte loads widen straight from memory (vpmovzxbd m64): 1.5x faster than shifting 16-byte loads.
      const __m256i wk = _mm256_set1_epi32(w[k]);
      a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(widen8(p), wk));
      a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(widen8(p + 8), wk));
      a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(widen8(p + 16), wk));
      a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(widen8(p + 24), wk));
    }
    const int shift = kPrecisionBits;
    const __m256i s01 = _mm256_packs_epi32(_mm256_srai_epi32(a0, shift), _mm256_srai_epi32(a1, shift));
    const __m256i s23 = _mm256_packs_epi32(_mm256_srai_epi32(a2, shift), _mm256_srai_epi32(a3, shift));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(s01, s23), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + x), bytes);
  }
#endif
  for (; x < n; ++x) {
    int32_t acc = 1 << (kPrecisionBits - 1);
    for (int k = 0; k < count; ++k) acc += w[k] * static_cast<int32_t>(in[x + k * stride]);
    out[x] = static_cast<uint8_t>(std::clamp(acc >> kPrecisionBits, 0, 255));
  }
}

#ifdef __AVX2__
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const int16_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// float32: plain sums (the float path is not rounded between passes).
template <class In>
inline void combine_row(const In* in, int64_t stride, const float* w, int count, int64_t n, float* out) {
  int64_t x = 0;
#ifdef __AVX2__
  for (; x + 32 <= n; x += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const In* p = in + x;
    for (int k = 0; k < count; ++k, p += stride) {
      const __m256 wk = _mm256_set1_ps(w[k]);
      a0 = _mm256_fmadd_ps(load8(p), wk, a0);
      a1 = _mm256_fmadd_ps(load8(p + 8), wk, a1);
      a2 = _mm256_fmadd_ps(load8(p + 16), wk, a2);
      a3 = _mm256_fmadd_ps(load8(p + 24), wk, a3);
    }
    _mm256_storeu_ps(out + x, a0);
    _mm256_storeu_ps(out + x + 8, a1);
    _mm256_storeu_ps(out + x + 16, a2);
    _mm256_storeu_ps(out + x + 24, a3);
  }
#endif
  for (; x < n; ++x) {
    float acc = 0.0f;
    for (int k = 0; k < count; ++k) acc += w[k] * static_cast<float>(in[x + k * stride]);
    out[x] = acc;
  }
}

// Output rows [o0, o1) of an axis over `in` (rows `stride` apart, starting at the span's first row).
template <class In, class W, class Work>
void combine(const In* in, int64_t stride, int64_t n, const Axis<W>& axis, int64_t o0, int64_t o1, Work* out,
             int64_t out_stride) {
  for (int64_t o = o0; o < o1; ++o) {
    combine_row(in + axis.first[o] * stride, stride, axis.weight + o * axis.k, axis.count[o], n,
                out + (o - o0) * out_stride);
  }
}

// ---------------------------------------------------------------------------------------------
// Transposes: dst[c * ds + r] = src[r * ss + c] for a rows x cols block.

template <class In, class Out>
void transpose_scalar(const In* src, int64_t ss, Out* dst, int64_t ds, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 16;  // both sides of a tile stay in L1
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) dst[c * ds + r] = static_cast<Out>(src[r * ss + c]);
      }
    }
  }
}

#ifdef __AVX2__
// 16 x 16 bytes: four rounds of unpacks, each doubling the run of one column's bytes.
inline void transpose16x16(const uint8_t* src, int64_t ss, uint8_t* dst, int64_t ds) {
  __m128i a[16], b[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ss));
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
    b[i + 8] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    for (int h = 0; h < 2; ++h) {
      a[8 * h + i] = _mm_unpacklo_epi16(b[8 * h + 2 * i], b[8 * h + 2 * i + 1]);
      a[8 * h + i + 4] = _mm_unpackhi_epi16(b[8 * h + 2 * i], b[8 * h + 2 * i + 1]);
    }
  }
  for (int i = 0; i < 2; ++i) {
    for (int q = 0; q < 4; ++q) {
      b[4 * q + i] = _mm_unpacklo_epi32(a[4 * q + 2 * i], a[4 * q + 2 * i + 1]);
      b[4 * q + i + 2] = _mm_unpackhi_epi32(a[4 * q + 2 * i], a[4 * q + 2 * i + 1]);
    }
  }
  for (int q = 0; q < 8; ++q) {
    a[2 * q] = _mm_unpacklo_epi64(b[2 * q], b[2 * q + 1]);
    a[2 * q + 1] = _mm_unpackhi_epi64(b[2 * q], b[2 * q + 1]);
  }
  // Register i now holds column i.
  for (int i = 0; i < 16; ++i) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i * ds), a[i]);
}

inline void transpose8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ds, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ds, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// Whole tiles with `tile`, the ragged right and bottom edges with the scalar loop.
template <int64_t N, class T, class Tile>
void transpose_tiled(const T* src, int64_t ss, T* dst, int64_t ds, int64_t rows, int64_t cols, Tile tile) {
  const int64_t rt = rows / N * N, ct = cols / N * N;
  for (int64_t r = 0; r < rt; r += N) {
    for (int64_t c = 0; c < ct; c += N) tile(src + r * ss + c, ss, dst + c * ds + r, ds);
  }
  transpose_scalar(src + ct, ss, dst + ct * ds, ds, rows, cols - ct);
  transpose_scalar(src + rt * ss, ss, dst + rt, ds, rows - rt, ct);
}
#endif

template <class In, class Out>
void transpose(const In* src, int64_t ss, Out* dst, int64_t ds, int64_t rows, int64_t cols) {
#ifdef __AVX2__
  if constexpr (std::is_same_v<In, uint8_t> && std::is_same_v<Out, uint8_t>) {
    return transpose_tiled<16>(src, ss, dst, ds, rows, cols, transpose16x16);
  } else if constexpr (std::is_same_v<In, float> && std::is_same_v<Out, float>) {
    return transpose_tiled<8>(src, ss, dst, ds, rows, cols, transpose8x8);
  }
#endif
  transpose_scalar(src, ss, dst, ds, rows, cols);
}

// ---------------------------------------------------------------------------------------------
// Sinks take finished strips of output rows, all channels at once. `Work* direct(c, y0)` is where
// channel c's rows can be written as they are (or null); `emit(y0, rows, strips, ws)` takes the
// other channels' rows x w strips, channel c at strips + c * rows_per_strip() * w.

// Non-temporal stores for outputs: they are written once and are far bigger than the caches, so
// skipping the read-for-ownership of each line saves memory bandwidth. Unaligned heads and tails
// use plain stores.
template <class Work>
inline void store_floats(float* dst, const Work* src, int64_t n) {
  int64_t i = 0;
#ifdef __AVX2__
  for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % 32 != 0; ++i) dst[i] = static_cast<float>(src[i]);
  for (; i + 8 <= n; i += 8) {
    __m256 v;
    if constexpr (std::is_same_v<Work, uint8_t>) {
      v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i))));
    } else {
      v = _mm256_loadu_ps(src + i);
    }
    _mm256_stream_ps(dst + i, v);
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void store_fence() {
#ifdef __AVX2__
  _mm_sfence();  // streamed stores are weakly ordered: publish them before the box counts as done
#endif
}

// crop_resize_torch's conversion: optionally round half away from zero, then clamp, then cast.
struct Quantize {
  bool on;
  float lo, hi;
};

template <class Work, class Out>
struct ImageSink {
  Out* data;
  int64_t channels, h, w;
  Quantize q;

  int64_t rows_per_strip() const { return kStrip; }

  Work* direct(int64_t c, int64_t y0) const {
    if constexpr (std::is_same_v<Work, Out>) {
      if (!q.on) return data + (c * h + y0) * w;
    }
    return nullptr;
  }

  void emit(int64_t y0, int64_t rows, const Work* strips, Workspace&) const {
    for (int64_t c = 0; c < channels; ++c) {
      if (direct(c, y0) == nullptr) convert(data + (c * h + y0) * w, strips + c * rows_per_strip() * w, rows * w);
    }
  }

  void convert(Out* dst, const Work* src, int64_t n) const {
    if constexpr (std::is_same_v<Out, float>) {
      if (!q.on) return store_floats(dst, src, n);
    }
    if constexpr (std::is_floating_point_v<Work>) {
      if (q.on) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const float v = src[i];
          const float r = v < 0.0f ? std::ceil(v - 0.5f) : std::floor(v + 0.5f);
          dst[i] = static_cast<Out>(std::min(std::max(r, q.lo), q.hi));
        }
        return;
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Out>(src[i]);
  }

  void finish() const { store_fence(); }
};

// dst[k * copy_stride + i] = table[src[i]] for i < n and each of `copies` copies.
inline void lookup(float* dst, int64_t copy_stride, int64_t copies, const uint8_t* src, const float* table,
                   int64_t n) {
#ifdef __AVX2__
  if (n >= 8) {
    auto eight = [&](int64_t i) {
      const __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)));
      const __m256 v = _mm256_i32gather_ps(table, index, 4);
      for (int64_t k = 0; k < copies; ++k) _mm256_storeu_ps(dst + k * copy_stride + i, v);
    };
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) eight(i);
    if (i < n) eight(n - 8);  // overlaps the previous eight with the same values
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float v = table[src[i]];
    for (int64_t k = 0; k < copies; ++k) dst[k * copy_stride + i] = v;
  }
}

// Qwen-VL patch rows of one image: rows over (merge block down, across, patch row, column in the
// block), columns over (channel, temporal copy, patch row, patch column).
struct PatchLayout {
  int64_t patch, merge, temporal, columns;
};

// display_levels: the DICOM linear window, as in patchify.py's _window. A box without a window has a
// NaN low (only uint8 boxes may: they are then shown as stored).
struct Window {
  float low, span;
  bool invert;

  bool given() const { return !std::isnan(low); }

  uint8_t level(float v) const {
    float s = (v - low) / span + 0.5f;
    s = std::isnan(s) ? 0.0f : std::min(std::max(s, 0.0f), 1.0f);
    if (invert) s = 1.0f - s;
    return static_cast<uint8_t>(std::nearbyint(s * 255.0f));  // half to even, like torch.round
  }
};

// Strips of whole patch rows become whole rows of pixel_values, each assembled in L1 and streamed
// out in order: no intermediate image, and each output line is written once.
template <class Work>
struct PatchSink {
  float* rows_out;   // this image's first patch row
  const float* lut;  // (3, 256): normalised value of each display level per channel
  int64_t channels, w;
  PatchLayout layout;
  Window window;

  int64_t rows_per_strip() const { return std::max<int64_t>(1, kStrip / layout.patch) * layout.patch; }

  Work* direct(int64_t, int64_t) const { return nullptr; }

  void emit(int64_t y0, int64_t rows, const Work* strips, Workspace& ws) const {
    const int64_t p = layout.patch, m = layout.merge, stride = rows_per_strip() * w;
    const uint8_t* levels = display_levels(strips, rows, ws);
    float* row = ws.get<float>(kRow, layout.columns);
    for (int64_t band = 0; band < rows / p; ++band) {
      const int64_t by = y0 / p + band, bh = by / m, mh = by % m;
      for (int64_t j = 0; j < w / p; ++j) {
        for (int64_t ch = 0; ch < 3; ++ch) {
          // One channel is shown as three, each normalised with its own statistics.
          const uint8_t* lv = levels + (channels == 1 ? 0 : ch) * stride + band * p * w + j * p;
          patch(row + ch * layout.temporal * p * p, lv, lut + ch * 256);
        }
        const int64_t index = ((bh * (w / (p * m)) + j / m) * m + mh) * m + j % m;
        store_floats(rows_out + index * layout.columns, row, layout.columns);
      }
    }
  }

  // uint8 results are display levels already unless the box has a window (a re-windowed 8-bit
  // X-ray); full-depth values always go through the window.
  const uint8_t* display_levels(const Work* strips, int64_t rows, Workspace& ws) const {
    if constexpr (std::is_same_v<Work, uint8_t>) {
      if (!window.given()) return strips;
    }
    const int64_t stride = rows_per_strip() * w;
    uint8_t* levels = ws.get<uint8_t>(kLevels, channels * stride);
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t i = 0; i < rows * w; ++i) levels[c * stride + i] = window.level(static_cast<float>(strips[c * stride + i]));
    }
    return levels;
  }

  // One channel of one patch in all T temporal copies: dst[t][py][px] = table[lv[py * w + px]].
  void patch(float* dst, const uint8_t* lv, const float* table) const {
    const int64_t p = layout.patch, width = w;  // locals: stores through dst may alias members
    for (int64_t py = 0; py < p; ++py) lookup(dst + py * p, p * p, layout.temporal, lv + py * width, table, p);
  }

  void finish() const { store_fence(); }
};

// ---------------------------------------------------------------------------------------------
// One box, all channels, in either pass order.

template <class W>
using WorkOf = std::conditional_t<std::is_same_v<W, int32_t>, uint8_t, float>;

// Inputs of every box, checked and unpacked once before the parallel loop.
struct Batch {
  std::vector<const void*> data;  // per box: its image's first element
  std::vector<int64_t> channels, height, width, out_h, out_w, span_x, span_y;
  std::vector<bool> vertical_first;
  std::vector<at::ScalarType> dtype;
  PlanTaps taps;
  int64_t n;
};

// What the pass drivers need of one box.
template <class W, class In>
struct BoxInput {
  const In* image;  // channel 0 at the box's span: (ay.lo, ax.lo)
  int64_t channels, stride, plane;
  Axis<W> ax, ay;

  const In* channel(int64_t c) const { return image + c * plane; }
};

// Vertical pass first, strip by strip of output rows: per channel, source rows -> A (strip x Sx)
// -> AT (Sx x strip) -> horizontal pass B (w x strip) -> transposed into the sink.
template <class W, class In, class Sink>
void vertical_first(const BoxInput<W, In>& box, const Sink& sink, Workspace& ws) {
  using Work = WorkOf<W>;
  const int64_t sx = box.ax.span(), h = box.ay.out, w = box.ax.out, rows = sink.rows_per_strip();
  Work* a = ws.get<Work>(kA, rows * sx);
  Work* at = ws.get<Work>(kAT, rows * sx);
  Work* b = ws.get<Work>(kB, rows * w);
  Work* strips = ws.get<Work>(kStrips, box.channels * rows * w);
  for (int64_t y0 = 0; y0 < h; y0 += rows) {
    const int64_t r = std::min(rows, h - y0);
    for (int64_t c = 0; c < box.channels; ++c) {
      combine(box.channel(c), box.stride, sx, box.ay, y0, y0 + r, a, sx);
      transpose(a, sx, at, r, r, sx);
      combine(at, r, r, box.ax, 0, w, b, r);
      Work* out = sink.direct(c, y0);
      transpose(b, r, out ? out : strips + c * rows * w, w, w, r);
    }
    sink.emit(y0, r, strips, ws);
  }
}

// Horizontal pass first, strip by strip of source rows into T (Sy x w per channel), then the
// vertical pass over T, strip by strip of output rows, into the sink.
template <class W, class In, class Sink>
void horizontal_first(const BoxInput<W, In>& box, const Sink& sink, Workspace& ws) {
  using Work = WorkOf<W>;
  const int64_t sx = box.ax.span(), sy = box.ay.span(), h = box.ay.out, w = box.ax.out;
  const int64_t rows = sink.rows_per_strip();
  Work* at = ws.get<Work>(kAT, kStrip * sx);
  Work* b = ws.get<Work>(kB, kStrip * w);
  Work* t = ws.get<Work>(kT, box.channels * sy * w);
  Work* strips = ws.get<Work>(kStrips, box.channels * rows * w);
  for (int64_t c = 0; c < box.channels; ++c) {
    for (int64_t r0 = 0; r0 < sy; r0 += kStrip) {
      const int64_t r = std::min(kStrip, sy - r0);
      transpose(box.channel(c) + r0 * box.stride, box.stride, at, r, r, sx);
      combine(at, r, r, box.ax, 0, w, b, r);
      transpose(b, r, t + (c * sy + r0) * w, w, w, r);
    }
  }
  for (int64_t y0 = 0; y0 < h; y0 += rows) {
    const int64_t r = std::min(rows, h - y0);
    for (int64_t c = 0; c < box.channels; ++c) {
      Work* out = sink.direct(c, y0);
      combine(t + c * sy * w, w, w, box.ay, y0, y0 + r, out ? out : strips + c * rows * w, w);
    }
    sink.emit(y0, r, strips, ws);
  }
}

// Both passes over every channel of box i.
template <class W, class In, class Sink>
void resample_box(const Batch& batch, int64_t i, const Sink& sink) {
  Workspace& ws = workspace();
  const Axis<W> ax = prepare_axis<W>(batch.taps, i, batch.out_w[i], ws, kFirstX);
  const Axis<W> ay = prepare_axis<W>(batch.taps, batch.n + i, batch.out_h[i], ws, kFirstY);
  const int64_t stride = batch.width[i];
  const BoxInput<W, In> box{static_cast<const In*>(batch.data[i]) + ay.lo * stride + ax.lo, batch.channels[i],
                            stride, batch.height[i] * stride, ax, ay};
  if (batch.vertical_first[i]) {
    vertical_first(box, sink, ws);
  } else {
    horizontal_first(box, sink, ws);
  }
  sink.finish();
}

// Calls f with a value of the C++ type of a supported dtype.
template <class F>
void with_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kByte:
      return f(uint8_t{});
    case at::kUInt16:
      return f(uint16_t{});
    case at::kShort:
      return f(int16_t{});
    case at::kFloat:
      return f(float{});
    default:
      TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

// Boxes from the most work to the least, so the dynamic schedule ends with small ones.
std::vector<int64_t> by_cost(const Batch& batch) {
  std::vector<int64_t> order(batch.n);
  std::iota(order.begin(), order.end(), 0);
  std::vector<int64_t> cost(batch.n);
  for (int64_t i = 0; i < batch.n; ++i) {
    cost[i] = batch.channels[i] * (batch.span_x[i] + batch.out_w[i]) * (batch.span_y[i] + batch.out_h[i]);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// Runs box(i) for every box in parallel; an exception in any box is rethrown after the loop.
template <class F>
void for_each_box(const Batch& batch, F&& box) {
  const std::vector<int64_t> order = by_cost(batch);
  std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::max(1, at::get_num_threads()))
  for (int64_t k = 0; k < batch.n; ++k) {
    try {
      box(order[k]);
    } catch (...) {
#pragma omp critical
      error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

Batch unpack(const std::vector<at::Tensor>& images, const at::Tensor& image_index, const at::Tensor& sizes,
             const at::Tensor& first, const at::Tensor& count, const at::Tensor& weights,
             const at::Tensor& vertical_first) {
  const int64_t n = image_index.size(0);
  TORCH_CHECK(first.dim() == 2 && first.size(0) == 2 * n && count.sizes() == first.sizes(), "bad tap shapes");
  TORCH_CHECK(weights.dim() == 3 && weights.size(0) == 2 * n && weights.size(1) == first.size(1), "bad tap weights");
  TORCH_CHECK(first.scalar_type() == at::kLong && count.scalar_type() == at::kLong, "taps must be int64");
  TORCH_CHECK(weights.scalar_type() == at::kDouble, "tap weights must be float64");
  TORCH_CHECK(first.is_contiguous() && count.is_contiguous() && weights.is_contiguous(), "taps must be contiguous");
  Batch batch;
  batch.n = n;
  batch.taps = PlanTaps{first.data_ptr<int64_t>(), count.data_ptr<int64_t>(), weights.data_ptr<double>(),
                        first.size(1), weights.size(2)};
  const auto which = image_index.contiguous().to(at::kLong);
  const auto hw = sizes.contiguous().to(at::kLong);
  const auto order = vertical_first.contiguous().to(at::kBool);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = which.data_ptr<int64_t>()[i];
    TORCH_CHECK(j >= 0 && j < static_cast<int64_t>(images.size()), "image index out of range");
    const at::Tensor& im = images[j];
    TORCH_CHECK(im.device().is_cpu() && im.dim() == 3 && im.is_contiguous(), "images must be contiguous CPU (C, H, W)");
    batch.data.push_back(im.const_data_ptr());
    batch.dtype.push_back(im.scalar_type());
    batch.channels.push_back(im.size(0));
    batch.height.push_back(im.size(1));
    batch.width.push_back(im.size(2));
    batch.out_h.push_back(hw.data_ptr<int64_t>()[2 * i]);
    batch.out_w.push_back(hw.data_ptr<int64_t>()[2 * i + 1]);
    batch.vertical_first.push_back(order.data_ptr<bool>()[i]);
    TORCH_CHECK(batch.out_h[i] <= batch.taps.o && batch.out_w[i] <= batch.taps.o, "box ", i,
                ": more outputs than taps");
    const auto [x0, x1] = tap_span(batch.taps, i, batch.out_w[i]);
    const auto [y0, y1] = tap_span(batch.taps, n + i, batch.out_h[i]);
    TORCH_CHECK(x1 <= im.size(2) && y1 <= im.size(1), "box ", i, ": taps read outside its image");
    batch.span_x.push_back(x1 - x0);
    batch.span_y.push_back(y1 - y0);
  }
  return batch;
}

// crop_resize_torch's output conversion for values of a `source` box stored as `out`.
Quantize quantize_for(at::ScalarType source, at::ScalarType out) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  Quantize q{false, -inf, inf};
  auto narrow = [&q](at::ScalarType t) {
    if (t == at::kUInt16) q = Quantize{true, std::max(q.lo, 0.0f), std::min(q.hi, 65535.0f)};
    if (t == at::kShort) q = Quantize{true, std::max(q.lo, -32768.0f), std::min(q.hi, 32767.0f)};
    if (t == at::kByte) q = Quantize{true, std::max(q.lo, 0.0f), std::min(q.hi, 255.0f)};
  };
  narrow(source);  // 16-bit results are rounded and clamped to their own range first
  if (source != out) narrow(out);
  return q;
}

std::vector<at::Tensor> crop_resize(const std::vector<at::Tensor>& images, const at::Tensor& image_index,
                                    const at::Tensor& sizes, const at::Tensor& first, const at::Tensor& count,
                                    const at::Tensor& weights, const at::Tensor& vertical_first,
                                    const std::vector<at::ScalarType>& out_dtypes) {
  const Batch batch = unpack(images, image_index, sizes, first, count, weights, vertical_first);
  TORCH_CHECK(static_cast<int64_t>(out_dtypes.size()) == batch.n, "one output dtype per box");
  std::vector<at::Tensor> outs;
  outs.reserve(batch.n);
  for (int64_t i = 0; i < batch.n; ++i) {
    with_type(out_dtypes[i], [](auto) {});  // rejects unsupported output types before the parallel loop
    outs.push_back(at::empty({batch.channels[i], batch.out_h[i], batch.out_w[i]}, at::TensorOptions(out_dtypes[i])));
  }
  for_each_box(batch, [&](int64_t i) {
    with_type(batch.dtype[i], [&](auto in_tag) {
      using In = decltype(in_tag);
      using W = std::conditional_t<std::is_same_v<In, uint8_t>, int32_t, float>;
      with_type(outs[i].scalar_type(), [&](auto out_tag) {
        using Out = decltype(out_tag);
        // uint8 results are levels that every supported output type holds exactly.
        const Quantize q = std::is_same_v<In, uint8_t> ? Quantize{false, 0.0f, 0.0f}
                                                        : quantize_for(batch.dtype[i], outs[i].scalar_type());
        const ImageSink<WorkOf<W>, Out> sink{outs[i].data_ptr<Out>(), batch.channels[i], batch.out_h[i],
                                             batch.out_w[i], q};
        resample_box<W, In>(batch, i, sink);
      });
    });
  });
  return outs;
}

// Patch rows of every box into one (rows, 3 * T * P * P) float32 tensor; row_offsets (N + 1,).
at::Tensor crop_patchify(const std::vector<at::Tensor>& images, const at::Tensor& image_index,
                         const at::Tensor& sizes, const at::Tensor& first, const at::Tensor& count,
                         const at::Tensor& weights, const at::Tensor& vertical_first, at::Tensor pixel_values,
                         const at::Tensor& row_offsets, const at::Tensor& lut, const at::Tensor& window_low,
                         const at::Tensor& window_span, const at::Tensor& invert, int64_t patch, int64_t merge,
                         int64_t temporal) {
  const Batch batch = unpack(images, image_index, sizes, first, count, weights, vertical_first);
  const PatchLayout layout{patch, merge, temporal, 3 * temporal * patch * patch};
  TORCH_CHECK(pixel_values.scalar_type() == at::kFloat && pixel_values.is_contiguous() && pixel_values.dim() == 2 &&
                  pixel_values.size(1) == layout.columns,
              "pixel_values must be contiguous float32 (rows, 3 * T * P * P)");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.is_contiguous() && lut.numel() == 3 * 256, "lut must be (3, 256)");
  const auto offsets = row_offsets.contiguous().to(at::kLong);
  const auto low = window_low.contiguous().to(at::kFloat);
  const auto span = window_span.contiguous().to(at::kFloat);
  const auto flip = invert.contiguous().to(at::kBool);
  for (int64_t i = 0; i < batch.n; ++i) {
    TORCH_CHECK(batch.out_h[i] % (patch * merge) == 0 && batch.out_w[i] % (patch * merge) == 0,
                "box ", i, " output is not a multiple of patch * merge");
    const int64_t need = batch.out_h[i] / patch * (batch.out_w[i] / patch);
    TORCH_CHECK(offsets.data_ptr<int64_t>()[i + 1] - offsets.data_ptr<int64_t>()[i] == need, "bad row offsets");
  }
  TORCH_CHECK(offsets.data_ptr<int64_t>()[batch.n] <= pixel_values.size(0), "pixel_values has too few rows");
  float* pv = pixel_values.data_ptr<float>();
  for_each_box(batch, [&](int64_t i) {
    with_type(batch.dtype[i], [&](auto in_tag) {
      using In = decltype(in_tag);
      using W = std::conditional_t<std::is_same_v<In, uint8_t>, int32_t, float>;
      const PatchSink<WorkOf<W>> sink{pv + offsets.data_ptr<int64_t>()[i] * layout.columns,
                                      lut.data_ptr<float>(),
                                      batch.channels[i],
                                      batch.out_w[i],
                                      layout,
                                      Window{low.data_ptr<float>()[i], span.data_ptr<float>()[i],
                                             flip.data_ptr<bool>()[i]}};
      resample_box<W, In>(batch, i, sink);
    });
  });
  return pixel_values;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("crop_resize", &crop_resize, "Resample every box of a plan; one tensor per box",
        py::call_guard<py::gil_scoped_release>());
  m.def("crop_patchify", &crop_patchify, "Resample every box of a plan into Qwen-VL patch rows",
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "storage_users", [](const at::Tensor& t) { return t.storage().use_count(); },
      "How many tensors (views included) share t's storage");
}
