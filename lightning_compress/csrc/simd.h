// Shared by the CPU kernels. The baseline build targets any x86-64 (SSE2); hot loops marked
// LC_SIMD_CLONES get an AVX2 clone as well, picked at load time by the CPU's features.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LC_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LC_SIMD_CLONES
#endif
