// fastnode::rk_combine on CUDA: y + h * sum_j w_j K[j] (stage inputs and solutions of the adjoint's augmented
// state), one grid-stride kernel on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "cuda_common.cuh"

namespace fastnode {
namespace {

template <typename T>
__global__ void rk_combine_kernel(const T* __restrict__ y, const T* __restrict__ h, Stages<T> st, int64_t G,
                                  int64_t N, T* __restrict__ out) {
  const int64_t total = G * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / N;
    out[i] = st.n == 0 ? y[i] : y[i] + h[r] * lincomb(st, i);
  }
}

at::Tensor rk_combine_cuda(const at::Tensor& y_in, at::TensorList K, const at::Tensor& h_in, at::ArrayRef<double> w) {
  check_stages(y_in, K, w.size(), "rk_combine");
  check_rows(h_in, y_in, y_in.scalar_type(), "h", "rk_combine");
  TORCH_CHECK(w.size() <= kMaxStages, "fastnode.rk_combine: at most ", kMaxStages, " stages on CUDA");
  const c10::cuda::CUDAGuard guard(y_in.device());
  auto y = y_in.contiguous();
  auto h = h_in.contiguous();
  auto Kc = contiguous(K);
  auto out = at::empty_like(y);
  const int64_t G = y.size(0), N = y.size(1);
  if (G * N == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "rk_combine_cuda", [&] {
    auto st = pack_stages<scalar_t>(Kc, w);
    rk_combine_kernel<scalar_t><<<blocks_for(G * N), kThreads, 0, stream>>>(
        y.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), st, G, N, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CUDA, m) { m.impl("rk_combine", &rk_combine_cuda); }

}  // namespace fastnode
