// Python bindings and input checks for cuda.cu (compiled by the host compiler, not nvcc).
#include <torch/extension.h>

#include <vector>

at::Tensor bi_wkv_cuda_forward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& d);
std::vector<at::Tensor> bi_wkv_cuda_backward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& d, const at::Tensor& gy);

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

static void check_inputs(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& d) {
  TORCH_CHECK(r.dim() == 4, "expected (B, T, H, N) tensors");
  TORCH_CHECK(r.size(3) <= 128, "head size must be <= 128");
  TORCH_CHECK(r.numel() < (int64_t(1) << 62), "tensor too large");
  check(r, r, "r", false);
  check(k, r, "k", false);
  check(v, r, "v", false);
  check(d, r, "d", true);
}

at::Tensor forward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& d) {
  check_inputs(r, k, v, d);
  return bi_wkv_cuda_forward(r, k, v, d);
}

std::vector<at::Tensor> backward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& d,
                                 const at::Tensor& gy) {
  check_inputs(r, k, v, d);
  check(gy, r, "gy", false);
  return bi_wkv_cuda_backward(r, k, v, d, gy);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Bi-WKV scans, forward (fp32 out, no bonus term)");
  m.def("backward", &backward, "Bi-WKV scans, backward: (gr, gk, gv, d*dL/dd) without bonus terms, fp32");
}
