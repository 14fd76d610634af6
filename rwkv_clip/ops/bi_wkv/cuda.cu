// Bi-WKV CUDA kernel (docs/bi_wkv.md). The same algorithm as cpu.cpp, with one block per (b, h) and one
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
// The kernels take the same inputs and compute the same things as the CPU kernel (cpu.cpp): the decay
// d = exp(-exp(w)) is computed from w as each chunk is staged, and the bonus term u and its gradients, and
// gw = -exp(w)·d·∂L/∂d, are applied in the sweeps' per-token epilogues.
// Inputs r, k, v, gy are read in their own dtype (fp32 / bf16 / fp16); w, u and all outputs are fp32.
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
  float* u;  // [NP] bonus of the head's rows (read by kDot == 2)
};

// What a sweep also hands its epilogue per token: nothing, Σ_a q[a]·x[a], or Σ_a q[a]·x[a]·u[a].
constexpr int kNoDot = 0, kDot = 1, kDotU = 2;

// One exclusive sweep over L tokens of one (b, h). Row/lane pointers are at the head's first token;
// rs is the stride between tokens; w holds the raw decay logits (d = exp(-exp(w)) is computed here).
// post(t, out, dot, z_t[lane]) runs on every lane < N, in scan order.
template <int NP, bool kDecayOnLanes, int kDotKind, typename T, typename Post>
__device__ __forceinline__ void sweep(const T* __restrict__ q, const T* __restrict__ x, const T* __restrict__ z,
                                      const float* __restrict__ w, int L, int64_t rs, int N, bool reverse,
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
      sm.d[i * NP + lane] = active ? expf(-expf(w[o])) : 0.f;
    }
    __syncthreads();
    for (int i = 0; i < n; ++i) {
      const float* qi = sm.q + i * NP;
      const float* xi = sm.x + i * NP;
      const float* di = sm.d + i * NP;
      const float zt = sm.z[i * NP + lane];
      const float dl = di[lane];
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      float dot = 0.f;
#pragma unroll
      for (int a = 0; a < NP; a += 4) {
        const float4 q4 = *reinterpret_cast<const float4*>(qi + a);  // broadcast reads
        const float4 x4 = *reinterpret_cast<const float4*>(xi + a);
        float4 d4;
        if constexpr (kDecayOnLanes) d4 = make_float4(dl, dl, dl, dl);
        else d4 = *reinterpret_cast<const float4*>(di + a);
        if constexpr (kDotKind == kDot) {
          dot += q4.x * x4.x + q4.y * x4.y + q4.z * x4.z + q4.w * x4.w;
        } else if constexpr (kDotKind == kDotU) {
          const float4 u4 = *reinterpret_cast<const float4*>(sm.u + a);
          dot += q4.x * x4.x * u4.x + q4.y * x4.y * u4.y + q4.z * x4.z * u4.z + q4.w * x4.w * u4.w;
        }
        acc[0] += q4.x * M[a + 0];  M[a + 0] = d4.x * M[a + 0] + x4.x * zt;
        acc[1] += q4.y * M[a + 1];  M[a + 1] = d4.y * M[a + 1] + x4.y * zt;
        acc[2] += q4.z * M[a + 2];  M[a + 2] = d4.z * M[a + 2] + x4.z * zt;
        acc[3] += q4.w * M[a + 3];  M[a + 3] = d4.w * M[a + 3] + x4.w * zt;
      }
      if (active) post(reverse ? (L - 1 - (c + i)) : (c + i), (acc[0] + acc[1]) + (acc[2] + acc[3]), dot, zt);
    }
  }
}

// Shared memory of a block: the four staged [TC][NP] arrays and the head's bonus u (zero past N).
template <int NP>
__device__ __forceinline__ Smem make_smem(float* buf, const float* u, int h, int N) {
  const Smem sm{buf, buf + TC * NP, buf + 2 * TC * NP, buf + 3 * TC * NP, buf + 4 * TC * NP};
  sm.u[threadIdx.x] = threadIdx.x < N ? u[h * N + threadIdx.x] : 0.f;  // visible after the sweep's first sync
  return sm;
}

template <typename T, int NP>
__global__ void __launch_bounds__(NP) fwd_kernel(const T* __restrict__ r, const T* __restrict__ k,
                                                 const T* __restrict__ v, const float* __restrict__ w,
                                                 const float* __restrict__ u, float* __restrict__ y, int L, int H,
                                                 int N) {
  __shared__ __align__(16) float buf[4 * TC * NP + NP];
  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const Smem sm = make_smem<NP>(buf, u, h, N);
  const int64_t rs = int64_t(H) * N, base = int64_t(b) * L * rs + int64_t(h) * N;
  float* yb = y + base + threadIdx.x;
  // rows = key channel i (r, k, d), lanes = value channel j (v)
  // left scan + bonus: y_t += (Σ_i r_t[i] u[i] k_t[i]) v_t
  sweep<NP, false, kDotU>(r + base, k + base, v + base, w + base, L, rs, N, false, sm,
                          [&](int t, float o, float ruk, float vt) { yb[t * rs] = o + ruk * vt; });
  sweep<NP, false, kNoDot>(r + base, k + base, v + base, w + base, L, rs, N, true, sm,
                           [&](int t, float o, float, float) { yb[t * rs] += o; });
}

template <typename T, int NP>
__global__ void __launch_bounds__(NP) bwd_kernel(const T* __restrict__ r, const T* __restrict__ k,
                                                 const T* __restrict__ v, const float* __restrict__ w,
                                                 const float* __restrict__ u, const T* __restrict__ gy,
                                                 float* __restrict__ gr, float* __restrict__ gk,
                                                 float* __restrict__ gv, float* __restrict__ gw,
                                                 float* __restrict__ gu, int L, int H, int N) {
  __shared__ __align__(16) float buf[4 * TC * NP + NP];
  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const Smem sm = make_smem<NP>(buf, u, h, N);
  const int64_t rs = int64_t(H) * N, base = int64_t(b) * L * rs + int64_t(h) * N;
  const int64_t lane = base + threadIdx.x;  // this thread's element of token 0
  const T *rb = r + base, *kb = k + base, *vb = v + base, *gb = gy + base;
  const float* wb = w + base;
  const float ul = threadIdx.x < N ? u[h * N + threadIdx.x] : 0.f;

  // gv: lanes = value channel j; rows = key channel i. Bonus: gv_t += (Σ_i k u r) gy_t.
  sweep<NP, false, kDotU>(kb, rb, gb, wb, L, rs, N, true, sm,
                          [&](int t, float o, float kur, float gyt) { gv[lane + t * rs] = o + kur * gyt; });
  sweep<NP, false, kNoDot>(kb, rb, gb, wb, L, rs, N, false, sm,
                           [&](int t, float o, float, float) { gv[lane + t * rs] += o; });

  // gr, gk: lanes = key channel i; rows = value channel j; decay on lanes. See cpu.cpp for dgd, which gw
  // holds until step 4 turns it into ∂L/∂w = -exp(w)·dgd.
  // 1) gkL
  sweep<NP, true, kNoDot>(vb, gb, rb, wb, L, rs, N, true, sm,
                          [&](int t, float o, float, float) { gk[lane + t * rs] = o; });
  // 2) grL (+ bonus u k_t (v_t·gy_t)) and the left-pair part of dgd
  float pk = 0.f, pr = 0.f;
  sweep<NP, true, kDot>(gb, vb, kb, wb, L, rs, N, false, sm, [&](int t, float o, float gyv, float kt) {
    const int64_t e = lane + t * rs;
    pr += ld(r + e) * o;
    gw[e] = pk - pr;
    pk += kt * gk[e];
    gr[e] = o + gyv * ul * kt;
  });
  // 3) gkR (+ bonus u r_t (v_t·gy_t), and gu); dgd -= Σ_{s≤t} k_s gkR_s
  float pkr = 0.f, gul = 0.f;
  sweep<NP, true, kDot>(vb, gb, rb, wb, L, rs, N, false, sm, [&](int t, float o, float vgy, float rt) {
    const int64_t e = lane + t * rs;
    const float kt = ld(k + e);
    pkr += kt * o;
    gul += vgy * rt * kt;
    gw[e] -= pkr;
    gk[e] += o + vgy * ul * rt;
  });
  if (threadIdx.x < N) gu[int64_t(blockIdx.x) * N + threadIdx.x] = gul;
  // 4) grR; dgd += total − Σ_{τ≥t} r_τ grR_τ; gw = -exp(w)·dgd
  float sr = 0.f;
  sweep<NP, true, kNoDot>(gb, vb, kb, wb, L, rs, N, true, sm, [&](int t, float o, float, float) {
    const int64_t e = lane + t * rs;
    sr += ld(r + e) * o;
    gw[e] = -expf(w[e]) * (gw[e] + (pkr - sr));
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

at::Tensor bi_wkv_cuda_forward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                               const at::Tensor& u) {
  const c10::cuda::CUDAGuard guard(r.device());
  const int B = r.size(0), L = r.size(1), H = r.size(2), N = r.size(3);
  auto y = at::empty(r.sizes(), r.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  BI_WKV_DISPATCH_DTYPE(r.scalar_type(), "bi_wkv_cuda_forward", [&] {
    BI_WKV_DISPATCH_NP(N, [&] {
      fwd_kernel<scalar_t, NP><<<B * H, NP, 0, stream>>>(r.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                                         v.data_ptr<scalar_t>(), w.data_ptr<float>(),
                                                         u.data_ptr<float>(), y.data_ptr<float>(), L, H, N);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::vector<at::Tensor> bi_wkv_cuda_backward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& w, const at::Tensor& u, const at::Tensor& gy) {
  const c10::cuda::CUDAGuard guard(r.device());
  const int B = r.size(0), L = r.size(1), H = r.size(2), N = r.size(3);
  auto opts = r.options().dtype(at::kFloat);
  auto gr = at::empty(r.sizes(), opts), gk = at::empty(r.sizes(), opts), gv = at::empty(r.sizes(), opts),
       gw = at::empty(r.sizes(), opts), gu = at::empty({B, H, N}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  BI_WKV_DISPATCH_DTYPE(r.scalar_type(), "bi_wkv_cuda_backward", [&] {
    BI_WKV_DISPATCH_NP(N, [&] {
      bwd_kernel<scalar_t, NP><<<B * H, NP, 0, stream>>>(
          r.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), w.data_ptr<float>(),
          u.data_ptr<float>(), gy.data_ptr<scalar_t>(), gr.data_ptr<float>(), gk.data_ptr<float>(),
          gv.data_ptr<float>(), gw.data_ptr<float>(), gu.data_ptr<float>(), L, H, N);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gr, gk, gv, gw, gu};
}
