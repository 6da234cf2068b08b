// CUDA kernels of sparse_int_linear and int_linear (schemas in ../packed_linear.cpp): one warp
// per (output row, batch row), lanes striding over the row's weights, a warp-shuffle reduction,
// then the same epilogue as the CPU kernels (scale, bias, optional output fake quantization).
// Built only where a CUDA toolkit and a CUDA build of torch exist.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

namespace lightning_compress {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

struct EpilogueArgs {
  const float* scale;
  const float* bias;
  float act_scale;
  float act_inv;
  float zero_point;
  float qmax;
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float finish(const EpilogueArgs& ep, int64_t r, float dot) {
  float v = dot * ep.scale[r] + (ep.bias ? ep.bias[r] : 0.0f);
  if (ep.act_scale > 0.0f) {
    const float q = fminf(fmaxf(nearbyintf(v * ep.act_inv) + ep.zero_point, 0.0f), ep.qmax);
    v = (q - ep.zero_point) * ep.act_scale;
  }
  return v;
}

template <typename Idx>
__global__ void sparse_kernel(const float* __restrict__ x, const int64_t* __restrict__ row_ptr,
                              const Idx* __restrict__ col, const int8_t* __restrict__ val,
                              EpilogueArgs ep, float* __restrict__ y, int64_t batch, int64_t k,
                              int64_t n, bool narrow) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= batch * n) return;
  const int64_t b = warp / n;
  const int64_t r = warp % n;
  const float* xb = x + b * k;
  float sum = 0.0f;
  for (int64_t j = row_ptr[r] + lane; j < row_ptr[r + 1]; j += kWarp) {
    const int64_t c = narrow ? static_cast<int64_t>(static_cast<uint16_t>(col[j])) : col[j];
    sum += static_cast<float>(val[j]) * xb[c];
  }
  sum = warp_sum(sum);
  if (lane == 0) y[b * n + r] = finish(ep, r, sum);
}

__global__ void dense_kernel(const float* __restrict__ x, const uint8_t* __restrict__ w,
                             int64_t ldw, int bits, EpilogueArgs ep, float* __restrict__ y,
                             int64_t batch, int64_t k, int64_t n) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= batch * n) return;
  const int64_t b = warp / n;
  const int64_t r = warp % n;
  const float* xb = x + b * k;
  const uint8_t* row = w + r * ldw;
  float sum = 0.0f;
  for (int64_t i = lane; i < k; i += kWarp) {
    int q;
    if (bits == 8) {
      q = static_cast<int8_t>(row[i]);
    } else {
      const int nib = (i & 1) ? (row[i >> 1] >> 4) : (row[i >> 1] & 0xF);
      q = (nib ^ 8) - 8;
    }
    sum += static_cast<float>(q) * xb[i];
  }
  sum = warp_sum(sum);
  if (lane == 0) y[b * n + r] = finish(ep, r, sum);
}

EpilogueArgs epilogue(const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                      double act_scale, int64_t zero_point, int64_t qmax) {
  const float s = static_cast<float>(act_scale);
  return {scale.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr, s,
          s > 0.0f ? 1.0f / s : 0.0f, static_cast<float>(zero_point), static_cast<float>(qmax)};
}

int64_t blocks_for(int64_t warps) {
  return (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
}

void check_cuda(const char* op, const at::Tensor& x, const at::Tensor& scale,
                const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kFloat && x.dim() == 2, op,
              ": `x` must be a 2-D float32 CUDA tensor");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == n, op,
              ": `scale` must be float32 of shape [", n, "]");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == n), op,
              ": `bias` must be float32 of shape [", n, "]");
  TORCH_CHECK(scale.device() == x.device() && (!bias || bias->device() == x.device()), op,
              ": `scale` and `bias` must be on ", x.device());
}

void check_device(const char* op, const at::Tensor& x, std::initializer_list<at::Tensor> ts) {
  for (const at::Tensor& t : ts) {
    TORCH_CHECK(t.device() == x.device(), op, ": every weight tensor must be on ", x.device(),
                ", got one on ", t.device());
  }
}

}  // namespace

at::Tensor sparse_int_linear_cuda(const at::Tensor& x, const at::Tensor& row_ptr,
                                  const at::Tensor& col, const at::Tensor& values,
                                  const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                                  int64_t in_features, double act_scale, int64_t act_zero_point,
                                  int64_t act_qmax) {
  const char* op = "sparse_int_linear";
  const int64_t n = row_ptr.numel() - 1;
  check_cuda(op, x, scale, bias, n);
  TORCH_CHECK(x.size(1) == in_features, op, ": `x` has ", x.size(1), " features, the layer ",
              in_features);
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && values.scalar_type() == at::kChar, op,
              ": `row_ptr` must be int64 and `values` int8");
  const bool narrow = col.scalar_type() == at::kShort;
  TORCH_CHECK(narrow || col.scalar_type() == at::kInt, op, ": `col` must be int16 or int32");
  TORCH_CHECK(col.numel() == values.numel() && (!narrow || in_features <= 65536), op,
              ": `col` must hold one column per value (int16 only below 65537 inputs)");
  check_device(op, x, {row_ptr, col, values});
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), rp = row_ptr.contiguous(), cc = col.contiguous();
  const at::Tensor vc = values.contiguous(), sc = scale.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional(bias->contiguous()) : std::nullopt;
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  const int64_t warps = x.size(0) * n;
  if (warps == 0) return y;
  const EpilogueArgs ep = epilogue(sc, bc, act_scale, act_zero_point, act_qmax);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(blocks_for(warps)));
  const dim3 block(kWarp * kWarpsPerBlock);
  if (narrow) {
    sparse_kernel<int16_t><<<grid, block, 0, stream>>>(
        xc.data_ptr<float>(), rp.data_ptr<int64_t>(), cc.data_ptr<int16_t>(),
        vc.data_ptr<int8_t>(), ep, y.data_ptr<float>(), x.size(0), x.size(1), n, true);
  } else {
    sparse_kernel<int32_t><<<grid, block, 0, stream>>>(
        xc.data_ptr<float>(), rp.data_ptr<int64_t>(), cc.data_ptr<int32_t>(),
        vc.data_ptr<int8_t>(), ep, y.data_ptr<float>(), x.size(0), x.size(1), n, false);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor int_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const std::optional<at::Tensor>& bias, int64_t bits, double act_scale,
                           int64_t act_zero_point, int64_t act_qmax) {
  const char* op = "int_linear";
  TORCH_CHECK(bits == 8 || bits == 4, op, ": `bits` must be 8 or 4, got ", bits);
  const int64_t n = qweight.size(0);
  check_cuda(op, x, scale, bias, n);
  const int64_t k = x.size(1);
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == (bits == 8 ? k : (k + 1) / 2) &&
                  qweight.element_size() == 1,
              op, ": `qweight` must be [N, ", bits == 8 ? k : (k + 1) / 2, "] of bytes at ", bits,
              " bits, got ", qweight.sizes());
  check_device(op, x, {qweight});
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = qweight.contiguous(), sc = scale.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional(bias->contiguous()) : std::nullopt;
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  const int64_t warps = x.size(0) * n;
  if (warps == 0) return y;
  const EpilogueArgs ep = epilogue(sc, bc, act_scale, act_zero_point, act_qmax);
  dense_kernel<<<dim3(static_cast<unsigned>(blocks_for(warps))), dim3(kWarp * kWarpsPerBlock), 0,
                 c10::cuda::getCurrentCUDAStream()>>>(
      xc.data_ptr<float>(), static_cast<const uint8_t*>(wc.data_ptr()), wc.size(1),
      static_cast<int>(bits), ep, y.data_ptr<float>(), x.size(0), k, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

TORCH_LIBRARY_IMPL(lightning_compress, CUDA, m) {
  m.impl("sparse_int_linear", &sparse_int_linear_cuda);
  m.impl("int_linear", &int_linear_cuda);
}

}  // namespace lightning_compress
