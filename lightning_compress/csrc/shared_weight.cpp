// Weight sharing's training step (quantization/kmeans.py, Deep Compression), one pass over the
// weight each way:
//
//   shared_weight_forward    out = codebook[group(r), indices[r, c]] where weight != 0, else 0
//   shared_weight_backward_  grad = 0 where weight == 0 (in place), and per group the sum of the
//                            remaining grad of each index: the centroids' gradient
//
// weight/grad float32 and indices uint8 are read as [R, C] (output channels on dim 0), codebook
// float32 [G, L] with G dividing R (consecutive rows share a codebook) and L <= 256. No zero mask
// is kept between the two: the backward compares the weight again, which autograd keeps anyway.
//
// Determinism: the histogram is summed over fixed blocks (rows of one group, about kBlock
// elements), each into its own partial, and the partials are added in block order, so a result
// depends on the inputs only, never on the number of threads or their scheduling.
//
// AVX-512 (F/BW/VL): a codebook of up to 16 entries is one register (vpermps), 32 two
// (vpermt2ps), larger ones are gathered from a 256-entry table; the histogram compares each
// vector of indices with every level up to 16 levels and accumulates per lane, above that it
// adds the live lanes into four scalar sub-histograms. LIGHTNING_COMPRESS_NO_AVX512=1 selects
// the portable loops, as in packed_linear.cpp. Every index is checked against L (after the pass:
// the padded table keeps an out-of-range index in bounds until then).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace lightning_compress {
namespace {

constexpr int64_t kBlock = 1 << 16;  // elements per histogram block (fixes the sum order)
constexpr int64_t kTable = 256;      // entries of a padded codebook: any uint8 index is in bounds
constexpr int kSub = 4;              // scalar sub-histograms (breaks store-to-load chains)

// Rows [r0, r1) of one group g: the unit of work of both ops.
struct Blocks {
  int64_t rows, cols, groups, group_rows, block_rows, per_group;

  Blocks(int64_t r, int64_t c, int64_t g) : rows(r), cols(c), groups(g), group_rows(r / g) {
    block_rows = std::max<int64_t>(1, kBlock / std::max<int64_t>(c, 1));
    per_group = (group_rows + block_rows - 1) / block_rows;
  }
  int64_t count() const { return groups * per_group; }
  int64_t group(int64_t b) const { return b / per_group; }
  int64_t begin(int64_t b) const { return group(b) * group_rows + (b % per_group) * block_rows; }
  int64_t end(int64_t b) const {
    return std::min(begin(b) + block_rows, (group(b) + 1) * group_rows);
  }
};

// Each group's codebook padded with zeros to kTable entries.
std::vector<float> padded_tables(const at::Tensor& codebook) {
  const int64_t groups = codebook.size(0), levels = codebook.size(1);
  std::vector<float> tables(groups * kTable, 0.0f);
  const float* cb = codebook.data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    std::copy(cb + g * levels, cb + (g + 1) * levels, tables.data() + g * kTable);
  }
  return tables;
}

// ---- portable -----------------------------------------------------------------------------------

LC_SIMD_CLONES uint8_t forward_portable(const float* __restrict__ w, const uint8_t* __restrict__ idx,
                                        const float* __restrict__ table, int64_t n,
                                        float* __restrict__ out) {
  uint8_t top = 0;
  for (int64_t i = 0; i < n; ++i) {
    top = std::max(top, idx[i]);
    out[i] = w[i] != 0.0f ? table[idx[i]] : 0.0f;  // NaN != 0: a NaN weight takes its centroid
  }
  return top;
}

uint8_t backward_portable(float* __restrict__ g, const float* __restrict__ w,
                          const uint8_t* __restrict__ idx, int64_t n, float (*hist)[kTable]) {
  uint8_t top = 0;
  for (int64_t i = 0; i < n; ++i) {
    top = std::max(top, idx[i]);
    if (w[i] != 0.0f) {
      hist[i % kSub][idx[i]] += g[i];
    } else {
      g[i] = 0.0f;
    }
  }
  return top;
}

// ---- AVX-512 ------------------------------------------------------------------------------------

#ifdef LC_X86
LC_AVX512 inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// 16 entries of the padded table: C = 16 or 32 entries live in registers, more are gathered.
template <int C>
LC_AVX512 inline __m512 lookup(const __m512 (&cb)[2], const float* table, __m512i index) {
  if constexpr (C == 16) {
    return _mm512_permutexvar_ps(index, cb[0]);
  } else if constexpr (C == 32) {
    return _mm512_permutex2var_ps(cb[0], index, cb[1]);
  } else {
    return _mm512_i32gather_ps(index, table, 4);
  }
}

LC_AVX512 uint8_t reduce_top(__m512i top) {
  return static_cast<uint8_t>(_mm512_reduce_max_epu32(top));
}

// Elements [0, n) of one group's contiguous rows; returns the largest index.
template <int C>
LC_AVX512 uint8_t forward_avx512(const float* w, const uint8_t* idx, const float* table, int64_t n,
                                 float* out) {
  __m512i top = _mm512_setzero_si512();
  const __m512 cb[2] = {_mm512_loadu_ps(table), _mm512_loadu_ps(table + 16)};
  const __m512 zero = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + j)));
    top = _mm512_max_epu32(top, k);
    const __mmask16 live = _mm512_cmp_ps_mask(_mm512_loadu_ps(w + j), zero, _CMP_NEQ_UQ);
    _mm512_storeu_ps(out + j, _mm512_maskz_mov_ps(live, lookup<C>(cb, table, k)));
  }
  if (j < n) {
    const __mmask16 m = lanes(n - j);
    const __m512i k = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, idx + j));
    top = _mm512_max_epu32(top, k);
    const __mmask16 live =
        _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, w + j), zero, _CMP_NEQ_UQ);
    _mm512_mask_storeu_ps(out + j, m, _mm512_maskz_mov_ps(live, lookup<C>(cb, table, k)));
  }
  return reduce_top(top);
}

// Zeros the gradient of the zero weights (stores only where there are any) and gives the live
// lanes' gradient, their indices and the largest index so far.
LC_AVX512 inline __m512 backward_step(float* g, const float* w, const uint8_t* idx, __mmask16 m,
                                      __mmask16& live, __m512i& k, __m512i& top) {
  const __m512 zero = _mm512_setzero_ps();
  k = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, idx));
  top = _mm512_max_epu32(top, k);
  live = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, w), zero, _CMP_NEQ_UQ);
  const __mmask16 dead = static_cast<__mmask16>(m & ~live);
  if (dead) _mm512_mask_storeu_ps(g, dead, zero);
  return _mm512_maskz_loadu_ps(live, g);
}

// Up to C <= 16 levels: one accumulator vector per level, summed per lane.
template <int C>
LC_AVX512 uint8_t backward_avx512_small(float* g, const float* w, const uint8_t* idx, int64_t n,
                                        int64_t levels, double* partial) {
  __m512i top = _mm512_setzero_si512();
  __m512 acc[C];
  for (int l = 0; l < C; ++l) acc[l] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    __mmask16 live;
    __m512i k;
    const __m512 gv = backward_step(g + j, w + j, idx + j, lanes(n - j), live, k, top);
    for (int l = 0; l < C; ++l) {
      const __mmask16 hit = _mm512_mask_cmpeq_epi32_mask(live, k, _mm512_set1_epi32(l));
      acc[l] = _mm512_mask_add_ps(acc[l], hit, acc[l], gv);
    }
  }
  // Lanes of indices in [levels, C) are dropped: such an index fails the caller's check.
  for (int l = 0; l < levels; ++l) partial[l] += _mm512_reduce_add_ps(acc[l]);
  return reduce_top(top);
}

// More levels: the live lanes go one by one into kSub scalar sub-histograms.
LC_AVX512 uint8_t backward_avx512_large(float* g, const float* w, const uint8_t* idx, int64_t n,
                                        float (*hist)[kTable]) {
  __m512i top = _mm512_setzero_si512();
  alignas(64) float gs[16];
  alignas(64) int32_t ks[16];
  for (int64_t j = 0; j < n; j += 16) {
    __mmask16 live;
    __m512i k;
    const __m512 gv = backward_step(g + j, w + j, idx + j, lanes(n - j), live, k, top);
    _mm512_store_ps(gs, gv);
    _mm512_store_si512(ks, k);
    for (unsigned bits = live; bits; bits &= bits - 1) {
      const int q = __builtin_ctz(bits);
      hist[q % kSub][ks[q]] += gs[q];
    }
  }
  return reduce_top(top);
}
#endif  // LC_X86

// ---- ops ----------------------------------------------------------------------------------------

void check_inputs(const char* op, const at::Tensor& weight, const at::Tensor& indices,
                  int64_t groups, int64_t levels) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat, op, ": `weight` must be float32, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() >= 1, op, ": `weight` needs an output-channel dimension");
  TORCH_CHECK(indices.scalar_type() == at::kByte && indices.sizes() == weight.sizes(), op,
              ": `indices` must be uint8 of the weight's shape ", weight.sizes(), ", got ",
              indices.scalar_type(), " ", indices.sizes());
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, op, ": `groups`=", groups,
              " must divide the output channels (", weight.size(0), ")");
  TORCH_CHECK(levels >= 1 && levels <= kTable, op, ": `levels` must be in [1, 256], got ",
              levels);
}

void check_top(const char* op, uint8_t top, int64_t levels) {
  TORCH_CHECK_INDEX(top < levels, op, ": index ", static_cast<int>(top),
                    " is out of range for a codebook of ", levels, " entries");
}

at::Tensor shared_weight_forward_cpu(const at::Tensor& weight, const at::Tensor& indices,
                                     const at::Tensor& codebook) {
  const char* op = "shared_weight_forward";
  TORCH_CHECK(codebook.scalar_type() == at::kFloat && codebook.dim() == 2, op,
              ": `codebook` must be float32 [groups, levels], got ", codebook.scalar_type(), " ",
              codebook.sizes());
  check_inputs(op, weight, indices, codebook.size(0), codebook.size(1));
  const at::Tensor w = weight.contiguous(), k = indices.contiguous(), cb = codebook.contiguous();
  at::Tensor out = at::empty_like(w);
  const int64_t rows = w.size(0), cols = rows ? w.numel() / rows : 0;
  const int64_t levels = cb.size(1);
  const Blocks blocks(rows, cols, cb.size(0));
  if (w.numel() == 0) return out;
  const std::vector<float> tables = padded_tables(cb);
  std::vector<uint8_t> tops(blocks.count(), 0);
  const float* wp = w.data_ptr<float>();
  const uint8_t* kp = k.data_ptr<uint8_t>();
  float* op_ = out.data_ptr<float>();
  const bool avx512 = cpu_has_avx512();
  at::parallel_for(0, blocks.count(), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t at = blocks.begin(b) * cols, n = (blocks.end(b) - blocks.begin(b)) * cols;
      const float* table = tables.data() + blocks.group(b) * kTable;
#ifdef LC_X86
      if (avx512) {
        if (levels <= 16) {
          tops[b] = forward_avx512<16>(wp + at, kp + at, table, n, op_ + at);
        } else if (levels <= 32) {
          tops[b] = forward_avx512<32>(wp + at, kp + at, table, n, op_ + at);
        } else {
          tops[b] = forward_avx512<kTable>(wp + at, kp + at, table, n, op_ + at);
        }
        continue;
      }
#endif
      tops[b] = forward_portable(wp + at, kp + at, table, n, op_ + at);
    }
  });
  check_top(op, *std::max_element(tops.begin(), tops.end()), levels);
  return out;
}

// The block's sums into partial [levels] (doubles, zeroed by the caller).
void backward_block(float* g, const float* w, const uint8_t* idx, int64_t n, int64_t levels,
                    bool avx512, double* partial, uint8_t& top_out) {
#ifdef LC_X86
  if (avx512) {
    if (levels <= 2) {
      top_out = backward_avx512_small<2>(g, w, idx, n, levels, partial);
    } else if (levels <= 4) {
      top_out = backward_avx512_small<4>(g, w, idx, n, levels, partial);
    } else if (levels <= 8) {
      top_out = backward_avx512_small<8>(g, w, idx, n, levels, partial);
    } else if (levels <= 16) {
      top_out = backward_avx512_small<16>(g, w, idx, n, levels, partial);
    } else {
      float hist[kSub][kTable] = {};
      top_out = backward_avx512_large(g, w, idx, n, hist);
      for (int64_t l = 0; l < levels; ++l) {
        for (int q = 0; q < kSub; ++q) partial[l] += hist[q][l];
      }
    }
    return;
  }
#endif
  float hist[kSub][kTable] = {};
  top_out = backward_portable(g, w, idx, n, hist);
  for (int64_t l = 0; l < levels; ++l) {
    for (int q = 0; q < kSub; ++q) partial[l] += hist[q][l];
  }
}

at::Tensor shared_weight_backward_cpu(at::Tensor& grad, const at::Tensor& weight,
                                      const at::Tensor& indices, int64_t groups, int64_t levels) {
  const char* op = "shared_weight_backward_";
  check_inputs(op, weight, indices, groups, levels);
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.sizes() == weight.sizes(), op,
              ": `grad` must be float32 of the weight's shape ", weight.sizes(), ", got ",
              grad.scalar_type(), " ", grad.sizes());
  at::Tensor gc = grad.is_contiguous() ? grad : grad.contiguous();
  const at::Tensor w = weight.contiguous(), k = indices.contiguous();
  const int64_t rows = w.size(0), cols = rows ? w.numel() / rows : 0;
  const Blocks blocks(rows, cols, groups);
  at::Tensor grad_codebook = at::zeros({groups, levels}, w.options());
  if (w.numel() == 0) return grad_codebook;
  std::vector<double> partials(blocks.count() * levels, 0.0);
  std::vector<uint8_t> tops(blocks.count(), 0);
  float* gp = gc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const uint8_t* kp = k.data_ptr<uint8_t>();
  const bool avx512 = cpu_has_avx512();
  at::parallel_for(0, blocks.count(), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t at = blocks.begin(b) * cols, n = (blocks.end(b) - blocks.begin(b)) * cols;
      backward_block(gp + at, wp + at, kp + at, n, levels, avx512,
                     partials.data() + b * levels, tops[b]);
    }
  });
  check_top(op, *std::max_element(tops.begin(), tops.end()), levels);
  float* out = grad_codebook.data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t l = 0; l < levels; ++l) {
      double sum = 0.0;
      for (int64_t i = 0; i < blocks.per_group; ++i) {
        sum += partials[(g * blocks.per_group + i) * levels + l];
      }
      out[g * levels + l] = static_cast<float>(sum);
    }
  }
  if (!gc.is_same(grad)) grad.copy_(gc);
  return grad_codebook;
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_compress, CPU, m) {
  m.impl("shared_weight_forward", &shared_weight_forward_cpu);
  m.impl("shared_weight_backward_", &shared_weight_backward_cpu);
}

}  // namespace lightning_compress
