// Python bindings and input checks for cuda.cu (compiled by the host compiler, not nvcc).
#include <torch/extension.h>

#include <vector>

at::Tensor bi_wkv_cuda_forward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                               const at::Tensor& u);
std::vector<at::Tensor> bi_wkv_cuda_backward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& w, const at::Tensor& u, const at::Tensor& gy);

static void check(const at::Tensor& x, const at::Tensor& r, const char* name, bool fp32) {
  TORCH_CHECK(x.is_cuda() && x.device() == r.device(), name, " must be on ", r.device());
  TORCH_CHECK(x.sizes() == r.sizes(), name, " must have shape ", r.sizes());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  if (fp32) {
    TORCH_CHECK(x.scalar_type() == at::kFloat, name, " must be float32");
  } else {
    TORCH_CHECK(x.scalar_type() == r.scalar_type(), name, " must have dtype ", r.scalar_type());
  }
}

static void check_inputs(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                         const at::Tensor& u) {
  TORCH_CHECK(r.dim() == 4, "expected (B, T, H, N) tensors");
  TORCH_CHECK(r.size(3) <= 128, "head size must be <= 128");
  TORCH_CHECK(r.numel() < (int64_t(1) << 62), "tensor too large");
  check(r, r, "r", false);
  check(k, r, "k", false);
  check(v, r, "v", false);
  check(w, r, "w", true);
  TORCH_CHECK(u.is_cuda() && u.device() == r.device() && u.scalar_type() == at::kFloat && u.is_contiguous(),
              "u must be a contiguous float32 tensor on ", r.device());
  TORCH_CHECK(u.dim() == 2 && u.size(0) == r.size(2) && u.size(1) == r.size(3), "u must have shape (H, N)");
}

// The contract of both Bi-WKV kernels (see cpu.cpp): forward(r, k, v, w, u) -> y, both scans plus the bonus;
// backward(r, k, v, w, u, gy) -> (gr, gk, gv, gw, gu per batch element (B, H, N)). Here r, k, v, gy share a
// dtype (fp32 / bf16 / fp16); w, u and every output are fp32.
at::Tensor forward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                   const at::Tensor& u) {
  check_inputs(r, k, v, w, u);
  return bi_wkv_cuda_forward(r, k, v, w, u);
}

std::vector<at::Tensor> backward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                                 const at::Tensor& u, const at::Tensor& gy) {
  check_inputs(r, k, v, w, u);
  check(gy, r, "gy", false);
  return bi_wkv_cuda_backward(r, k, v, w, u, gy);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Bi-WKV forward: y = both scans + bonus (fp32)");
  m.def("backward", &backward, "Bi-WKV backward: (gr, gk, gv, gw, gu per batch element), fp32");
}
