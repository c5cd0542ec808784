// cudaStream_t without the CUDA headers: the same declaration as CUDA's driver_types.h, so torch-free
// kernel interfaces can name a stream in translation units that never include CUDA.
#pragma once

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
