// Bit packing of boolean masks: eight mask entries per byte, least significant bit first.
// The packed artifact stores sparsity patterns this way (1 bit per weight).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace lightning_compress {

at::Tensor pack_bits_cpu(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pack_bits: `mask` must be bool, got ",
              mask.scalar_type());
  const at::Tensor flat = mask.contiguous().view(-1);
  const int64_t n = flat.numel();
  const int64_t n_bytes = (n + 7) / 8;
  at::Tensor out = at::empty({n_bytes}, mask.options().dtype(at::kByte));
  const bool* src = flat.data_ptr<bool>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n_bytes, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t base = b * 8;
      const int64_t count = std::min<int64_t>(8, n - base);
      uint8_t byte = 0;
      for (int64_t i = 0; i < count; ++i) {
        byte |= static_cast<uint8_t>(src[base + i]) << i;
      }
      dst[b] = byte;
    }
  });
  return out;
}

at::Tensor unpack_bits_cpu(const at::Tensor& packed, int64_t numel) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, "unpack_bits: `packed` must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() == 1, "unpack_bits: `packed` must be 1-D, got ", packed.dim(), "-D");
  TORCH_CHECK(numel >= 0 && (numel + 7) / 8 == packed.numel(), "unpack_bits: `numel`=", numel,
              " needs ", (numel + 7) / 8, " bytes, got ", packed.numel());
  const at::Tensor src_t = packed.contiguous();
  at::Tensor out = at::empty({numel}, packed.options().dtype(at::kBool));
  const uint8_t* src = src_t.data_ptr<uint8_t>();
  bool* dst = out.data_ptr<bool>();
  at::parallel_for(0, numel, 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dst[i] = (src[i >> 3] >> (i & 7)) & 1;
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(lightning_compress, CPU, m) {
  m.impl("pack_bits", &pack_bits_cpu);
  m.impl("unpack_bits", &unpack_bits_cpu);
}

}  // namespace lightning_compress
