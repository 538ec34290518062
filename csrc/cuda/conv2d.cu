// Launchers of the sparse Conv2d implicit GEMMs (conv2d.cuh).
#include "conv2d.cuh"
#include "launch.cuh"

extern "C" cudaError_t spafl_cuda_conv2d_fwd(int dtype, const void* x, const void* weight, const void* bias,
                                             const int64_t* perm, const int64_t* count, void* y,
                                             const SpaflConvShape* shape, cudaStream_t stream) {
  return spafl::run_conv2d_fwd(spafl::DeviceExec{stream}, dtype, x, weight, bias, perm, count, y, shape);
}

extern "C" cudaError_t spafl_cuda_conv2d_dx(int dtype, const void* grad_y, const void* weight, const int64_t* active,
                                            const int64_t* count, void* dx, const SpaflConvShape* shape,
                                            cudaStream_t stream) {
  return spafl::run_conv2d_dx(spafl::DeviceExec{stream}, dtype, grad_y, weight, active, count, dx, shape);
}

extern "C" cudaError_t spafl_cuda_conv2d_dw(int dtype, const void* grad_y, const void* x, const int64_t* rows,
                                            const int64_t* count, void* dweight, const SpaflConvShape* shape,
                                            cudaStream_t stream) {
  return spafl::run_conv2d_dw(spafl::DeviceExec{stream}, dtype, grad_y, x, rows, count, dweight, shape);
}
