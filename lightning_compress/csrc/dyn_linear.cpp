// Sparse int8 linear layers with dynamically quantized activations: each row of x is quantized
// to uint8 (asymmetric, its own scale and zero point, zero exact), the products are exact int32
// dot products (AVX-512 VNNI `vpdpbusd`: 64 multiply-adds per instruction), and the output is
// y = float(dot) * x_scale[b] * scale[r] + bias[r], then the layer's epilogue (epilogue.h).
//
//   bitmask_dyn_linear  one 64-bit mask per 64 columns of a row and the row's non-zeros in column
//                       order (mask int64 [N, ceil(K/64)], values int8 [nnz], row_ptr int64
//                       [N+1]): 1 bit per weight plus 1 byte per non-zero, the smallest layout
//                       that streams at batch 1. A word's values are expanded into their lanes
//                       (`vpexpandb`) and meet x's 64 columns in one `vpdpbusd` per batch row.
//   block_dyn_linear    the row's non-empty groups of 4 columns (group int16 [blocks],
//                       values int8 [4 * blocks], row_ptr int64 [N+1] in blocks): for batches,
//                       one `vpdpbusd` multiplies a group's 4 weights with 16 batch rows, which
//                       lie side by side in a transposed, quantized tile of x.
//
// Both take row_sum int32 [N], the sum of each row's integers, for the zero-point correction:
// dot = sum(w * q) - zero_point * row_sum. in_features <= 65536 keeps every int32 sum exact
// (255 * 127 * 65536 < 2^31). CPUs without AVX-512 VNNI/VBMI2 run portable loops of the same
// integer arithmetic, so every CPU computes the same numbers.
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LC_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2,bmi2,popcnt")))
#endif

namespace lightning_compress {
namespace {

constexpr int64_t kMaxIn = 65536;
constexpr int64_t kWord = 64;       // columns per mask word
constexpr int64_t kGroup = 4;       // columns per block
constexpr int64_t kTile = 64;       // batch rows per pass of the block kernel
constexpr int64_t kRowBlock = 64;   // output rows staged before the store

// The VNNI paths run when the CPU has them, unless LIGHTNING_COMPRESS_NO_AVX512 is set (as for
// packed_linear.cpp: tests use it to check the portable loops).
bool cpu_has_vnni() {
#ifdef LC_X86
  static const bool has = [] {
    return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("bmi2") &&
           __builtin_cpu_supports("popcnt");
  }();
  return has;
#else
  return false;
#endif
}

// Nearest integer, ties to even (the default rounding mode), for |v| < 2^22, as torch.round.
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

// x [B, K] -> q uint8 [B, ld] (columns past K zero), scale and zero point per row: the row's
// range widened to hold 0, split in 255 steps; q = clamp(round(x / step) + zero_point, 0, 255).
LC_SIMD_CLONES void quantize_row(const float* __restrict__ x, int64_t k, int64_t ld,
                                 uint8_t* __restrict__ q, float* scale, int32_t* zero_point) {
  float lo = 0.0f, hi = 0.0f;
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int64_t i = 0; i < k; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  float s = (hi - lo) / 255.0f;
  if (!(s > 0.0f)) s = 1.0f;
  const float inv = 1.0f / s;
  const float zp = std::min(255.0f, std::max(0.0f, round_even(-lo * inv)));
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) {
    const float v = round_even(x[i] * inv) + zp;
    q[i] = static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, v)));
  }
  for (int64_t i = k; i < ld; ++i) q[i] = 0;
  *scale = s;
  *zero_point = static_cast<int32_t>(zp);
}

struct QuantizedRows {
  at::Tensor q;      // uint8 [B, ld]
  at::Tensor scale;  // float [B]
  at::Tensor zero;   // int32 [B]
};

QuantizedRows quantize_rows(const at::Tensor& x, int64_t ld) {
  const int64_t batch = x.size(0), k = x.size(1);
  QuantizedRows r{at::empty({batch, ld}, x.options().dtype(at::kByte)),
                  at::empty({batch}, x.options()), at::empty({batch}, x.options().dtype(at::kInt))};
  const float* xp = x.data_ptr<float>();
  uint8_t* qp = r.q.data_ptr<uint8_t>();
  float* sp = r.scale.data_ptr<float>();
  int32_t* zp = r.zero.data_ptr<int32_t>();
  at::parallel_for(0, batch, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)),
                   [&](int64_t b0, int64_t b1) {
                     for (int64_t b = b0; b < b1; ++b) {
                       quantize_row(xp + b * k, k, ld, qp + b * ld, sp + b, zp + b);
                     }
                   });
  return r;
}

// ---- bitmask layout -----------------------------------------------------------------------------

// Dot products of one row with `nb` quantized rows of x (at q, stride ld), zero points not yet
// corrected.
void bitmask_row_portable(const uint64_t* mask, int64_t words, const int8_t* val, const uint8_t* q,
                          int64_t ld, int64_t nb, int32_t* dot) {
  for (int64_t b = 0; b < nb; ++b) dot[b] = 0;
  for (int64_t w = 0; w < words; ++w) {
    uint64_t bits = mask[w];
    while (bits) {
      const int64_t col = w * kWord + __builtin_ctzll(bits);
      bits &= bits - 1;
      const int32_t v = *val++;
      for (int64_t b = 0; b < nb; ++b) dot[b] += v * static_cast<int32_t>(q[b * ld + col]);
    }
  }
}

#ifdef LC_X86
// Four words per step, each with its own accumulators: vpdpbusd's latency would otherwise
// serialise a batch row's chain.
template <int NB>
LC_VNNI void bitmask_row_vnni(const uint64_t* mask, int64_t words, const int8_t* val,
                              const uint8_t* q, int64_t ld, int32_t* dot) {
  constexpr int kU = 4;
  __m512i acc[kU][NB];
  for (int u = 0; u < kU; ++u) {
    for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_setzero_si512();
  }
  int64_t w = 0;
  for (; w + kU <= words; w += kU) {
    __m512i v[kU];
    for (int u = 0; u < kU; ++u) {
      const uint64_t bits = mask[w + u];
      v[u] = _mm512_maskz_expandloadu_epi8(bits, val);
      val += _mm_popcnt_u64(bits);
    }
    for (int b = 0; b < NB; ++b) {
      const uint8_t* qb = q + b * ld + w * kWord;
      for (int u = 0; u < kU; ++u) {
        acc[u][b] = _mm512_dpbusd_epi32(acc[u][b], _mm512_loadu_si512(qb + u * kWord), v[u]);
      }
    }
  }
  for (; w < words; ++w) {
    const uint64_t bits = mask[w];
    const __m512i v = _mm512_maskz_expandloadu_epi8(bits, val);
    val += _mm_popcnt_u64(bits);
    for (int b = 0; b < NB; ++b) {
      acc[0][b] = _mm512_dpbusd_epi32(acc[0][b], _mm512_loadu_si512(q + b * ld + w * kWord), v);
    }
  }
  for (int b = 0; b < NB; ++b) {
    __m512i sum = acc[0][b];
    for (int u = 1; u < kU; ++u) sum = _mm512_add_epi32(sum, acc[u][b]);
    dot[b] = _mm512_reduce_add_epi32(sum);
  }
}

LC_VNNI void bitmask_row_vnni_any(const uint64_t* mask, int64_t words, const int8_t* val,
                                  const uint8_t* q, int64_t ld, int64_t nb, int32_t* dot) {
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) bitmask_row_vnni<4>(mask, words, val, q + b * ld, ld, dot + b);
  switch (nb - b) {
    case 3: bitmask_row_vnni<3>(mask, words, val, q + b * ld, ld, dot + b); break;
    case 2: bitmask_row_vnni<2>(mask, words, val, q + b * ld, ld, dot + b); break;
    case 1: bitmask_row_vnni<1>(mask, words, val, q + b * ld, ld, dot + b); break;
    default: break;
  }
}
#endif

void bitmask_impl(const at::Tensor& x, const int64_t* rp, const uint64_t* mask, int64_t words,
                  const int8_t* val, const int32_t* row_sum, const Epilogue& ep, at::Tensor& y) {
  const int64_t batch = x.size(0), n = y.size(1);
  const QuantizedRows qr = quantize_rows(x, words * kWord);
  const uint8_t* q = qr.q.data_ptr<uint8_t>();
  const float* xs = qr.scale.data_ptr<float>();
  const int32_t* zp = qr.zero.data_ptr<int32_t>();
  float* out = y.data_ptr<float>();
  const int64_t ld = words * kWord;
  const bool vnni = cpu_has_vnni();
  const int64_t nnz = rp[n];
  const int64_t grain =
      std::max<int64_t>(1, n * 16384 / std::max<int64_t>((nnz + n * words) * batch, 1));
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    constexpr int64_t kChunk = 16;  // batch rows per pass over a weight row (it stays in L1)
    int32_t dot[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t b0 = 0; b0 < batch; b0 += kChunk) {
        const int64_t nb = std::min(kChunk, batch - b0);
        const uint8_t* qb = q + b0 * ld;
#ifdef LC_X86
        if (vnni) {
          bitmask_row_vnni_any(mask + r * words, words, val + rp[r], qb, ld, nb, dot);
        } else
#endif
        {
          bitmask_row_portable(mask + r * words, words, val + rp[r], qb, ld, nb, dot);
        }
        for (int64_t b = 0; b < nb; ++b) {
          const int32_t d = dot[b] - zp[b0 + b] * row_sum[r];
          out[(b0 + b) * n + r] = ep(r, static_cast<float>(d) * xs[b0 + b]);
        }
      }
    }
  });
}

// ---- block layout -------------------------------------------------------------------------------

// Tile layout of quantized x for the block kernel: for group g, batch row b, column i of the
// group, xt[(g * lanes + b) * 4 + i], lanes = 16 * V; rows past the tile are zero.
void block_row_portable(const uint8_t* xt, int64_t lanes, const int16_t* group, const int8_t* val,
                        int64_t begin, int64_t end, int32_t* dot) {
  for (int64_t b = 0; b < lanes; ++b) dot[b] = 0;
  for (int64_t j = begin; j < end; ++j) {
    const uint8_t* xg = xt + static_cast<int64_t>(static_cast<uint16_t>(group[j])) * lanes * 4;
    const int8_t* w = val + j * kGroup;
    for (int64_t b = 0; b < lanes; ++b) {
      int32_t s = 0;
      for (int i = 0; i < 4; ++i) s += static_cast<int32_t>(w[i]) * xg[b * 4 + i];
      dot[b] += s;
    }
  }
}

#ifdef LC_X86
// U blocks in flight, each with its own V accumulators, so that vpdpbusd's latency does not
// serialise the loop.
template <int V, int U>
LC_VNNI void block_row_vnni(const uint8_t* xt, const int16_t* group, const int8_t* val,
                            int64_t begin, int64_t end, int32_t* dot) {
  constexpr int64_t kStride = 64 * V;  // bytes of one group's tile
  __m512i acc[U][V];
  for (int u = 0; u < U; ++u) {
    for (int v = 0; v < V; ++v) acc[u][v] = _mm512_setzero_si512();
  }
  int64_t j = begin;
  for (; j + U <= end; j += U) {
    for (int u = 0; u < U; ++u) {
      int32_t w4;
      std::memcpy(&w4, val + (j + u) * kGroup, sizeof(w4));
      const __m512i w = _mm512_set1_epi32(w4);
      const uint8_t* xg = xt + static_cast<int64_t>(static_cast<uint16_t>(group[j + u])) * kStride;
      for (int v = 0; v < V; ++v) {
        acc[u][v] = _mm512_dpbusd_epi32(acc[u][v], _mm512_loadu_si512(xg + 64 * v), w);
      }
    }
  }
  for (; j < end; ++j) {
    int32_t w4;
    std::memcpy(&w4, val + j * kGroup, sizeof(w4));
    const __m512i w = _mm512_set1_epi32(w4);
    const uint8_t* xg = xt + static_cast<int64_t>(static_cast<uint16_t>(group[j])) * kStride;
    for (int v = 0; v < V; ++v) {
      acc[0][v] = _mm512_dpbusd_epi32(acc[0][v], _mm512_loadu_si512(xg + 64 * v), w);
    }
  }
  for (int v = 0; v < V; ++v) {
    for (int u = 1; u < U; ++u) acc[0][v] = _mm512_add_epi32(acc[0][v], acc[u][v]);
    _mm512_storeu_si512(dot + 16 * v, acc[0][v]);
  }
}
#endif

void block_rows(const uint8_t* xt, int64_t lanes, const int16_t* group, const int8_t* val,
                int64_t begin, int64_t end, int32_t* dot, bool vnni) {
#ifdef LC_X86
  if (vnni) {
    switch (lanes / 16) {
      case 1: block_row_vnni<1, 4>(xt, group, val, begin, end, dot); return;
      case 2: block_row_vnni<2, 4>(xt, group, val, begin, end, dot); return;
      case 3: block_row_vnni<3, 2>(xt, group, val, begin, end, dot); return;
      default: block_row_vnni<4, 2>(xt, group, val, begin, end, dot); return;
    }
  }
#endif
  block_row_portable(xt, lanes, group, val, begin, end, dot);
}

void block_impl(const at::Tensor& x, const int64_t* rp, const int16_t* group, const int8_t* val,
                const int32_t* row_sum, const Epilogue& ep, at::Tensor& y) {
  const int64_t batch = x.size(0), k = x.size(1), n = y.size(1);
  const int64_t groups = (k + kGroup - 1) / kGroup;
  const int64_t ld = groups * kGroup;
  const QuantizedRows qr = quantize_rows(x, ld);
  const uint8_t* q = qr.q.data_ptr<uint8_t>();
  const float* xs = qr.scale.data_ptr<float>();
  const int32_t* zp = qr.zero.data_ptr<int32_t>();
  float* out = y.data_ptr<float>();
  const bool vnni = cpu_has_vnni();
  const int64_t lanes_max = std::min(kTile, (batch + 15) / 16 * 16);
  at::Tensor xt_t = at::empty({groups * lanes_max * kGroup}, x.options().dtype(at::kByte));
  uint8_t* xt = xt_t.data_ptr<uint8_t>();
  const int64_t blocks = rp[n];
  const int64_t grain =
      std::max<int64_t>(1, n * 8192 / std::max<int64_t>(blocks * lanes_max / 16, 1));
  for (int64_t b0 = 0; b0 < batch; b0 += kTile) {
    const int64_t bt = std::min(kTile, batch - b0);
    const int64_t lanes = (bt + 15) / 16 * 16;
    at::parallel_for(0, groups, 256, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        uint32_t* dst = reinterpret_cast<uint32_t*>(xt + g * lanes * kGroup);
        for (int64_t b = 0; b < bt; ++b) {
          std::memcpy(dst + b, q + (b0 + b) * ld + g * kGroup, kGroup);
        }
        for (int64_t b = bt; b < lanes; ++b) dst[b] = 0;
      }
    });
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      alignas(64) int32_t stage[kRowBlock * kTile];
      for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
        const int64_t re = std::min(r1, rb + kRowBlock);
        for (int64_t r = rb; r < re; ++r) {
          block_rows(xt, lanes, group, val, rp[r], rp[r + 1], stage + (r - rb) * lanes, vnni);
        }
        for (int64_t b = 0; b < bt; ++b) {
          float* dst = out + (b0 + b) * n;
          const float s = xs[b0 + b];
          const int32_t z = zp[b0 + b];
          for (int64_t r = rb; r < re; ++r) {
            const int32_t d = stage[(r - rb) * lanes + b] - z * row_sum[r];
            dst[r] = ep(r, static_cast<float>(d) * s);
          }
        }
      }
    });
  }
}

// ---- checks -------------------------------------------------------------------------------------

void check_layer(const char* op, const at::Tensor& x, const at::Tensor& row_ptr,
                 const at::Tensor& values, const at::Tensor& row_sum, const at::Tensor& scale,
                 const std::optional<at::Tensor>& bias, int64_t in_features, double act_scale,
                 int64_t act_zero_point, int64_t act_qmax) {
  TORCH_CHECK(act_scale >= 0.0, op, ": `act_scale` must be >= 0 (0: float outputs), got ",
              act_scale);
  TORCH_CHECK(act_scale == 0.0 || (act_qmax > 0 && act_zero_point >= 0 && act_zero_point <= act_qmax),
              op, ": activation zero point ", act_zero_point, " must lie in [0, ", act_qmax, "]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, op,
              ": `x` must be 2-D float32 [batch, in_features], got ", x.scalar_type(), " ",
              x.dim(), "-D");
  TORCH_CHECK(x.size(1) == in_features, op, ": `x` has ", x.size(1), " features, the layer ",
              in_features);
  TORCH_CHECK(in_features >= 1 && in_features <= kMaxIn, op, ": `in_features` must be in [1, ",
              kMaxIn, "], got ", in_features);
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.numel() >= 1, op,
              ": `row_ptr` must be 1-D int64 with N+1 entries");
  const int64_t n = row_ptr.numel() - 1;
  TORCH_CHECK(values.scalar_type() == at::kChar && values.dim() == 1, op,
              ": `values` must be 1-D int8, got ", values.scalar_type());
  TORCH_CHECK(row_sum.scalar_type() == at::kInt && row_sum.dim() == 1 && row_sum.numel() == n, op,
              ": `row_sum` must be int32 [", n, "]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.numel() == n, op,
              ": `scale` must be float32 of shape [", n, "]");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->numel() == n, op,
                ": `bias` must be float32 of shape [", n, "]");
  }
}

// row_ptr from 0 to `total`, non-decreasing (one pass over N + 1 entries, cheap beside the
// product). What the rows hold (masks, groups) is validated once by the layout builders.
void check_row_ptr(const char* op, const at::Tensor& rp, int64_t total, const char* what) {
  const int64_t* p = rp.data_ptr<int64_t>();
  const int64_t n = rp.numel() - 1;
  TORCH_CHECK(p[0] == 0 && p[n] == total, op, ": `row_ptr` must run from 0 to the number of ",
              what, " (", total, "), got ", p[0], "..", p[n]);
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(p[r] <= p[r + 1], op, ": `row_ptr` decreases at row ", r);
  }
}

}  // namespace

at::Tensor bitmask_dyn_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr,
                                  const at::Tensor& mask, const at::Tensor& values,
                                  const at::Tensor& row_sum, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& bias, int64_t in_features,
                                  double act_scale, int64_t act_zero_point, int64_t act_qmax) {
  const char* op = "bitmask_dyn_linear";
  check_layer(op, x, row_ptr, values, row_sum, scale, bias, in_features, act_scale,
              act_zero_point, act_qmax);
  const int64_t n = row_ptr.numel() - 1;
  const int64_t words = (in_features + kWord - 1) / kWord;
  TORCH_CHECK(mask.scalar_type() == at::kLong && mask.dim() == 2 && mask.size(0) == n &&
                  mask.size(1) == words,
              op, ": `mask` must be int64 [", n, ", ", words, "], got ", mask.scalar_type(), " ",
              mask.sizes());
  const at::Tensor rp = row_ptr.contiguous();
  check_row_ptr(op, rp, values.numel(), "values");
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0 || n == 0) return y;
  const at::Tensor xc = x.contiguous(), mc = mask.contiguous(), vc = values.contiguous();
  const at::Tensor rs = row_sum.contiguous(), sc = scale.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional(bias->contiguous()) : std::nullopt;
  const Epilogue ep = epilogue(sc, bc, act_scale, act_zero_point, act_qmax);
  bitmask_impl(xc, rp.data_ptr<int64_t>(), reinterpret_cast<const uint64_t*>(mc.data_ptr<int64_t>()),
               words, vc.data_ptr<int8_t>(), rs.data_ptr<int32_t>(), ep, y);
  return y;
}

at::Tensor block_dyn_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr,
                                const at::Tensor& group, const at::Tensor& values,
                                const at::Tensor& row_sum, const at::Tensor& scale,
                                const std::optional<at::Tensor>& bias, int64_t in_features,
                                double act_scale, int64_t act_zero_point, int64_t act_qmax) {
  const char* op = "block_dyn_linear";
  check_layer(op, x, row_ptr, values, row_sum, scale, bias, in_features, act_scale,
              act_zero_point, act_qmax);
  const int64_t n = row_ptr.numel() - 1;
  TORCH_CHECK(group.scalar_type() == at::kShort && group.dim() == 1 &&
                  group.numel() * kGroup == values.numel(),
              op, ": `group` must be 1-D int16 with one entry per 4 values");
  const at::Tensor rp = row_ptr.contiguous();
  check_row_ptr(op, rp, group.numel(), "blocks");
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0 || n == 0) return y;
  const at::Tensor xc = x.contiguous(), gc = group.contiguous(), vc = values.contiguous();
  const at::Tensor rs = row_sum.contiguous(), sc = scale.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional(bias->contiguous()) : std::nullopt;
  const Epilogue ep = epilogue(sc, bc, act_scale, act_zero_point, act_qmax);
  block_impl(xc, rp.data_ptr<int64_t>(), gc.data_ptr<int16_t>(), vc.data_ptr<int8_t>(),
             rs.data_ptr<int32_t>(), ep, y);
  return y;
}

TORCH_LIBRARY_IMPL(lightning_compress, CPU, m) {
  m.impl("bitmask_dyn_linear", &bitmask_dyn_linear_cpu);
  m.impl("block_dyn_linear", &block_dyn_linear_cpu);
}

}  // namespace lightning_compress
