// The vector ISA the CPU kernels are compiled for, as a name. Every
// width-dependent part of the CPU backend (simd, kernels, the executor's
// templates) lives in an inline namespace of this name: translation units
// built for different ISAs (a user's own -march against the library's
// ATTNFUSE_ARCH_FLAGS) then never merge each other's inline functions, whose
// vector types and calling conventions differ, and a mismatch with the
// compiled kernels fails to link (an undefined reference to
// attnfuse::cpu::kernels::avx2::...) instead of running wrong code.
#pragma once

#if defined(__AVX512F__)
#define ATTNFUSE_CPU_ISA avx512
#elif defined(__AVX2__)
#define ATTNFUSE_CPU_ISA avx2
#else
#define ATTNFUSE_CPU_ISA baseline
#endif
