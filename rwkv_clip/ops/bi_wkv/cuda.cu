// Bi-WKV CUDA kernel (DESIGN §2). The same algorithm as cpu.cpp, with one block per (b, h) and one
// thread per lane: each thread keeps its column of the N×N state (NP floats) in registers for the
// whole scan, and the per-row inputs of TC tokens at a time are staged in shared memory.
//
// Exclusive sweep (see cpu.cpp): for each token t in scan order
//     out_t[lane] = Σ_a q_t[a] · M[a];     M[a] = dec · M[a] + x_t[a] · z_t[lane]
// with the decay per row (F-sweep) or per lane (R-sweep).
//   forward  y  = F(q=r,  x=k,  z=v)  left + right
//   backward gv = F(q=k,  x=r,  z=gy) left + right
//            gr = R(q=gy, x=v,  z=k)  left + right
//            gk = R(q=v,  x=gy, z=r)  left + right,  plus d·∂L/∂d from prefix/suffix sums
// Inputs r, k, v, gy are read in their own dtype (fp32 / bf16 / fp16); d and all outputs are fp32.
// No compile-time T; NP (padded head size) is a template parameter dispatched at runtime.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10 headers only: ATen/cuda/CUDAContext.h would need the cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

namespace {

constexpr int TC = 16;  // tokens staged in shared memory per chunk

template <typename T>
__device__ __forceinline__ float ld(const T* p) { return static_cast<float>(*p); }

struct Smem {
  float* q;  // [TC][NP] row inputs
  float* x;
  float* d;  // row decay (F-sweep) or lane decay (R-sweep)
  float* z;  // [TC][NP] lane input
};

// One exclusive sweep over L tokens of one (b, h). Row/lane pointers are at the head's first token;
// rs is the stride between tokens. post(t, out) runs on every lane < N, in scan order.
template <int NP, bool kDecayOnLanes, typename T, typename Post>
__device__ __forceinline__ void sweep(const T* __restrict__ q, const T* __restrict__ x, const T* __restrict__ z,
                                      const float* __restrict__ dec, int L, int64_t rs, int N, bool reverse,
                                      const Smem& sm, Post post) {
  const int lane = threadIdx.x;
  const bool active = lane < N;
  float M[NP];
#pragma unroll
  for (int a = 0; a < NP; ++a) M[a] = 0.f;
  for (int c = 0; c < L; c += TC) {
    const int n = min(TC, L - c);
    __syncthreads();  // the previous chunk has been consumed
    for (int i = 0; i < n; ++i) {
      const int64_t o = (reverse ? (L - 1 - (c + i)) : (c + i)) * rs + lane;
      sm.q[i * NP + lane] = active ? ld(q + o) : 0.f;
      sm.x[i * NP + lane] = active ? ld(x + o) : 0.f;
      sm.z[i * NP + lane] = active ? ld(z + o) : 0.f;
      sm.d[i * NP + lane] = active ? dec[o] : 0.f;
    }
    __syncthreads();
    for (int i = 0; i < n; ++i) {
      const float* qi = sm.q + i * NP;
      const float* xi = sm.x + i * NP;
      const float* di = sm.d + i * NP;
      const float zt = sm.z[i * NP + lane];
      const float dl = di[lane];
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int a = 0; a < NP; a += 4) {
        const float4 q4 = *reinterpret_cast<const float4*>(qi + a);  // broadcast reads
        const float4 x4 = *reinterpret_cast<const float4*>(xi + a);
        float4 d4;
        if constexpr (kDecayOnLanes) d4 = make_float4(dl, dl, dl, dl);
        else d4 = *reinterpret_cast<const float4*>(di + a);
        acc[0] += q4.x * M[a + 0];  M[a + 0] = d4.x * M[a + 0] + x4.x * zt;
        acc[1] += q4.y * M[a + 1];  M[a + 1] = d4.y * M[a + 1] + x4.y * zt;
        acc[2] += q4.z * M[a + 2];  M[a + 2] = d4.z * M[a + 2] + x4.z * zt;
        acc[3] += q4.w * M[a + 3];  M[a + 3] = d4.w * M[a + 3] + x4.w * zt;
      }
      if (active) post(reverse ? (L - 1 - (c + i)) : (c + i), (acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
  }
}

template <int NP>
__device__ __forceinline__ Smem make_smem(float* buf) {
  return Smem{buf, buf + TC * NP, buf + 2 * TC * NP, buf + 3 * TC * NP};
}

template <typename T, int NP>
__global__ void __launch_bounds__(NP) fwd_kernel(const T* __restrict__ r, const T* __restrict__ k,
                                                 const T* __restrict__ v, const float* __restrict__ d,
                                                 float* __restrict__ y, int L, int H, int N) {
  __shared__ __align__(16) float buf[4 * TC * NP];
  const Smem sm = make_smem<NP>(buf);
  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const int64_t rs = int64_t(H) * N, base = int64_t(b) * L * rs + int64_t(h) * N;
  float* yb = y + base + threadIdx.x;
  // rows = key channel i (r, k, d), lanes = value channel j (v)
  sweep<NP, false>(r + base, k + base, v + base, d + base, L, rs, N, false, sm,
                   [&](int t, float o) { yb[t * rs] = o; });
  sweep<NP, false>(r + base, k + base, v + base, d + base, L, rs, N, true, sm,
                   [&](int t, float o) { yb[t * rs] += o; });
}

template <typename T, int NP>
__global__ void __launch_bounds__(NP) bwd_kernel(const T* __restrict__ r, const T* __restrict__ k,
                                                 const T* __restrict__ v, const float* __restrict__ d,
                                                 const T* __restrict__ gy, float* __restrict__ gr,
                                                 float* __restrict__ gk, float* __restrict__ gv,
                                                 float* __restrict__ dgd, int L, int H, int N) {
  __shared__ __align__(16) float buf[4 * TC * NP];
  const Smem sm = make_smem<NP>(buf);
  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const int64_t rs = int64_t(H) * N, base = int64_t(b) * L * rs + int64_t(h) * N;
  const int64_t lane = base + threadIdx.x;  // this thread's element of token 0
  const T *rb = r + base, *kb = k + base, *vb = v + base, *gb = gy + base;
  const float* db = d + base;

  // gv: lanes = value channel j; rows = key channel i.
  sweep<NP, false>(kb, rb, gb, db, L, rs, N, true, sm, [&](int t, float o) { gv[lane + t * rs] = o; });
  sweep<NP, false>(kb, rb, gb, db, L, rs, N, false, sm, [&](int t, float o) { gv[lane + t * rs] += o; });

  // gr, gk: lanes = key channel i; rows = value channel j; decay on lanes. See cpu.cpp for dgd.
  // 1) gkL
  sweep<NP, true>(vb, gb, rb, db, L, rs, N, true, sm, [&](int t, float o) { gk[lane + t * rs] = o; });
  // 2) grL and the left-pair part of dgd
  float pk = 0.f, pr = 0.f;
  sweep<NP, true>(gb, vb, kb, db, L, rs, N, false, sm, [&](int t, float o) {
    const int64_t e = lane + t * rs;
    pr += ld(r + e) * o;
    dgd[e] = pk - pr;
    pk += ld(k + e) * gk[e];
    gr[e] = o;
  });
  // 3) gkR; dgd -= Σ_{s≤t} k_s gkR_s
  float pkr = 0.f;
  sweep<NP, true>(vb, gb, rb, db, L, rs, N, false, sm, [&](int t, float o) {
    const int64_t e = lane + t * rs;
    pkr += ld(k + e) * o;
    dgd[e] -= pkr;
    gk[e] += o;
  });
  // 4) grR; dgd += total − Σ_{τ≥t} r_τ grR_τ
  float sr = 0.f;
  sweep<NP, true>(gb, vb, kb, db, L, rs, N, true, sm, [&](int t, float o) {
    const int64_t e = lane + t * rs;
    sr += ld(r + e) * o;
    dgd[e] += pkr - sr;
    gr[e] += o;
  });
}

// Supported padded head sizes; N is rounded up to the next one (lanes >= N are masked).
#define BI_WKV_DISPATCH_NP(N, ...)                                                   \
  [&] {                                                                              \
    if ((N) <= 32) { constexpr int NP = 32; return __VA_ARGS__(); }                  \
    if ((N) <= 64) { constexpr int NP = 64; return __VA_ARGS__(); }                  \
    if ((N) <= 80) { constexpr int NP = 80; return __VA_ARGS__(); }                  \
    if ((N) <= 96) { constexpr int NP = 96; return __VA_ARGS__(); }                  \
    if ((N) <= 128) { constexpr int NP = 128; return __VA_ARGS__(); }                \
    TORCH_CHECK(false, "bi_wkv CUDA kernel supports head size N <= 128, got ", N);   \
  }()

// fp32 / fp16 / bf16 inputs (the Python side never sends fp64 to CUDA)
#define BI_WKV_DISPATCH_DTYPE(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

}  // namespace

at::Tensor bi_wkv_cuda_forward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& d) {
  const c10::cuda::CUDAGuard guard(r.device());
  const int B = r.size(0), L = r.size(1), H = r.size(2), N = r.size(3);
  auto y = at::empty(r.sizes(), r.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  BI_WKV_DISPATCH_DTYPE(r.scalar_type(), "bi_wkv_cuda_forward", [&] {
    BI_WKV_DISPATCH_NP(N, [&] {
      fwd_kernel<scalar_t, NP><<<B * H, NP, 0, stream>>>(r.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                                         v.data_ptr<scalar_t>(), d.data_ptr<float>(),
                                                         y.data_ptr<float>(), L, H, N);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::vector<at::Tensor> bi_wkv_cuda_backward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& d, const at::Tensor& gy) {
  const c10::cuda::CUDAGuard guard(r.device());
  const int B = r.size(0), L = r.size(1), H = r.size(2), N = r.size(3);
  auto opts = r.options().dtype(at::kFloat);
  auto gr = at::empty(r.sizes(), opts), gk = at::empty(r.sizes(), opts), gv = at::empty(r.sizes(), opts),
       dgd = at::empty(r.sizes(), opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  BI_WKV_DISPATCH_DTYPE(r.scalar_type(), "bi_wkv_cuda_backward", [&] {
    BI_WKV_DISPATCH_NP(N, [&] {
      bwd_kernel<scalar_t, NP><<<B * H, NP, 0, stream>>>(
          r.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), d.data_ptr<float>(),
          gy.data_ptr<scalar_t>(), gr.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>(),
          dgd.data_ptr<float>(), L, H, N);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gr, gk, gv, dgd};
}
