#pragma once
// One macro for code that both C++ backends compile: nvcc sees __host__
// __device__, the host compiler sees a plain inline function.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTREG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTREG_HOST_DEVICE inline
#endif
