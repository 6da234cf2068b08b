// Per-output-channel symmetric fake quantization of a weight in two passes: each row's largest
// magnitude gives its scale (max|w| / qmax), then every weight becomes
// clamp(nearbyint(w / scale), -qmax, qmax) * scale. Rounding is half to even, like torch.round,
// so the result is bit-identical to the pure-PyTorch reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace lightning_compress {

constexpr float kMinScale = 1e-12f;

LC_SIMD_CLONES float row_absmax(const float* __restrict__ w, int64_t n) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {0.0f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] = std::max(acc[j], std::fabs(w[i + j]));
  }
  for (; i < n; ++i) acc[0] = std::max(acc[0], std::fabs(w[i]));
  float peak = 0.0f;
  for (int j = 0; j < kLanes; ++j) peak = std::max(peak, acc[j]);
  return peak;
}

LC_SIMD_CLONES void row_quantize(const float* __restrict__ w, float* __restrict__ out, int64_t n,
                                 float scale, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    const float q = std::nearbyint(w[i] / scale);
    out[i] = std::min(std::max(q, -qmax), qmax) * scale;
  }
}

std::tuple<at::Tensor, at::Tensor> fake_quant_rows_cpu(const at::Tensor& weight, int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "fake_quant_rows: `bits` must be in [2, 8], got ", bits);
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "fake_quant_rows: `weight` must be float32, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() >= 1, "fake_quant_rows: `weight` needs an output-channel dimension");
  const at::Tensor w = weight.contiguous();
  const int64_t rows = w.size(0);
  const int64_t cols = rows ? w.numel() / rows : 0;
  at::Tensor out = at::empty_like(w);
  at::Tensor scale = at::empty({rows}, w.options());
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  float* sc = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float s = std::max(row_absmax(src + r * cols, cols), kMinScale) / qmax;
      sc[r] = s;
      row_quantize(src + r * cols, dst + r * cols, cols, s, qmax);
    }
  });
  return {out, scale};
}

TORCH_LIBRARY_IMPL(lightning_compress, CPU, m) { m.impl("fake_quant_rows", &fake_quant_rows_cpu); }

}  // namespace lightning_compress
