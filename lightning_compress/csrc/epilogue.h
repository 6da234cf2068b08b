// The end of every linear path, on CPU and CUDA alike: y = dot * scale[r] + bias[r], then, when
// the layer was trained with quantized activations (act_scale > 0), fake quantization to
// [0, qmax] with that scale and zero point, computed as torch.fake_quantize_per_tensor_affine
// computes it (a NaN output stays NaN).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>

#ifdef __CUDACC__
#define LC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LC_HOST_DEVICE inline
#endif

namespace lightning_compress {

struct Epilogue {
  LC_HOST_DEVICE Epilogue(const float* scale_, const float* bias_, float act_scale_,
                          int64_t zero_point_, int64_t qmax_)
      : scale(scale_), bias(bias_), act_scale(act_scale_),
        inv(act_scale_ > 0.0f ? 1.0f / act_scale_ : 0.0f), zero_point(zero_point_), qmax(qmax_) {}

  const float* scale;
  const float* bias;
  float act_scale;
  float inv;
  int64_t zero_point;
  int64_t qmax;

  // Round half to even in the default rounding mode without a libm call on SSE2-only builds:
  // adding and removing 1.5 * 2^23 leaves the nearest integer for |v| < 2^22.
  static LC_HOST_DEVICE float round_even(float v) {
    constexpr float kMagic = 12582912.0f;
    return fabsf(v) < 4194304.0f ? (v + kMagic) - kMagic : nearbyintf(v);
  }

  LC_HOST_DEVICE float operator()(int64_t r, float dot) const {
    const float v = dot * scale[r] + (bias ? bias[r] : 0.0f);
    if (act_scale <= 0.0f) return v;
    // In float: zero point and levels are small integers, so every step but the rounding is
    // exact, and the product rounds once, as torch's double product cast to float does.
    const float zp = static_cast<float>(zero_point);
    const float top = static_cast<float>(qmax);
    const float level = round_even(v * inv) + zp;
    // std::min(std::max(level, 0), top), spelled out for device code.
    const float low = level < 0.0f ? 0.0f : level;
    const float q = top < low ? top : low;
    return (q - zp) * act_scale;
  }
};

// The epilogue of a layer with contiguous float32 `scale` [N] and `bias` [N] (or none).
inline Epilogue epilogue(const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                         double act_scale, int64_t zero_point, int64_t qmax) {
  return Epilogue(scale.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
                  static_cast<float>(act_scale), zero_point, qmax);
}

}  // namespace lightning_compress
