// Linear layers over packed integer weights: y = (x @ q^T) * scale + bias, with fp32 activations,
// integer weights (int8, or int4 two per byte) and one fp32 scale per output channel.
//
//   int_linear         dense int8 [N, K] or int4 [N, ceil(K/2)] (low nibble = even column)
//   sparse_int_linear  compressed rows: row_ptr int64 [N+1], col uint16 (stored as int16, used
//                      when K <= 65536) or int32 [nnz], values int8 [nnz]
//
// Paths. Batch 1 reads each weight once and is bound by memory bandwidth: a row-parallel GEMV
// (gathers of x for the sparse layout). Larger batches: the sparse kernel walks each row's non-zeros
// once per tile of 64 batch columns, with x transposed so that one non-zero feeds 64 FMAs from a
// contiguous line; dense int8 dequantizes a band of rows into fp32 and multiplies it with at::mm.
// AVX-512 paths are picked at run time when the CPU has AVX-512F/BW/VL; every other x86-64 (and
// other architectures) runs the portable loops, which GCC vectorises (AVX2 clone where available).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "epilogue.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>

#ifndef LC_DENSE_ROWS
#define LC_DENSE_ROWS 8
#endif

namespace lightning_compress {
namespace {

constexpr int64_t kBatchTile = 64;  // batch columns per pass over a sparse row
constexpr int64_t kDenseGemvMaxBatch = 16;
constexpr int64_t kGatherMaxBatch = 2;  // batches up to this size gather x per non-zero

inline int8_t nibble(uint8_t byte, int64_t k) {
  const int v = (k & 1) ? (byte >> 4) : (byte & 0xF);
  return static_cast<int8_t>((v ^ 8) - 8);
}

// ---- portable kernels ---------------------------------------------------------------------------

template <typename Idx>
LC_SIMD_CLONES float sparse_row_dot(const float* __restrict__ x, const Idx* __restrict__ col,
                                    const int8_t* __restrict__ val, int64_t begin, int64_t end) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = begin; j < end; ++j) {
    sum += static_cast<float>(val[j]) * x[col_at(col, j)];
  }
  return sum;
}

template <typename Idx>
LC_SIMD_CLONES void sparse_row_tile(const float* __restrict__ xt, int64_t ldx, int64_t bt,
                                    const Idx* __restrict__ col, const int8_t* __restrict__ val,
                                    int64_t begin, int64_t end, float* __restrict__ acc) {
  for (int64_t b = 0; b < bt; ++b) acc[b] = 0.0f;
  for (int64_t j = begin; j < end; ++j) {
    const float v = static_cast<float>(val[j]);
    const float* __restrict__ row = xt + col_at(col, j) * ldx;
#pragma omp simd
    for (int64_t b = 0; b < bt; ++b) acc[b] += v * row[b];
  }
}

LC_SIMD_CLONES float dense_row_dot_i8(const float* __restrict__ x, const int8_t* __restrict__ w,
                                      int64_t k) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < k; ++i) sum += static_cast<float>(w[i]) * x[i];
  return sum;
}

LC_SIMD_CLONES float dense_row_dot_i4(const float* __restrict__ x, const uint8_t* __restrict__ w,
                                      int64_t k) {
  float sum = 0.0f;
  const int64_t pairs = k / 2;
#pragma omp simd reduction(+ : sum)
  for (int64_t p = 0; p < pairs; ++p) {
    const int lo = ((w[p] & 0xF) ^ 8) - 8;
    const int hi = ((w[p] >> 4) ^ 8) - 8;
    sum += static_cast<float>(lo) * x[2 * p] + static_cast<float>(hi) * x[2 * p + 1];
  }
  if (k & 1) sum += static_cast<float>(nibble(w[pairs], 0)) * x[k - 1];
  return sum;
}

LC_SIMD_CLONES void dequant_row_i8(const int8_t* __restrict__ w, float s, int64_t k,
                                   float* __restrict__ out) {
  for (int64_t i = 0; i < k; ++i) out[i] = static_cast<float>(w[i]) * s;
}

LC_SIMD_CLONES void dequant_row_i4(const uint8_t* __restrict__ w, float s, int64_t k,
                                   float* __restrict__ out) {
  for (int64_t i = 0; i < k; ++i) out[i] = static_cast<float>(nibble(w[i >> 1], i)) * s;
}

// ---- AVX-512 kernels ----------------------------------------------------------------------------
#ifdef LC_X86

template <typename Idx>
LC_AVX512 inline __m512i load_cols(const Idx* col, int64_t j, __mmask16 m) {
  if constexpr (std::is_same_v<Idx, int16_t>) {
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, col + j));
  } else {
    return _mm512_maskz_loadu_epi32(m, col + j);
  }
}

LC_AVX512 inline __m512 load_vals(const int8_t* val, int64_t j, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, val + j)));
}

template <typename Idx>
LC_AVX512 float sparse_row_dot_avx512(const float* x, const Idx* col, const int8_t* val,
                                      int64_t begin, int64_t end) {
  constexpr int64_t kAhead = 1024;  // non-zeros prefetched ahead in the col/value streams
  __m512 acc0 = _mm512_setzero_ps();
  __m512 acc1 = _mm512_setzero_ps();
  const __mmask16 all = 0xFFFF;
  int64_t j = begin;
  for (; j + 32 <= end; j += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(col + j + kAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(col + j + kAhead + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(val + j + kAhead), _MM_HINT_T0);
    const __m512 g0 = _mm512_i32gather_ps(load_cols(col, j, all), x, 4);
    const __m512 g1 = _mm512_i32gather_ps(load_cols(col, j + 16, all), x, 4);
    acc0 = _mm512_fmadd_ps(load_vals(val, j, all), g0, acc0);
    acc1 = _mm512_fmadd_ps(load_vals(val, j + 16, all), g1, acc1);
  }
  for (; j < end; j += 16) {
    const int64_t left = std::min<int64_t>(16, end - j);
    const __mmask16 m = static_cast<__mmask16>((1u << left) - 1u);
    const __m512 g =
        _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, load_cols(col, j, m), x, 4);
    acc0 = _mm512_fmadd_ps(load_vals(val, j, m), g, acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// One row against 16 * V batch columns of transposed x ([K, 16 * V], zero-padded: a non-zero's
// batch values fill whole vectors). The row's values are widened to fp32 and its columns turned
// into offsets 16 at a time, so the inner loop is one broadcast, one offset load and V FMAs with a
// memory operand per non-zero. U non-zeros are in flight at once, each with its own accumulators,
// so that the FMA latency does not serialise the loop.
template <typename Idx, int V, int U>
LC_AVX512 void sparse_row_tile_avx512(const float* xt, const Idx* col, const int8_t* val,
                                      int64_t begin, int64_t end, float* out) {
  constexpr int64_t kChunk = 512;
  constexpr int32_t kLd = 16 * V;
  alignas(64) float wbuf[kChunk];
  alignas(64) int32_t obuf[kChunk];
  __m512 acc[U][V];
  for (int u = 0; u < U; ++u) {
    for (int v = 0; v < V; ++v) acc[u][v] = _mm512_setzero_ps();
  }
  const __m512i ld = _mm512_set1_epi32(kLd);
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t len = std::min(kChunk, end - c0);
    for (int64_t i = 0; i < len; i += 16) {
      const int64_t left = std::min<int64_t>(16, len - i);
      const __mmask16 m = static_cast<__mmask16>(left == 16 ? 0xFFFFu : (1u << left) - 1u);
      _mm512_store_ps(wbuf + i, load_vals(val, c0 + i, m));
      _mm512_store_si512(obuf + i, _mm512_mullo_epi32(load_cols(col, c0 + i, m), ld));
    }
    int64_t j = 0;
    for (; j + U <= len; j += U) {
      for (int u = 0; u < U; ++u) {
        const __m512 w = _mm512_set1_ps(wbuf[j + u]);
        const float* row = xt + obuf[j + u];
        for (int v = 0; v < V; ++v) {
          acc[u][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(row + 16 * v), acc[u][v]);
        }
      }
    }
    for (; j < len; ++j) {
      const __m512 w = _mm512_set1_ps(wbuf[j]);
      const float* row = xt + obuf[j];
      for (int v = 0; v < V; ++v) {
        acc[0][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(row + 16 * v), acc[0][v]);
      }
    }
  }
  for (int v = 0; v < V; ++v) {
    for (int u = 1; u < U; ++u) acc[0][v] = _mm512_add_ps(acc[0][v], acc[u][v]);
    _mm512_storeu_ps(out + 16 * v, acc[0][v]);
  }
}

// Dot products of R int8 rows with NB rows of x: each weight vector is widened once and feeds NB
// FMAs, each x vector feeds R.
template <int R, int NB>
LC_AVX512 void dense_rows_i8_avx512(const float* x, int64_t ldx, const int8_t* w, int64_t ldw,
                                    int64_t k, float* out, int64_t ldo) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  }
  // Whole 64-byte lines of every row per step, unmasked; the tail below.
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    for (int64_t h = i; h < i + 64; h += 16) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r) {
        wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ldw + h))));
      }
      for (int b = 0; b < NB; ++b) {
        const __m512 xv = _mm512_loadu_ps(x + b * ldx + h);
        for (int r = 0; r < R; ++r) acc[r][b] = _mm512_fmadd_ps(wv[r], xv, acc[r][b]);
      }
    }
  }
  for (; i < k; i += 16) {
    const int64_t left = std::min<int64_t>(16, k - i);
    const __mmask16 m = static_cast<__mmask16>(left == 16 ? 0xFFFFu : (1u << left) - 1u);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_vals(w + r * ldw, i, m);
    for (int b = 0; b < NB; ++b) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + b * ldx + i);
      for (int r = 0; r < R; ++r) acc[r][b] = _mm512_fmadd_ps(wv[r], xv, acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < NB; ++b) out[b * ldo + r] = _mm512_reduce_add_ps(acc[r][b]);
  }
}

#endif  // LC_X86

// ---- dispatch -----------------------------------------------------------------------------------

template <typename Idx>
float sparse_dot(const float* x, const Idx* col, const int8_t* val, int64_t begin, int64_t end) {
#ifdef LC_X86
  if (cpu_has_avx512()) return sparse_row_dot_avx512(x, col, val, begin, end);
#endif
  return sparse_row_dot(x, col, val, begin, end);
}

// Rows [r0, r1) of the output (before scale and bias) for one tile of batch columns, row r at
// out + (r - r0) * ldx;
// x tile transposed: [K, ldx], ldx a multiple of 16, columns past bt zero.
template <typename Idx>
void sparse_rows_tile(const float* xt, int64_t ldx, int64_t bt, const int64_t* rp, const Idx* col,
                      const int8_t* val, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    float* acc = out + (r - r0) * ldx;
    const int64_t b = rp[r], e = rp[r + 1];
#ifdef LC_X86
    if (cpu_has_avx512()) {
      switch (ldx / 16) {
        case 1: sparse_row_tile_avx512<Idx, 1, 4>(xt, col, val, b, e, acc); continue;
        case 2: sparse_row_tile_avx512<Idx, 2, 4>(xt, col, val, b, e, acc); continue;
        case 3: sparse_row_tile_avx512<Idx, 3, 2>(xt, col, val, b, e, acc); continue;
        default: sparse_row_tile_avx512<Idx, 4, 2>(xt, col, val, b, e, acc); continue;
      }
    }
#endif
    sparse_row_tile(xt, ldx, bt, col, val, b, e, acc);
  }
}

template <typename Idx>
void sparse_linear_impl(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_t,
                        const at::Tensor& values, const Epilogue& ep, at::Tensor& y) {
  constexpr int64_t kRowBlock = 64;  // rows whose tile results are staged before the store
  const int64_t batch = x.size(0);
  const int64_t k = x.size(1);
  const int64_t n = y.size(1);
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const Idx* col = col_t.data_ptr<Idx>();
  const int8_t* val = values.data_ptr<int8_t>();
  const float* xp = x.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const int64_t nnz = row_ptr.numel() ? rp[n] : 0;
  // About 32K multiply-adds per task at least: tiny layers stay on one thread.
  const int64_t grain = std::max<int64_t>(1, n * 32768 / std::max<int64_t>(nnz * batch, 1));
  if (batch <= kGatherMaxBatch) {
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t b = 0; b < batch; ++b) {
          out[b * n + r] = ep(r, sparse_dot(xp + b * k, col, val, rp[r], rp[r + 1]));
        }
      }
    });
    return;
  }
  const int64_t ld_max = std::min(kBatchTile, (batch + 15) / 16 * 16);
  at::Tensor xt_t = at::empty({k, ld_max}, x.options());
  float* xt = xt_t.data_ptr<float>();
  for (int64_t b0 = 0; b0 < batch; b0 += kBatchTile) {
    const int64_t bt = std::min(kBatchTile, batch - b0);
    // x tile transposed, [K, ldx]: a non-zero's batch values side by side, zero-padded to whole
    // vectors.
    const int64_t ldx = (bt + 15) / 16 * 16;
    at::parallel_for(0, k, 256, [&](int64_t k0, int64_t k1) {
      for (int64_t kk = k0; kk < k1; ++kk) {
        float* dst = xt + kk * ldx;
        for (int64_t b = 0; b < bt; ++b) dst[b] = xp[(b0 + b) * k + kk];
        for (int64_t b = bt; b < ldx; ++b) dst[b] = 0.0f;
      }
    });
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      // Staged per block of rows, then stored batch row by batch row: runs of contiguous
      // outputs instead of a store per page when N is large.
      alignas(64) float stage[kRowBlock * kBatchTile];
      for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
        const int64_t re = std::min(r1, rb + kRowBlock);
        sparse_rows_tile(xt, ldx, bt, rp, col, val, rb, re, stage);
        for (int64_t b = 0; b < bt; ++b) {
          float* dst = out + (b0 + b) * n;
          for (int64_t r = rb; r < re; ++r) dst[r] = ep(r, stage[(r - rb) * ldx + b]);
        }
      }
    });
  }
}

void check_act(const char* op, double act_scale, int64_t zero_point, int64_t qmax) {
  TORCH_CHECK(act_scale >= 0.0, op, ": `act_scale` must be >= 0 (0: float outputs), got ",
              act_scale);
  TORCH_CHECK(act_scale == 0.0 || (qmax > 0 && zero_point >= 0 && zero_point <= qmax), op,
              ": activation zero point ", zero_point, " must lie in [0, ", qmax, "]");
}

void check_common(const char* op, const at::Tensor& x, const at::Tensor& scale,
                  const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": `x` must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": `x` must be 2-D [batch, in_features], got ", x.dim(), "-D");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.numel() == n, op,
              ": `scale` must be float32 of shape [", n, "], got ", scale.scalar_type(), " ",
              scale.sizes());
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->numel() == n, op,
                ": `bias` must be float32 of shape [", n, "], got ", bias->scalar_type(), " ",
                bias->sizes());
  }
}

}  // namespace

at::Tensor sparse_int_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr,
                                 const at::Tensor& col, const at::Tensor& values,
                                 const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                                 int64_t in_features, double act_scale, int64_t act_zero_point,
                                 int64_t act_qmax) {
  const char* op = "sparse_int_linear";
  check_act(op, act_scale, act_zero_point, act_qmax);
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.numel() >= 1, op,
              ": `row_ptr` must be 1-D int64 with N+1 entries");
  const int64_t n = row_ptr.numel() - 1;
  check_common(op, x, scale, bias, n);
  TORCH_CHECK(x.size(1) == in_features, op, ": `x` has ", x.size(1), " features, the layer ",
              in_features);
  TORCH_CHECK(values.scalar_type() == at::kChar && values.dim() == 1, op,
              ": `values` must be 1-D int8, got ", values.scalar_type());
  TORCH_CHECK(col.dim() == 1 && col.numel() == values.numel(), op,
              ": `col` must be 1-D with one entry per value");
  const bool narrow = col.scalar_type() == at::kShort;
  TORCH_CHECK(narrow || col.scalar_type() == at::kInt, op,
              ": `col` must be int16 (read as uint16) or int32, got ", col.scalar_type());
  TORCH_CHECK(!narrow || in_features <= 65536, op, ": int16 columns need in_features <= 65536");
  const at::Tensor rp = row_ptr.contiguous();
  const int64_t* rpp = rp.data_ptr<int64_t>();
  TORCH_CHECK(rpp[0] == 0 && rpp[n] == values.numel(), op, ": `row_ptr` must run from 0 to nnz=",
              values.numel(), ", got ", rpp[0], "..", rpp[n]);
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(rpp[r] <= rpp[r + 1], op, ": `row_ptr` decreases at row ", r);
  }
  // Column indices are not range-checked here (a pass over them per call would cost as much as
  // the product): the layout builder, lightning_compress.ops.sparse_layout, validates them once.
  const at::Tensor c = col.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = scale.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional(bias->contiguous()) : std::nullopt;
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0 || n == 0) return y;
  const Epilogue ep = epilogue(sc, bc, act_scale, act_zero_point, act_qmax);
  if (narrow) {
    sparse_linear_impl<int16_t>(xc, rp, c, values.contiguous(), ep, y);
  } else {
    sparse_linear_impl<int32_t>(xc, rp, c, values.contiguous(), ep, y);
  }
  return y;
}

at::Tensor int_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                          const std::optional<at::Tensor>& bias, int64_t bits, double act_scale,
                          int64_t act_zero_point, int64_t act_qmax) {
  const char* op = "int_linear";
  check_act(op, act_scale, act_zero_point, act_qmax);
  TORCH_CHECK(bits == 8 || bits == 4, op, ": `bits` must be 8 or 4, got ", bits);
  TORCH_CHECK(qweight.dim() == 2, op, ": `qweight` must be 2-D, got ", qweight.dim(), "-D");
  const int64_t n = qweight.size(0);
  check_common(op, x, scale, bias, n);
  const int64_t k = x.size(1);
  if (bits == 8) {
    TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.size(1) == k, op,
                ": 8-bit `qweight` must be int8 [N, ", k, "], got ", qweight.scalar_type(), " ",
                qweight.sizes());
  } else {
    TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.size(1) == (k + 1) / 2, op,
                ": 4-bit `qweight` must be uint8 [N, ", (k + 1) / 2, "], got ",
                qweight.scalar_type(), " ", qweight.sizes());
  }
  const at::Tensor w = qweight.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = scale.contiguous();
  const float* s = sc.data_ptr<float>();
  const std::optional<at::Tensor> bc = bias ? std::optional(bias->contiguous()) : std::nullopt;
  const float* bp = bc ? bc->data_ptr<float>() : nullptr;
  const Epilogue ep = epilogue(sc, bc, act_scale, act_zero_point, act_qmax);
  const int64_t batch = x.size(0);
  at::Tensor y = at::empty({batch, n}, x.options());
  if (batch == 0 || n == 0) return y;
  float* out = y.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  const int64_t ldw = w.size(1);
  if (batch <= kDenseGemvMaxBatch) {
    const int64_t grain = std::max<int64_t>(4, 65536 / std::max<int64_t>(k * batch, 1));
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      int64_t r = r0;
#ifdef LC_X86
      if (bits == 8 && cpu_has_avx512()) {
        constexpr int kRows = LC_DENSE_ROWS;
        const int8_t* wp = w.data_ptr<int8_t>();
        for (; r + kRows <= r1; r += kRows) {
          int64_t b = 0;
          for (; b + 4 <= batch; b += 4) {
            dense_rows_i8_avx512<kRows, 4>(xp + b * k, k, wp + r * ldw, ldw, k, out + b * n + r, n);
          }
          for (; b < batch; ++b) {
            dense_rows_i8_avx512<kRows, 1>(xp + b * k, k, wp + r * ldw, ldw, k, out + b * n + r, n);
          }
          for (b = 0; b < batch; ++b) {
            for (int q = 0; q < kRows; ++q) {
              out[b * n + r + q] = ep(r + q, out[b * n + r + q]);
            }
          }
        }
      }
#endif
      for (; r < r1; ++r) {
        for (int64_t b = 0; b < batch; ++b) {
          const float dot = bits == 8
                                ? dense_row_dot_i8(xp + b * k, w.data_ptr<int8_t>() + r * ldw, k)
                                : dense_row_dot_i4(xp + b * k, w.data_ptr<uint8_t>() + r * ldw, k);
          out[b * n + r] = ep(r, dot);
        }
      }
    });
    return y;
  }
  // Larger batches: dequantize bands of rows (a few MB of fp32) and let at::mm multiply them.
  const int64_t band = std::max<int64_t>(16, (int64_t{1} << 21) / std::max<int64_t>(k, 1));
  at::Tensor deq = at::empty({std::min(band, n), k}, x.options());
  for (int64_t r0 = 0; r0 < n; r0 += band) {
    const int64_t rows = std::min(band, n - r0);
    float* d = deq.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t a, int64_t e) {
      for (int64_t r = a; r < e; ++r) {
        if (bits == 8) {
          dequant_row_i8(w.data_ptr<int8_t>() + (r0 + r) * ldw, s[r0 + r], k, d + r * k);
        } else {
          dequant_row_i4(w.data_ptr<uint8_t>() + (r0 + r) * ldw, s[r0 + r], k, d + r * k);
        }
      }
    });
    at::Tensor part = y.narrow(1, r0, rows);
    at::Tensor band_out = at::mm(xc, deq.narrow(0, 0, rows).t());
    if (bp) band_out.add_(bc->narrow(0, r0, rows));
    part.copy_(band_out);
  }
  if (act_scale > 0.0) {
    return at::fake_quantize_per_tensor_affine(y, act_scale, act_zero_point, 0, act_qmax);
  }
  return y;
}

TORCH_LIBRARY_IMPL(lightning_compress, CPU, m) {
  m.impl("sparse_int_linear", &sparse_int_linear_cpu);
  m.impl("int_linear", &int_linear_cpu);
}

}  // namespace lightning_compress
