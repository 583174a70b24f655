// nestlearn::unit_triangular_solve: the batched unit-triangular solves of the DGD chunk update.
//
// L = I + strict_lower(system); solves L X = B (forward substitution) or, with transpose, L^T X = B
// (backward substitution). system is (Gs, n, n) and serves `share` = G / Gs consecutive
// right-hand sides of rhs (G, n, d): the memories stacked on one dim share their first layer's
// system. torch.linalg.solve_triangular expands such a broadcast system, copies both operands to
// column-major and makes one LAPACK call per matrix; at the DGD sizes (n = chunk, d = head width,
// both ~64) that is ~3x slower than these register-blocked loops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

// Row by row: x_t = b_t - sum_s l_ts x_s over the rows s solved before t, accumulated locally
// (in vector registers when the width D is a compile-time constant).
template <typename T, int64_t D, bool Transpose>
void solve_fixed(const T* __restrict L, const T* __restrict B, T* __restrict X, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const int64_t t = Transpose ? n - 1 - k : k;
    T acc[D];
    for (int64_t j = 0; j < D; ++j) acc[j] = B[t * D + j];
    const int64_t s0 = Transpose ? t + 1 : 0, s1 = Transpose ? n : t;
    for (int64_t s = s0; s < s1; ++s) {
      const T l = Transpose ? L[s * n + t] : L[t * n + s];
      for (int64_t j = 0; j < D; ++j) acc[j] -= l * X[s * D + j];
    }
    for (int64_t j = 0; j < D; ++j) X[t * D + j] = acc[j];
  }
}

template <typename T, bool Transpose>
void solve_any(const T* __restrict L, const T* __restrict B, T* __restrict X, int64_t n, int64_t d) {
  for (int64_t k = 0; k < n; ++k) {
    const int64_t t = Transpose ? n - 1 - k : k;
    for (int64_t j = 0; j < d; ++j) X[t * d + j] = B[t * d + j];
    const int64_t s0 = Transpose ? t + 1 : 0, s1 = Transpose ? n : t;
    for (int64_t s = s0; s < s1; ++s) {
      const T l = Transpose ? L[s * n + t] : L[t * n + s];
      for (int64_t j = 0; j < d; ++j) X[t * d + j] -= l * X[s * d + j];
    }
  }
}

template <typename T, bool Transpose>
void solve_one(const T* L, const T* B, T* X, int64_t n, int64_t d) {
  switch (d) {
    case 16: return solve_fixed<T, 16, Transpose>(L, B, X, n);
    case 32: return solve_fixed<T, 32, Transpose>(L, B, X, n);
    case 64: return solve_fixed<T, 64, Transpose>(L, B, X, n);
    case 128: return solve_fixed<T, 128, Transpose>(L, B, X, n);
    default: return solve_any<T, Transpose>(L, B, X, n, d);
  }
}

at::Tensor unit_triangular_solve(const at::Tensor& system, const at::Tensor& rhs, bool transpose) {
  TORCH_CHECK(system.dim() == 3 && rhs.dim() == 3, "unit_triangular_solve: expected a (Gs, n, n) system and "
              "(G, n, d) right-hand sides, got ", system.sizes(), " and ", rhs.sizes());
  const int64_t gs = system.size(0), n = system.size(1), g = rhs.size(0), d = rhs.size(2);
  TORCH_CHECK(system.size(2) == n && rhs.size(1) == n, "unit_triangular_solve: system ", system.sizes(),
              " does not match right-hand sides ", rhs.sizes());
  TORCH_CHECK(gs > 0 && g % gs == 0, "unit_triangular_solve: ", g, " right-hand sides for ", gs, " systems");
  TORCH_CHECK(system.scalar_type() == rhs.scalar_type(), "unit_triangular_solve: dtypes differ");
  const int64_t share = g / gs;
  const at::Tensor sys = system.contiguous(), b = rhs.contiguous();
  at::Tensor out = at::empty(b.sizes(), b.options());
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "unit_triangular_solve", [&] {
    const scalar_t* L = sys.const_data_ptr<scalar_t>();
    const scalar_t* B = b.const_data_ptr<scalar_t>();
    scalar_t* X = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t* Li = L + (i / share) * n * n;
        if (transpose) solve_one<scalar_t, true>(Li, B + i * n * d, X + i * n * d, n, d);
        else solve_one<scalar_t, false>(Li, B + i * n * d, X + i * n * d, n, d);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(nestlearn, m) {
  m.def("unit_triangular_solve(Tensor system, Tensor rhs, bool transpose) -> Tensor");
}

TORCH_LIBRARY_IMPL(nestlearn, CPU, m) { m.impl("unit_triangular_solve", &unit_triangular_solve); }
