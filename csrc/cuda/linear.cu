// Launchers of the sparse Linear GEMMs (linear.cuh).
#include "launch.cuh"
#include "linear.cuh"

extern "C" cudaError_t spafl_cuda_linear_fwd(int dtype, const void* x, const void* weight, const void* bias,
                                             const int64_t* perm, const int64_t* count, void* y, int64_t M, int64_t N,
                                             int64_t K, cudaStream_t stream) {
  return spafl::run_linear_fwd(spafl::DeviceExec{stream}, dtype, x, weight, bias, perm, count, y, M, N, K);
}

extern "C" cudaError_t spafl_cuda_linear_dx(int dtype, const void* grad_y, const void* weight, const int64_t* active,
                                            const int64_t* count, void* dx, int64_t M, int64_t N, int64_t K,
                                            cudaStream_t stream) {
  return spafl::run_linear_dx(spafl::DeviceExec{stream}, dtype, grad_y, weight, active, count, dx, M, N, K);
}

extern "C" cudaError_t spafl_cuda_linear_dw(int dtype, const void* grad_y, const void* x, const int64_t* rows,
                                            const int64_t* count, void* dweight, int64_t M, int64_t N, int64_t K,
                                            cudaStream_t stream) {
  return spafl::run_linear_dw(spafl::DeviceExec{stream}, dtype, grad_y, x, rows, count, dweight, M, N, K);
}
