// The straight-through estimators as every native op and kernel takes them (`int ste`): the codes of
// spafl_kernels.semantics.STE_CODES (a name's index in semantics.STES). Plain C with no includes, so that
// the CUDA launchers (cuda/spafl_cuda.h, compiled by nvcc alone) and the CPU kernels (cpu/rows.h) share it.
#pragma once

typedef enum SpaflSte { SPAFL_STE_IDENTITY = 0, SPAFL_STE_OUTER = 1, SPAFL_STE_CLIPPED = 2 } SpaflSte;
