// fastnode::finish_control on CUDA: solution, per-group error ratio, finiteness and the controller in two kernels
// on the current stream, with no host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "cuda_common.cuh"

namespace fastnode {
namespace {

// One element of pass 1: writes y_new[i], adds the squared scaled error to its segments' sums, and returns whether
// y_new + k_last is finite.
template <typename T>
__device__ __forceinline__ bool finish_element(const T* __restrict__ y, T hr, const Stages<T>& sb, const Stages<T>& se,
                                               const T* __restrict__ klast, const T* __restrict__ rt,
                                               int64_t r_stride, T rtol, const T* __restrict__ at, int64_t a_stride,
                                               T atol, const Segments& seg, int64_t r, int64_t c, int64_t N,
                                               T* __restrict__ y_new, double* local) {
  const int64_t i = r * N + c;
  const T yv = y[i];
  const T ynv = sb.n == 0 ? yv : yv + hr * lincomb(sb, i);
  y_new[i] = ynv;
  const T rtv = rt ? rt[r * r_stride + c] : rtol;
  const T atv = at ? at[r * a_stride + c] : atol;
  const T scale = fmax(fabs(yv), fabs(ynv)) * rtv + atv;
  const T x = (lincomb(se, i) * hr) / scale;
  for (int s = 0; s < seg.n; ++s)
    if (seg.lo[s] <= c && c < seg.hi[s]) local[s] += static_cast<double>(x) * static_cast<double>(x);
  return isfinite(ynv + klast[i]);
}

// Pass 1 for narrow rows (N <= kWarpRowMax: per-sample states): one warp per row, the lanes across its columns, the
// sums reduced by shuffles in a fixed order (one column block: nb = 1). The block-per-row kernel below would leave
// most of its 256 threads idle on such rows.
constexpr int64_t kWarpRowMax = 256;

template <typename T>
__global__ void finish_pass1_warp_kernel(const T* __restrict__ y, const T* __restrict__ h, Stages<T> sb,
                                         Stages<T> se, const T* __restrict__ klast, const T* __restrict__ rt,
                                         int64_t r_stride, T rtol, const T* __restrict__ at, int64_t a_stride,
                                         T atol, Segments seg, int64_t G, int64_t N, T* __restrict__ y_new,
                                         double* __restrict__ part, int* __restrict__ bad) {
  const int lane = threadIdx.x & 31;
  const int64_t per_block = blockDim.x / 32;
  // r is the same for the 32 lanes of a warp, so every shuffle below runs with the whole warp.
  for (int64_t r = blockIdx.x * per_block + threadIdx.x / 32; r < G; r += static_cast<int64_t>(gridDim.x) * per_block) {
    double local[kMaxSegments];
    for (int s = 0; s < seg.n; ++s) local[s] = 0.0;
    bool fin = true;
    const T hr = h[r];
    for (int64_t c = lane; c < N; c += 32)
      fin = finish_element(y, hr, sb, se, klast, rt, r_stride, rtol, at, a_stride, atol, seg, r, c, N, y_new, local) &&
            fin;
    const bool all_fin = __all_sync(0xffffffffu, fin);
    for (int s = 0; s < seg.n; ++s) {
      double v = local[s];
      for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) part[r * seg.n + s] = v;
    }
    if (lane == 0 && !all_fin) bad[r] = 1;
  }
}

// Pass 1 of finish_control: y_new for every element; per (row, segment, column block) the sum of squares of the
// scaled error, reduced in shared memory in a fixed tree and stored (not added atomically: pass 2 adds the column
// blocks in order, so the sum is the same on every run); a per-row flag for non-finite y_new + k_last.
template <typename T>
__global__ void finish_pass1_kernel(const T* __restrict__ y, const T* __restrict__ h, Stages<T> sb, Stages<T> se,
                                    const T* __restrict__ klast, const T* __restrict__ rt, int64_t r_stride,
                                    T rtol, const T* __restrict__ at, int64_t a_stride, T atol, Segments seg,
                                    int64_t G, int64_t N, T* __restrict__ y_new, double* __restrict__ part,
                                    int* __restrict__ bad) {
  __shared__ double red[kThreads];
  for (int64_t r = blockIdx.y; r < G; r += gridDim.y) {
    double local[kMaxSegments];
    for (int s = 0; s < seg.n; ++s) local[s] = 0.0;
    bool fin = true;
    const T hr = h[r];
    for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < N;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x)
      fin = finish_element(y, hr, sb, se, klast, rt, r_stride, rtol, at, a_stride, atol, seg, r, c, N, y_new, local) &&
            fin;
    if (!fin) atomicExch(&bad[r], 1);
    for (int s = 0; s < seg.n; ++s) {
      red[threadIdx.x] = local[s];
      __syncthreads();
      for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
        __syncthreads();
      }
      if (threadIdx.x == 0) part[(r * gridDim.x + blockIdx.x) * seg.n + s] = red[0];
      __syncthreads();
    }
  }
}

// Pass 2: one thread per row: the ratio (max over segments of the RMS, the floor, inf when non-finite) and the
// controller's decision, with the same formulas as the CPU implementation (common.h).
__global__ void finish_pass2_kernel(const double* __restrict__ part, int64_t nb, const int* __restrict__ bad,
                                    Segments seg,
                                    const double* __restrict__ floor, const double* __restrict__ h_ctl,
                                    const double* __restrict__ prev, const bool* __restrict__ running, CtrlCfg cfg,
                                    int64_t G, double* __restrict__ ratio, bool* __restrict__ ok,
                                    bool* __restrict__ accept, double* __restrict__ h_next,
                                    double* __restrict__ prev_out) {
  // Grid-stride: the grid is capped at 65535 blocks (blocks_for), rows past it are taken by the same threads.
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < G;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double rr = 0.0;
    for (int s = 0; s < seg.n; ++s) {
      double sq = 0.0;
      for (int64_t b = 0; b < nb; ++b) sq += part[(r * nb + b) * seg.n + s];  // column blocks in order
      const double v = sqrt(sq / static_cast<double>(seg.hi[s] - seg.lo[s]));
      rr = (isnan(v) || v > rr) ? v : rr;
    }
    if (floor) rr = (isnan(floor[r]) || floor[r] > rr) ? floor[r] : rr;
    const bool fin = bad[r] == 0;
    if (!fin) rr = INFINITY;
    ratio[r] = rr;
    ok[r] = fin;
    control_one(cfg, h_ctl[r], rr, prev[r], running[r], &accept[r], &h_next[r], &prev_out[r]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_control_cuda(
    const at::Tensor& y_in, at::TensorList K, const at::Tensor& h_in, at::ArrayRef<double> b,
    at::ArrayRef<double> e, const c10::optional<at::Tensor>& rtol_t, double rtol,
    const c10::optional<at::Tensor>& atol_t, double atol, at::IntArrayRef segments, const at::Tensor& h_ctl,
    const at::Tensor& prev, const at::Tensor& running, const c10::optional<at::Tensor>& floor_in,
    at::ArrayRef<double> ctrl) {
  const CtrlCfg cfg = check_finish_control(y_in, K, h_in, b, e, rtol_t, atol_t, segments, h_ctl, prev, running,
                                           floor_in, ctrl);
  TORCH_CHECK(K.size() <= kMaxStages, "fastnode.finish_control: at most ", kMaxStages, " stages on CUDA");
  TORCH_CHECK(segments.size() / 2 <= kMaxSegments, "fastnode.finish_control: at most ", kMaxSegments,
              " norm segments on CUDA");
  const int64_t G = y_in.size(0), N = y_in.size(1);
  const c10::cuda::CUDAGuard guard(y_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();

  auto y = y_in.contiguous();
  auto h = h_in.contiguous();
  auto Kc = contiguous(K);
  auto rt = rtol_t.has_value() ? rtol_t->contiguous() : at::Tensor();
  auto at_ = atol_t.has_value() ? atol_t->contiguous() : at::Tensor();
  Segments seg{};
  seg.n = static_cast<int>(segments.size() / 2);
  for (int s = 0; s < seg.n; ++s) {
    seg.lo[s] = segments[2 * s];
    seg.hi[s] = segments[2 * s + 1];
  }
  auto dopt = y.options().dtype(at::kDouble);
  auto y_new = at::empty_like(y);
  // Pass 1's grid: nb column blocks per row (each block's partial sums stored apart, see finish_pass1_kernel); one
  // warp per row and nb = 1 for narrow rows (finish_pass1_warp_kernel).
  const bool narrow = N <= kWarpRowMax;
  const int64_t nb = narrow ? 1 : std::max<int64_t>(1, std::min<int64_t>((N + kThreads - 1) / kThreads, 1024));
  auto part = at::zeros({G, nb, seg.n}, dopt);
  auto bad = at::zeros({G}, y.options().dtype(at::kInt));
  if (G * N > 0) {
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "finish_control_cuda", [&] {
      using T = scalar_t;
      auto sb = pack_stages<T>(Kc, b);
      auto se = pack_stages<T>(Kc, e);
      const int64_t r_stride = rt.defined() && rt.size(0) > 1 ? N : 0;
      const int64_t a_stride = at_.defined() && at_.size(0) > 1 ? N : 0;
      const T* rtp = rt.defined() ? rt.data_ptr<T>() : nullptr;
      const T* atp = at_.defined() ? at_.data_ptr<T>() : nullptr;
      if (narrow) {
        // kThreads / 32 rows per block; rows past the 65,535-block grid are taken by the grid-stride loop.
        finish_pass1_warp_kernel<T><<<blocks_for(G * 32), kThreads, 0, stream>>>(
            y.data_ptr<T>(), h.data_ptr<T>(), sb, se, Kc.back().data_ptr<T>(), rtp, r_stride, static_cast<T>(rtol),
            atp, a_stride, static_cast<T>(atol), seg, G, N, y_new.data_ptr<T>(), part.data_ptr<double>(),
            bad.data_ptr<int>());
      } else {
        const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(std::min<int64_t>(G, 65535)));
        finish_pass1_kernel<T><<<grid, kThreads, 0, stream>>>(
            y.data_ptr<T>(), h.data_ptr<T>(), sb, se, Kc.back().data_ptr<T>(), rtp, r_stride, static_cast<T>(rtol),
            atp, a_stride, static_cast<T>(atol), seg, G, N, y_new.data_ptr<T>(), part.data_ptr<double>(),
            bad.data_ptr<int>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto ratio = at::empty({G}, dopt);
  auto ok = at::empty({G}, y.options().dtype(at::kBool));
  auto accept = at::empty({G}, y.options().dtype(at::kBool));
  auto h_next = at::empty({G}, dopt);
  auto prev_out = at::empty({G}, dopt);
  auto fl = floor_in.has_value() ? floor_in->contiguous() : at::Tensor();
  auto hc = h_ctl.contiguous();
  auto pv = prev.contiguous();
  auto rn = running.contiguous();
  if (G > 0) {
    finish_pass2_kernel<<<blocks_for(G), kThreads, 0, stream>>>(
        part.data_ptr<double>(), nb, bad.data_ptr<int>(), seg, fl.defined() ? fl.data_ptr<double>() : nullptr,
        hc.data_ptr<double>(), pv.data_ptr<double>(), rn.data_ptr<bool>(), cfg, G, ratio.data_ptr<double>(),
        ok.data_ptr<bool>(), accept.data_ptr<bool>(), h_next.data_ptr<double>(), prev_out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {y_new, ratio, ok, accept, h_next, prev_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, CUDA, m) { m.impl("finish_control", &finish_control_cuda); }

}  // namespace fastnode
