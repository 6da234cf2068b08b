// Shared by the CPU kernels. The baseline build targets any x86-64 (SSE2); hot loops marked
// LC_SIMD_CLONES get an AVX2 clone as well, picked at load time by the CPU's features, and
// functions marked LC_AVX512 are called only where cpu_has_avx512() says so.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LC_X86 1
#define LC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define LC_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LC_SIMD_CLONES
#endif

namespace lightning_compress {

// LIGHTNING_COMPRESS_NO_AVX512 set to a non-empty value other than "0" turns every AVX-512 path
// off (tests use it to check the portable loops).
inline bool avx512_disabled() {
  const char* off = std::getenv("LIGHTNING_COMPRESS_NO_AVX512");
  return off != nullptr && off[0] != '\0' && std::strcmp(off, "0") != 0;
}

// AVX-512F/BW/VL, unless turned off.
inline bool cpu_has_avx512() {
#ifdef LC_X86
  static const bool has = [] {
    return !avx512_disabled() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }();
  return has;
#else
  return false;
#endif
}

// Column j of a compressed row: int16 positions hold columns up to 65535 as unsigned.
template <typename Idx>
inline int64_t col_at(const Idx* col, int64_t j) {
  if constexpr (std::is_same_v<Idx, int16_t>) {
    return static_cast<uint16_t>(col[j]);
  } else {
    return col[j];
  }
}

}  // namespace lightning_compress
