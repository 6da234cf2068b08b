// Sparse linear layers over shared weights (Deep Compression's weight sharing): every non-zero of
// row r is one of its group's centroids, y = x @ W^T + bias with W[r, col[j]] =
// codebook[r / group_rows, index j], float32 activations in and out.
//
//   lut_sparse_linear  compressed rows: row_ptr int64 [N+1], col uint16 (stored as int16, used
//                      when K <= 65536) or int32 [nnz], idx uint8: two indices per byte (low
//                      nibble = the even non-zero j of the whole stream) when the codebook has
//                      at most 16 centroids, else one per byte; codebook float32
//                      [ceil(N / group_rows), C], C = 2^bits, bits 1..8.
//
// The lookup happens in registers: with C <= 16 the whole codebook is one AVX-512 register and
// one `vpermps` turns 16 indices into 16 weights; C = 32 is one `vpermi2ps` over two registers,
// larger codebooks a tree of them with a blend per index bit above the fifth. Measured on Intel
// Sapphire Rapids against gathering the weights from the codebook (the alternative for 5..8
// bits): the tree is 1.2x (256 centroids) to 1.9x (32) faster per non-zero, since the gather of
// x per non-zero already occupies the load ports. Batch 1 is the int8 sparse kernel's loop
// (packed_linear.cpp) plus the lookup: 0.93-0.97x its speed on that CPU with the layer in cache
// (both bound by the gathers of x), reading 2.5 bytes per non-zero at <= 16 centroids against
// int8's 3, which pays where memory bandwidth is the limit. Larger
// batches decode a chunk of a row's weights once and walk it per tile of 64 batch columns of
// transposed x, as the int8 kernel does. Every codebook is read through a zero-padded copy of
// 16 (nibbles) or 256 (bytes) entries, so an index past the codebook reads 0.0, never outside
// memory: lightning_compress.ops.lut.check_lut_layout rejects such layouts once, at build time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "epilogue.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>

namespace lightning_compress {
namespace {

constexpr int64_t kBatchTile = 64;     // batch columns per pass over a sparse row
constexpr int64_t kGatherMaxBatch = 2;  // batches up to this size gather x per non-zero
constexpr int64_t kChunk = 512;        // non-zeros decoded at once by the batch path
constexpr int64_t kRowBlock = 64;      // output rows staged before the store
constexpr int64_t kMaxCodebook = 256;

template <bool kNibble>
inline int index_at(const uint8_t* idx, int64_t j) {
  if constexpr (kNibble) {
    return (j & 1) ? (idx[j >> 1] >> 4) : (idx[j >> 1] & 0xF);
  } else {
    return idx[j];
  }
}

// A row's codebook, zero-padded to every value its index width can hold.
struct Lut {
  alignas(64) float v[kMaxCodebook];
  void load(const float* cb, int64_t c) {
    std::memcpy(v, cb, c * sizeof(float));
    std::fill(v + c, v + kMaxCodebook, 0.0f);
  }
};

// ---- portable kernels ---------------------------------------------------------------------------

template <typename Idx, bool kNibble>
LC_SIMD_CLONES float lut_row_dot(const float* __restrict__ x, const Idx* __restrict__ col,
                                 const uint8_t* __restrict__ idx, const float* __restrict__ lut,
                                 int64_t begin, int64_t end) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = begin; j < end; ++j) {
    sum += lut[index_at<kNibble>(idx, j)] * x[col_at(col, j)];
  }
  return sum;
}

template <typename Idx, bool kNibble>
LC_SIMD_CLONES void lut_row_tile(const float* __restrict__ xt, int64_t ldx, int64_t bt,
                                 const Idx* __restrict__ col, const uint8_t* __restrict__ idx,
                                 const float* __restrict__ lut, int64_t begin, int64_t end,
                                 float* __restrict__ acc) {
  for (int64_t b = 0; b < bt; ++b) acc[b] = 0.0f;
  for (int64_t j = begin; j < end; ++j) {
    const float w = lut[index_at<kNibble>(idx, j)];
    const float* __restrict__ row = xt + col_at(col, j) * ldx;
#pragma omp simd
    for (int64_t b = 0; b < bt; ++b) acc[b] += w * row[b];
  }
}

// ---- AVX-512 kernels ----------------------------------------------------------------------------
#ifdef LC_X86

inline __mmask16 lanes(int64_t left) {
  return static_cast<__mmask16>(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
}

template <typename Idx>
LC_AVX512 inline __m512i load_cols(const Idx* col, int64_t j, __mmask16 m) {
  if constexpr (std::is_same_v<Idx, int16_t>) {
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, col + j));
  } else {
    return _mm512_maskz_loadu_epi32(m, col + j);
  }
}

// The indices of non-zeros j .. j+15 (lanes in m), one per 32-bit lane; only the low 4 (C <= 16)
// or 8 bits of a lane are meaningful. Nibbles need j even: byte j/2 + i holds lanes 2i, 2i+1.
template <int C>
LC_AVX512 inline __m512i load_index(const uint8_t* idx, int64_t j, __mmask16 m) {
  if constexpr (C <= 16) {
    // Each byte zero-extended to a 64-bit lane, then or-ed with itself shifted by 28: the low
    // dword's low nibble is the byte's low nibble, the high dword holds the byte's high nibble.
    const __m128i bytes =
        m == 0xFFFF ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(idx + (j >> 1)))
                    : _mm_maskz_loadu_epi8(lanes((32 - __builtin_clz(m) + 1) / 2), idx + (j >> 1));
    const __m512i q = _mm512_cvtepu8_epi64(bytes);
    return _mm512_or_si512(q, _mm512_slli_epi64(q, 28));
  } else {
    return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, idx + j));
  }
}

// 16 weights from 16 indices: the codebook lives in C / 16 registers (one at C <= 16).
template <int C>
LC_AVX512 inline __m512 lookup(const __m512* cb, __m512i index) {
  if constexpr (C <= 16) {
    return _mm512_permutexvar_ps(index, cb[0]);
  } else if constexpr (C == 32) {
    return _mm512_permutex2var_ps(cb[0], index, cb[1]);
  } else {
    const __m512 lo = lookup<C / 2>(cb, index);
    const __m512 hi = lookup<C / 2>(cb + C / 32, index);
    const __mmask16 upper = _mm512_test_epi32_mask(index, _mm512_set1_epi32(C / 2));
    return _mm512_mask_blend_ps(upper, lo, hi);
  }
}

template <int C>
LC_AVX512 inline void load_codebook(const float* lut, __m512* cb) {
  for (int i = 0; i < (C + 15) / 16; ++i) cb[i] = _mm512_load_ps(lut + 16 * i);
}

// Named accumulators, not an array: GCC kept an array of them on the stack, a store per FMA.
// Offsets into the nibble stream are shifts: j >= 0, and a signed division costs three
// instructions in the hottest loop.
template <typename Idx, int C>
LC_AVX512 float lut_row_dot_avx512(const float* x, const Idx* col, const uint8_t* idx,
                                   const float* lut, int64_t begin, int64_t end) {
  constexpr int64_t kAhead = 1024;  // non-zeros prefetched ahead in the col/index streams
  constexpr int kShift = C <= 16 ? 1 : 0;
  if (begin == end) return 0.0f;
  __m512 cb[(C + 15) / 16];
  load_codebook<C>(lut, cb);
  __m512 acc0 = _mm512_setzero_ps();
  __m512 acc1 = _mm512_setzero_ps();
  int64_t j = begin;
  if (C <= 16 && (j & 1)) {
    // A row starting mid-byte: one block from the even position before it, lane 0 left out.
    --j;
    const __mmask16 m = static_cast<__mmask16>(lanes(end - j) & ~1u);
    const __m512 g =
        _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, load_cols(col, j, m), x, 4);
    const __m512 w = lookup<C>(cb, load_index<C>(idx, j, m | 1));
    acc0 = _mm512_mask3_fmadd_ps(w, g, acc0, m);
    j += 16;
  }
  const __mmask16 all = 0xFFFF;
  for (; j + 32 <= end; j += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(col + j + kAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(col + j + kAhead + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(idx + ((j + kAhead) >> kShift)), _MM_HINT_T0);
    const __m512 g0 = _mm512_i32gather_ps(load_cols(col, j, all), x, 4);
    const __m512 g1 = _mm512_i32gather_ps(load_cols(col, j + 16, all), x, 4);
    acc0 = _mm512_fmadd_ps(lookup<C>(cb, load_index<C>(idx, j, all)), g0, acc0);
    acc1 = _mm512_fmadd_ps(lookup<C>(cb, load_index<C>(idx, j + 16, all)), g1, acc1);
  }
  for (; j < end; j += 16) {
    const __mmask16 m = lanes(end - j);
    const __m512 g =
        _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, load_cols(col, j, m), x, 4);
    acc0 = _mm512_mask3_fmadd_ps(lookup<C>(cb, load_index<C>(idx, j, m)), g, acc0, m);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// Weights and x offsets (col * ld) of non-zeros [a, e), a even, into w and off from index 0.
template <typename Idx, int C>
LC_AVX512 void lut_decode_avx512(const Idx* col, const uint8_t* idx, const float* lut, int64_t a,
                                 int64_t e, int32_t ld, float* w, int32_t* off) {
  __m512 cb[(C + 15) / 16];
  load_codebook<C>(lut, cb);
  const __m512i ldv = _mm512_set1_epi32(ld);
  for (int64_t j = a; j < e; j += 16) {
    const __mmask16 m = lanes(e - j);
    _mm512_store_ps(w + (j - a), lookup<C>(cb, load_index<C>(idx, j, m)));
    _mm512_store_si512(off + (j - a), _mm512_mullo_epi32(load_cols(col, j, m), ldv));
  }
}

// One row against 16 * V batch columns of transposed x ([K, 16 * V], zero-padded), from its
// decoded weights and offsets: one broadcast and V FMAs per non-zero, U non-zeros in flight.
template <int V, int U>
LC_AVX512 void tile_fma_avx512(const float* xt, const float* w, const int32_t* off, int64_t len,
                               __m512 (&sums)[U][V]) {
  // A local copy stays in registers; through the reference every FMA would be stored back
  // (the compiler cannot rule out that the reference aliases x or the weights).
  __m512 acc[U][V];
  for (int u = 0; u < U; ++u) {
    for (int v = 0; v < V; ++v) acc[u][v] = sums[u][v];
  }
  int64_t j = 0;
  for (; j + U <= len; j += U) {
    for (int u = 0; u < U; ++u) {
      const __m512 wv = _mm512_set1_ps(w[j + u]);
      const float* row = xt + off[j + u];
      for (int v = 0; v < V; ++v) {
        acc[u][v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(row + 16 * v), acc[u][v]);
      }
    }
  }
  for (; j < len; ++j) {
    const __m512 wv = _mm512_set1_ps(w[j]);
    const float* row = xt + off[j];
    for (int v = 0; v < V; ++v) {
      acc[0][v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(row + 16 * v), acc[0][v]);
    }
  }
  for (int u = 0; u < U; ++u) {
    for (int v = 0; v < V; ++v) sums[u][v] = acc[u][v];
  }
}

template <typename Idx, int C, int V, int U>
LC_AVX512 void lut_row_tile_avx512(const float* xt, const Idx* col, const uint8_t* idx,
                                   const float* lut, int64_t begin, int64_t end, float* out) {
  alignas(64) float wbuf[kChunk];
  alignas(64) int32_t obuf[kChunk];
  __m512 acc[U][V];
  for (int u = 0; u < U; ++u) {
    for (int v = 0; v < V; ++v) acc[u][v] = _mm512_setzero_ps();
  }
  // Chunks start at even non-zeros, so nibbles are whole bytes; a row starting at an odd one
  // decodes its predecessor too and skips it.
  const int64_t a = C <= 16 ? begin & ~int64_t{1} : begin;
  for (int64_t c0 = a; c0 < end; c0 += kChunk) {
    const int64_t c1 = std::min(end, c0 + kChunk);
    lut_decode_avx512<Idx, C>(col, idx, lut, c0, c1, 16 * V, wbuf, obuf);
    const int64_t skip = std::max<int64_t>(begin - c0, 0);
    tile_fma_avx512<V, U>(xt, wbuf + skip, obuf + skip, c1 - c0 - skip, acc);
  }
  for (int v = 0; v < V; ++v) {
    for (int u = 1; u < U; ++u) acc[0][v] = _mm512_add_ps(acc[0][v], acc[u][v]);
    _mm512_storeu_ps(out + 16 * v, acc[0][v]);
  }
}

template <typename Idx, int C>
LC_AVX512 void lut_row_tile_avx512_any(const float* xt, int64_t ldx, const Idx* col,
                                       const uint8_t* idx, const float* lut, int64_t begin,
                                       int64_t end, float* out) {
  switch (ldx / 16) {
    case 1: lut_row_tile_avx512<Idx, C, 1, 4>(xt, col, idx, lut, begin, end, out); return;
    case 2: lut_row_tile_avx512<Idx, C, 2, 4>(xt, col, idx, lut, begin, end, out); return;
    case 3: lut_row_tile_avx512<Idx, C, 3, 2>(xt, col, idx, lut, begin, end, out); return;
    default: lut_row_tile_avx512<Idx, C, 4, 2>(xt, col, idx, lut, begin, end, out); return;
  }
}

#endif  // LC_X86

// ---- dispatch -----------------------------------------------------------------------------------

// One layer's pointers, and its row kernels for one index width (C: the codebook's size rounded
// up to the register count the kernel uses: 16, 32, 64, 128 or 256).
template <typename Idx, int C>
struct Layer {
  static constexpr bool kNibble = C <= 16;
  const int64_t* rp;
  const Idx* col;
  const uint8_t* idx;
  const float* codebook;  // [groups, c]
  int64_t c;
  int64_t group_rows;
  bool avx512;

  void lut(int64_t r, Lut& l) const { l.load(codebook + (r / group_rows) * c, c); }

  float dot(const float* x, const Lut& l, int64_t r) const {
#ifdef LC_X86
    if (avx512) return lut_row_dot_avx512<Idx, C>(x, col, idx, l.v, rp[r], rp[r + 1]);
#endif
    return lut_row_dot<Idx, kNibble>(x, col, idx, l.v, rp[r], rp[r + 1]);
  }

  void tile(const float* xt, int64_t ldx, int64_t bt, const Lut& l, int64_t r, float* out) const {
#ifdef LC_X86
    if (avx512) {
      lut_row_tile_avx512_any<Idx, C>(xt, ldx, col, idx, l.v, rp[r], rp[r + 1], out);
      return;
    }
#endif
    lut_row_tile<Idx, kNibble>(xt, ldx, bt, col, idx, l.v, rp[r], rp[r + 1], out);
  }
};

template <typename Idx, int C>
void lut_linear_impl(const at::Tensor& x, const Layer<Idx, C>& layer, const Epilogue& ep,
                     at::Tensor& y) {
  const int64_t batch = x.size(0);
  const int64_t k = x.size(1);
  const int64_t n = y.size(1);
  const int64_t* rp = layer.rp;
  const float* xp = x.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const int64_t nnz = rp[n];
  // About 32K multiply-adds per task at least: tiny layers stay on one thread.
  const int64_t grain = std::max<int64_t>(1, n * 32768 / std::max<int64_t>(nnz * batch, 1));
  if (batch <= kGatherMaxBatch) {
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      Lut l;
      for (int64_t r = r0; r < r1; ++r) {
        if (r == r0 || r % layer.group_rows == 0) layer.lut(r, l);
        for (int64_t b = 0; b < batch; ++b) out[b * n + r] = ep(r, layer.dot(xp + b * k, l, r));
      }
    });
    return;
  }
  const int64_t ld_max = std::min(kBatchTile, (batch + 15) / 16 * 16);
  at::Tensor xt_t = at::empty({k, ld_max}, x.options());
  float* xt = xt_t.data_ptr<float>();
  for (int64_t b0 = 0; b0 < batch; b0 += kBatchTile) {
    const int64_t bt = std::min(kBatchTile, batch - b0);
    const int64_t ldx = (bt + 15) / 16 * 16;
    at::parallel_for(0, k, 256, [&](int64_t k0, int64_t k1) {
      for (int64_t kk = k0; kk < k1; ++kk) {
        float* dst = xt + kk * ldx;
        for (int64_t b = 0; b < bt; ++b) dst[b] = xp[(b0 + b) * k + kk];
        for (int64_t b = bt; b < ldx; ++b) dst[b] = 0.0f;
      }
    });
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      alignas(64) float stage[kRowBlock * kBatchTile];
      Lut l;
      for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
        const int64_t re = std::min(r1, rb + kRowBlock);
        for (int64_t r = rb; r < re; ++r) {
          if (r == r0 || r % layer.group_rows == 0) layer.lut(r, l);
          layer.tile(xt, ldx, bt, l, r, stage + (r - rb) * ldx);
        }
        for (int64_t b = 0; b < bt; ++b) {
          float* dst = out + (b0 + b) * n;
          for (int64_t r = rb; r < re; ++r) dst[r] = ep(r, stage[(r - rb) * ldx + b]);
        }
      }
    });
  }
}

template <typename Idx>
void lut_dispatch(const at::Tensor& x, const int64_t* rp, const at::Tensor& col,
                  const uint8_t* idx, const float* codebook, int64_t c, int64_t group_rows,
                  const Epilogue& ep, at::Tensor& y) {
  const Idx* cp = col.data_ptr<Idx>();
  const bool avx512 = cpu_has_avx512();
  auto run = [&](auto width) {
    constexpr int kC = decltype(width)::value;
    lut_linear_impl(x, Layer<Idx, kC>{rp, cp, idx, codebook, c, group_rows, avx512}, ep, y);
  };
  if (c <= 16) {
    run(std::integral_constant<int, 16>{});
  } else if (c <= 32) {
    run(std::integral_constant<int, 32>{});
  } else if (c <= 64) {
    run(std::integral_constant<int, 64>{});
  } else if (c <= 128) {
    run(std::integral_constant<int, 128>{});
  } else {
    run(std::integral_constant<int, 256>{});
  }
}

}  // namespace

at::Tensor lut_sparse_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr,
                                 const at::Tensor& col, const at::Tensor& idx,
                                 const at::Tensor& codebook, int64_t group_rows,
                                 const std::optional<at::Tensor>& bias, int64_t in_features,
                                 double act_scale, int64_t act_zero_point, int64_t act_qmax) {
  const char* op = "lut_sparse_linear";
  TORCH_CHECK(act_scale >= 0.0, op, ": `act_scale` must be >= 0 (0: float outputs), got ",
              act_scale);
  TORCH_CHECK(act_scale == 0.0 ||
                  (act_qmax > 0 && act_zero_point >= 0 && act_zero_point <= act_qmax),
              op, ": activation zero point ", act_zero_point, " must lie in [0, ", act_qmax, "]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, op,
              ": `x` must be 2-D float32 [batch, in_features], got ", x.scalar_type(), " ",
              x.dim(), "-D");
  TORCH_CHECK(x.size(1) == in_features, op, ": `x` has ", x.size(1), " features, the layer ",
              in_features);
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.numel() >= 1, op,
              ": `row_ptr` must be 1-D int64 with N+1 entries");
  const int64_t n = row_ptr.numel() - 1;
  TORCH_CHECK(group_rows >= 1, op, ": `group_rows` must be >= 1, got ", group_rows);
  const int64_t c = codebook.dim() == 2 ? codebook.size(1) : 0;
  const int64_t groups = (n + group_rows - 1) / group_rows;
  TORCH_CHECK(codebook.scalar_type() == at::kFloat && codebook.dim() == 2 &&
                  codebook.size(0) == groups && c >= 2 && c <= kMaxCodebook && (c & (c - 1)) == 0,
              op, ": `codebook` must be float32 [", groups, ", 2^bits] (bits 1..8), got ",
              codebook.scalar_type(), " ", codebook.sizes());
  TORCH_CHECK(col.dim() == 1, op, ": `col` must be 1-D");
  const bool narrow = col.scalar_type() == at::kShort;
  TORCH_CHECK(narrow || col.scalar_type() == at::kInt, op,
              ": `col` must be int16 (read as uint16) or int32, got ", col.scalar_type());
  TORCH_CHECK(!narrow || in_features <= 65536, op, ": int16 columns need in_features <= 65536");
  const int64_t nnz = col.numel();
  const int64_t width = c <= 16 ? (nnz + 1) / 2 : nnz;
  TORCH_CHECK(idx.scalar_type() == at::kByte && idx.dim() == 1 && idx.numel() == width, op,
              ": `idx` must be 1-D uint8 with ", width, " entries (", nnz, " non-zeros, ",
              c <= 16 ? "two" : "one", " per byte), got ", idx.scalar_type(), " ", idx.sizes());
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->numel() == n, op,
                ": `bias` must be float32 of shape [", n, "], got ", bias->scalar_type(), " ",
                bias->sizes());
  }
  const at::Tensor rp = row_ptr.contiguous();
  const int64_t* rpp = rp.data_ptr<int64_t>();
  TORCH_CHECK(rpp[0] == 0 && rpp[n] == nnz, op, ": `row_ptr` must run from 0 to nnz=", nnz,
              ", got ", rpp[0], "..", rpp[n]);
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(rpp[r] <= rpp[r + 1], op, ": `row_ptr` decreases at row ", r);
  }
  // Columns are trusted, as by sparse_int_linear (the layout check validates them once);
  // indices cannot leave the padded codebook whatever they hold.
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0 || n == 0) return y;
  const at::Tensor xc = x.contiguous(), cc = col.contiguous(), ic = idx.contiguous();
  const at::Tensor cb = codebook.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional(bias->contiguous()) : std::nullopt;
  // The centroids are the weights: the shared epilogue's per-row scale is 1.
  const at::Tensor ones = at::ones({n}, x.options());
  const Epilogue ep = epilogue(ones, bc, act_scale, act_zero_point, act_qmax);
  const uint8_t* ip = ic.data_ptr<uint8_t>();
  const float* cbp = cb.data_ptr<float>();
  if (narrow) {
    lut_dispatch<int16_t>(xc, rpp, cc, ip, cbp, c, group_rows, ep, y);
  } else {
    lut_dispatch<int32_t>(xc, rpp, cc, ip, cbp, c, group_rows, ep, y);
  }
  return y;
}

TORCH_LIBRARY_IMPL(lightning_compress, CPU, m) {
  m.impl("lut_sparse_linear", &lut_sparse_linear_cpu);
}

}  // namespace lightning_compress
