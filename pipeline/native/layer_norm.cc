// Layer normalisation over the last dimension, float32 on CPU, forward and backward, for training.
//
// Paddle 3.3.1's CPU layer_norm and layer_norm_grad kernels take 2.69 ms for one [16, 46, 512] activation
// on the EPYCs we measure; these loops take 0.24 ms (BENCHMARKS.md, 2026-12-08). Built and loaded
// by pipeline/native_layer_norm.py, which also says when it is used.
//
// Per row of n values: mean m, rstd = 1 / sqrt(var + eps) with the biased variance (as Paddle computes
// it), y = (x - m) * rstd * w + b. Backward, with g = dy * w and xhat = (x - m) * rstd:
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); dw = sum over rows of dy * xhat; db = sum of dy.
#include <cmath>
#include <vector>

#include "paddle/extension.h"

namespace {

void CheckInputs(const paddle::Tensor& x, const paddle::Tensor& w) {
  PD_CHECK(x.is_cpu() && w.is_cpu(), "ner_layer_norm runs on CPU tensors only");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32, "ner_layer_norm takes float32 only");
  PD_CHECK(x.shape().back() == w.numel(), "ner_layer_norm: the last dimension must equal the weight's size");
}

}  // namespace

std::vector<paddle::Tensor> LayerNormForward(const paddle::Tensor& x, const paddle::Tensor& w,
                                             const paddle::Tensor& b, float epsilon) {
  CheckInputs(x, w);
  const int64_t n = w.numel();
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  auto mean = paddle::empty({rows}, x.dtype(), x.place());
  auto rstd = paddle::empty({rows}, x.dtype(), x.place());
  const float* X = x.data<float>();
  const float* W = w.data<float>();
  const float* B = b.data<float>();
  float* Y = y.data<float>();
  float* M = mean.data<float>();
  float* R = rstd.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = X + r * n;
    float* yr = Y + r * n;
    // Two passes, the first about the row's first value: no cancellation when the mean is large against
    // the spread. `omp simd` lets the compiler split the sums into vector lanes (-fopenmp-simd, no threads).
    const float x0 = n > 0 ? xr[0] : 0.f;
    float shifted = 0.f;
#pragma omp simd reduction(+ : shifted)
    for (int64_t i = 0; i < n; ++i) shifted += xr[i] - x0;
    const float m = x0 + shifted / n;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < n; ++i) {
      const float d = xr[i] - m;
      squares += d * d;
    }
    const float rs = 1.f / std::sqrt(squares / n + epsilon);
    for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - m) * rs * W[i] + B[i];
    M[r] = m;
    R[r] = rs;
  }
  return {y, mean, rstd};
}

std::vector<paddle::Tensor> LayerNormBackward(const paddle::Tensor& x, const paddle::Tensor& w,
                                              const paddle::Tensor& mean, const paddle::Tensor& rstd,
                                              const paddle::Tensor& dy) {
  CheckInputs(x, w);
  const int64_t n = w.numel();
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  auto dx = paddle::empty(x.shape(), x.dtype(), x.place());
  auto dw = paddle::empty({n}, x.dtype(), x.place());
  auto db = paddle::empty({n}, x.dtype(), x.place());
  const float* X = x.data<float>();
  const float* W = w.data<float>();
  const float* G = dy.data<float>();
  const float* M = mean.data<float>();
  const float* R = rstd.data<float>();
  float* DX = dx.data<float>();
  float* DW = dw.data<float>();
  float* DB = db.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = X + r * n;
    const float* gr = G + r * n;
    float* dxr = DX + r * n;
    const float m = M[r], rs = R[r];
    float g_sum = 0.f, gx_sum = 0.f;
#pragma omp simd reduction(+ : g_sum, gx_sum)
    for (int64_t i = 0; i < n; ++i) {
      const float g = gr[i] * W[i];
      g_sum += g;
      gx_sum += g * (xr[i] - m) * rs;
    }
    const float g_mean = g_sum / n, gx_mean = gx_sum / n;
    for (int64_t i = 0; i < n; ++i) dxr[i] = rs * (gr[i] * W[i] - g_mean - (xr[i] - m) * rs * gx_mean);
  }
  // Column sums over rows, in row order; each row's loop is vectorised across columns.
  for (int64_t i = 0; i < n; ++i) DW[i] = DB[i] = 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = X + r * n;
    const float* gr = G + r * n;
    const float m = M[r], rs = R[r];
    for (int64_t i = 0; i < n; ++i) {
      DW[i] += gr[i] * (xr[i] - m) * rs;
      DB[i] += gr[i];
    }
  }
  return {dx, dw, db};
}

std::vector<std::vector<int64_t>> LayerNormForwardShape(const std::vector<int64_t>& x_shape,
                                                        const std::vector<int64_t>& w_shape,
                                                        const std::vector<int64_t>& b_shape) {
  int64_t rows = 1;  // -1 (unknown until run time inside a to_static program) stays -1
  for (size_t i = 0; i + 1 < x_shape.size(); ++i) rows = (x_shape[i] < 0 || rows < 0) ? -1 : rows * x_shape[i];
  return {x_shape, {rows}, {rows}};
}

std::vector<paddle::DataType> LayerNormForwardDtype(const paddle::DataType& x, const paddle::DataType& w,
                                                    const paddle::DataType& b) {
  return {x, x, x};
}

std::vector<std::vector<int64_t>> LayerNormBackwardShape(const std::vector<int64_t>& x_shape,
                                                         const std::vector<int64_t>& w_shape,
                                                         const std::vector<int64_t>& mean_shape,
                                                         const std::vector<int64_t>& rstd_shape,
                                                         const std::vector<int64_t>& dy_shape) {
  return {x_shape, w_shape, w_shape};
}

PD_BUILD_OP(ner_layer_norm)
    .Inputs({"X", "W", "B"})
    .Outputs({"Y", "Mean", "Rstd"})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(LayerNormForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(LayerNormForwardDtype));

PD_BUILD_GRAD_OP(ner_layer_norm)
    .Inputs({"X", "W", "Mean", "Rstd", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W"), paddle::Grad("B")})
    .SetKernelFn(PD_KERNEL(LayerNormBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(LayerNormBackwardShape));
