// fastnode::adjoint_weights on CUDA: the parameter adjoint's per-sample quadrature weights [S, G].
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
__global__ void adjoint_weights_kernel(const T* __restrict__ h, const bool* __restrict__ acc, Stages<T> b,
                                       int64_t G, T* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= G * b.n) return;
  const int64_t j = i / G, g = i % G;
  out[i] = (acc[g] ? h[g] : T(0)) * b.w[j];
}

at::Tensor adjoint_weights_cuda(const at::Tensor& h_in, const at::Tensor& accept_in, at::ArrayRef<double> b) {
  TORCH_CHECK(h_in.dim() == 1 && (h_in.scalar_type() == at::kFloat || h_in.scalar_type() == at::kDouble),
              "fastnode.adjoint_weights: h must be a float32/float64 [G] tensor");
  check_rows(accept_in, h_in, at::kBool, "accept", "adjoint_weights");
  TORCH_CHECK(b.size() <= kMaxStages, "fastnode.adjoint_weights: at most ", kMaxStages, " stages on CUDA");
  const c10::cuda::CUDAGuard guard(h_in.device());
  auto h = h_in.contiguous();
  auto acc = accept_in.contiguous();
  const int64_t G = h.size(0), S = static_cast<int64_t>(b.size());
  auto out = at::empty({S, G}, h.options());
  if (S * G == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "adjoint_weights_cuda", [&] {
    Stages<scalar_t> st{};
    st.n = static_cast<int>(S);
    for (int64_t j = 0; j < S; ++j) st.w[j] = static_cast<scalar_t>(b[j]);
    adjoint_weights_kernel<scalar_t><<<blocks_for(S * G), kThreads, 0, stream>>>(
        h.data_ptr<scalar_t>(), acc.data_ptr<bool>(), st, G, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CUDA, m) { m.impl("adjoint_weights", &adjoint_weights_cuda); }

}  // namespace fastnode
