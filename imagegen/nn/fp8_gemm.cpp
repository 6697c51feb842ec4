// FP8 (E4M3) GEMM for MLX on CUDA through cuBLASLt: out[M, N] = x8[M, K] @ w8[N, K]^T, the exact sums of the
// byte matrices' products (accumulated in float32, written in bfloat16). imagegen.nn.fp8_linear applies the
// per-token and per-channel scales and the bias after it, in one fused pass.
//
// MLX 0.32 runs FP8 GEMMs only on sm_100 and newer (block-scaled); Hopper (sm_90) and Ada (sm_89) have FP8 tensor
// cores at twice the bf16 rate. cuBLASLt 13.1 on Hopper has no algorithm for per-row / per-column ("outer vector")
// scales, so the GEMM runs unscaled and the scales follow. This is one MLX primitive around that call, built by
// imagegen.nn.fp8_extension with the host C++ compiler against MLX's own headers; the call is captured into MLX's
// CUDA graph like MLX's own cuBLASLt matmuls.
//
// The output's memory comes in as an input (`buffer`, allocated but unwritten by the activation quantizer) and is
// taken over: MLX exports no stream-ordered allocator to extensions, its kernels' outputs are.

#include <cublasLt.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("[fp8_matmul] ") + what + " failed with cuBLAS status " +
                             std::to_string(static_cast<int>(status)));
  }
}

cublasLtHandle_t handle() {
  static cublasLtHandle_t h = [] {
    cublasLtHandle_t made;
    check(cublasLtCreate(&made), "cublasLtCreate");
    return made;
  }();
  return h;
}

// One cuBLASLt description and algorithm per shape, asked for once.
struct Plan {
  cublasLtMatmulDesc_t desc{};
  cublasLtMatrixLayout_t a{}, b{}, d{};
  cublasLtMatmulAlgo_t algo{};
  bool found{false};
};

// Row-major out[M, N] = x[M, K] @ w[N, K]^T is column-major out^T[N, M] = w^T[N, K] @ x[K, M]: cuBLASLt's A is w
// (transposed), B is x, D is out^T with leading dimension N. FP8 needs exactly this "TN" form.
Plan& plan_for(int64_t M, int64_t N, int64_t K) {
  static std::map<std::tuple<int64_t, int64_t, int64_t>, Plan> plans;
  static std::mutex lock;
  std::lock_guard<std::mutex> guard(lock);
  auto key = std::make_tuple(M, N, K);
  auto it = plans.find(key);
  if (it != plans.end()) {
    return it->second;
  }
  Plan plan;
  check(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  cublasOperation_t transpose = CUBLAS_OP_T, keep = CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose)),
        "TRANSA");
  check(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &keep, sizeof(keep)), "TRANSB");
  check(cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_8F_E4M3, K, N, K), "layout A");
  check(cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_8F_E4M3, K, M, K), "layout B");
  check(cublasLtMatrixLayoutCreate(&plan.d, CUDA_R_16BF, N, M, N), "layout D");

  // No workspace: graph branches may run side by side, and a shared one would race (MLX's allocator for a
  // per-call one is not exported).
  cublasLtMatmulPreference_t preference;
  check(cublasLtMatmulPreferenceCreate(&preference), "preference");
  uint64_t workspace = 0;
  check(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                             sizeof(workspace)),
        "workspace");
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle(), plan.desc, plan.a, plan.b, plan.d, plan.d,
                                                         preference, 1, &result, &count);
  cublasLtMatmulPreferenceDestroy(preference);
  plan.found = status == CUBLAS_STATUS_SUCCESS && count > 0;
  plan.algo = result.algo;
  return plans.emplace(key, plan).first->second;
}

class Fp8Matmul : public mx::UnaryPrimitive {
 public:
  explicit Fp8Matmul(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[fp8_matmul] runs on a CUDA GPU only");
  }

  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    const int64_t M = x.shape(0), K = x.shape(1), N = w.shape(0);
    Plan& plan = plan_for(M, N, K);
    if (!plan.found) {
      throw std::runtime_error("[fp8_matmul] cuBLASLt has no FP8 algorithm for this GPU and shape");
    }
    auto& encoder = mx::cu::get_command_encoder(stream());
    out.copy_shared_buffer(inputs[2]);
    for (const auto& in : inputs) {
      encoder.set_input_array(in);
    }
    encoder.set_output_array(out);
    const float one = 1.0f, zero = 0.0f;
    void* d = mx::gpu_ptr<void>(out);
    auto capture = encoder.capture_context();
    check(cublasLtMatmul(handle(), plan.desc, &one, mx::gpu_ptr<void>(w), plan.a, mx::gpu_ptr<void>(x), plan.b,
                         &zero, d, plan.d, d, plan.d, &plan.algo, nullptr, 0, encoder.stream()),
          "cublasLtMatmul");
  }

  const char* name() const override {
    return "Fp8Matmul";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const Fp8Matmul*>(&other) != nullptr;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[2].shape()};
  }
};

// x8 [M, K] and w8 [N, K]: E4M3 bytes (uint8); buffer [M, N] bfloat16 becomes the output.
mx::array fp8_matmul(const mx::array& x8, const mx::array& w8, const mx::array& buffer) {
  if (x8.ndim() != 2 || w8.ndim() != 2 || x8.shape(1) != w8.shape(1) || x8.dtype() != mx::uint8 ||
      w8.dtype() != mx::uint8) {
    throw std::invalid_argument("[fp8_matmul] x8 [M, K] and w8 [N, K] must be uint8 (E4M3) matrices");
  }
  if (buffer.ndim() != 2 || buffer.shape(0) != x8.shape(0) || buffer.shape(1) != w8.shape(0) ||
      buffer.dtype() != mx::bfloat16) {
    throw std::invalid_argument("[fp8_matmul] buffer must be [M, N] bfloat16");
  }
  if (x8.shape(1) % 16 || w8.shape(0) % 16) {
    throw std::invalid_argument("[fp8_matmul] K and N must be multiples of 16");
  }
  auto stream = mx::default_stream(mx::Device::gpu);
  return mx::array(buffer.shape(), mx::bfloat16, std::make_shared<Fp8Matmul>(stream), {x8, w8, buffer});
}

// Whether cuBLASLt on this GPU has an FP8 algorithm for the shape (asked once per shape).
bool supported(int64_t M, int64_t N, int64_t K) {
  return plan_for(M, N, K).found;
}

// Which scaling schemes cuBLASLt has an FP8 algorithm for here, for the shape (a diagnostic for the benchmarks:
// an in-GEMM scaling would save the separate scaling pass).
std::map<std::string, bool> capabilities(int64_t M, int64_t N, int64_t K) {
  auto has = [&](cublasLtMatmulMatrixScale_t a_mode, cublasLtMatmulMatrixScale_t b_mode, bool alpha_vector) {
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, d;
    check(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
    cublasOperation_t transpose = CUBLAS_OP_T, keep = CUBLAS_OP_N;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &keep, sizeof(keep));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof(a_mode));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof(b_mode));
    if (alpha_vector) {
      cublasLtPointerMode_t mode = CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO;
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode, sizeof(mode));
    }
    cublasLtMatrixLayoutCreate(&a, CUDA_R_8F_E4M3, K, N, K);
    cublasLtMatrixLayoutCreate(&b, CUDA_R_8F_E4M3, K, M, K);
    cublasLtMatrixLayoutCreate(&d, CUDA_R_16BF, N, M, N);
    cublasLtMatmulPreference_t preference;
    cublasLtMatmulPreferenceCreate(&preference);
    uint64_t workspace = 32 << 20;
    cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                         sizeof(workspace));
    cublasLtMatmulHeuristicResult_t result{};
    int count = 0;
    cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(handle(), desc, a, b, d, d, preference, 1, &result, &count);
    cublasLtMatmulPreferenceDestroy(preference);
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(d);
    cublasLtMatmulDescDestroy(desc);
    return status == CUBLAS_STATUS_SUCCESS && count > 0;
  };
  const auto scalar = CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
  return {
      {"scalar", has(scalar, scalar, false)},
      {"outer_vector", has(CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F, CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F,
                           false)},
      {"blocks_128x128_and_rows_128", has(CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
                                          CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, false)},
      {"alpha_vector", has(scalar, scalar, true)},
  };
}

}  // namespace

NB_MODULE(_imagegen_fp8, m) {
  m.doc() = "FP8 (E4M3) GEMM for MLX on CUDA through cuBLASLt (imagegen/nn/fp8_gemm.cpp)";
  m.def("fp8_matmul", &fp8_matmul, nb::arg("x8"), nb::arg("w8"), nb::arg("buffer"));
  m.def("supported", &supported, nb::arg("M"), nb::arg("N"), nb::arg("K"));
  m.def("capabilities", &capabilities, nb::arg("M"), nb::arg("N"), nb::arg("K"));
  m.def("cublaslt_version", [] { return static_cast<int64_t>(cublasLtGetVersion()); });
}
