// CUDA kernels of sparse_int_linear and int_linear (schemas in lightning_compress/ops/_library.py):
// one warp per (output row, batch row), lanes striding over the row's weights, a warp-shuffle
// reduction, then the CPU kernels' epilogue (../epilogue.h: scale, bias, optional output fake
// quantization). Built only where a CUDA toolkit and a CUDA build of torch exist.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../epilogue.h"

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <type_traits>

namespace lightning_compress {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// One lane's share of row r's dot product with the batch row xb: every kWarp-th non-zero.
template <typename Idx>
struct SparseRow {
  const int64_t* row_ptr;
  const Idx* col;
  const int8_t* val;

  __device__ __forceinline__ float operator()(const float* __restrict__ xb, int64_t r,
                                              int lane) const {
    float sum = 0.0f;
    for (int64_t j = row_ptr[r] + lane; j < row_ptr[r + 1]; j += kWarp) {
      // int16 indices hold uint16 columns (up to 65536 inputs).
      const int64_t c = std::is_same<Idx, int16_t>::value
                            ? static_cast<int64_t>(static_cast<uint16_t>(col[j]))
                            : static_cast<int64_t>(col[j]);
      sum += static_cast<float>(val[j]) * xb[c];
    }
    return sum;
  }
};

// The same for a dense row of int8, or of int4 two per byte (low nibble the even column).
struct DenseRow {
  const uint8_t* w;
  int64_t ldw;
  int64_t k;
  int bits;

  __device__ __forceinline__ float operator()(const float* __restrict__ xb, int64_t r,
                                              int lane) const {
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
    return sum;
  }
};

// y [batch, n]: warp (b, r) sums its lanes' shares of row r with batch row b, lane 0 finishes.
template <typename Row>
__global__ void linear_kernel(const float* __restrict__ x, Row row, Epilogue ep,
                              float* __restrict__ y, int64_t batch, int64_t k, int64_t n) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= batch * n) return;
  const int64_t b = warp / n;
  const int64_t r = warp % n;
  const float sum = warp_sum(row(x + b * k, r, lane));
  if (lane == 0) y[b * n + r] = ep(r, sum);
}

// y = epilogue(x @ rows^T) for contiguous x [batch, k] and y [batch, n] on the current stream.
template <typename Row>
void launch(const at::Tensor& x, Row row, const Epilogue& ep, at::Tensor& y) {
  const int64_t warps = y.numel();
  if (warps == 0) return;
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  linear_kernel<Row><<<dim3(static_cast<unsigned>(blocks)), dim3(kWarp * kWarpsPerBlock), 0,
                       c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), row, ep, y.data_ptr<float>(), x.size(0), x.size(1), y.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const Epilogue ep = epilogue(sc, bc, act_scale, act_zero_point, act_qmax);
  const int64_t* rpp = rp.data_ptr<int64_t>();
  const int8_t* vp = vc.data_ptr<int8_t>();
  if (narrow) {
    launch(xc, SparseRow<int16_t>{rpp, cc.data_ptr<int16_t>(), vp}, ep, y);
  } else {
    launch(xc, SparseRow<int32_t>{rpp, cc.data_ptr<int32_t>(), vp}, ep, y);
  }
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
  const Epilogue ep = epilogue(sc, bc, act_scale, act_zero_point, act_qmax);
  launch(xc, DenseRow{static_cast<const uint8_t*>(wc.data_ptr()), wc.size(1), k,
                      static_cast<int>(bits)}, ep, y);
  return y;
}

TORCH_LIBRARY_IMPL(lightning_compress, CUDA, m) {
  m.impl("sparse_int_linear", &sparse_int_linear_cuda);
  m.impl("int_linear", &int_linear_cuda);
}

}  // namespace lightning_compress
