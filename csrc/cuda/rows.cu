// Launchers of the per-row kernels (rows.cuh): scores, row selection, parameter gradients.
#include "launch.cuh"

extern "C" cudaError_t spafl_cuda_row_scores(int dtype, const void* weight, const void* threshold, void* score,
                                             int64_t rows, int64_t fan_in, cudaStream_t stream) {
  return spafl::run_row_scores(spafl::DeviceExec{stream}, dtype, weight, threshold, score, rows, fan_in);
}

extern "C" cudaError_t spafl_cuda_select_rows(int dtype, const void* score, int64_t rows, int ste, int complement,
                                              int64_t* index, int64_t* count, cudaStream_t stream) {
  return spafl::run_select_rows(spafl::DeviceExec{stream}, dtype, score, rows, ste, complement, index, count);
}

extern "C" cudaError_t spafl_cuda_param_grads(int dtype, const void* score, int ste, const void* weight,
                                              const void* bias, const void* grad_y, void* dweight, void* dbias,
                                              void* dthreshold, int64_t rows, int64_t fan_in, int64_t outer,
                                              int64_t inner, cudaStream_t stream) {
  return spafl::run_param_grads(spafl::DeviceExec{stream}, dtype, score, ste, weight, bias, grad_y, dweight, dbias,
                                dthreshold, rows, fan_in, outer, inner);
}
