// nestlearn::batched_matmul: the many small products of the in-context memories (C x d and d x d
// blocks, ~64 wide, batched over batch x heads x memories).
//
// torch.bmm hands these to MKL's batched sgemm, which packs both operands of every 64 x 64
// product before multiplying; when the operands come from L3 or memory (the chunk step's working
// set is larger than L3) that ran at ~115 GFLOP/s on a 2-core AMD EPYC (Zen 4) against ~144 for
// oneDNN's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm) called per matrix here.
// Operands may be transposed views (a column-major matrix is copied to a row-major buffer first)
// and broadcast over batch dims (stride 0: no expanded copy). float64 uses a plain loop (tests);
// where oneDNN has no float32 micro-kernel for the CPU, float32 falls back to at::matmul.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

#ifdef __AVX512F__
// dst (16 x 16, leading dimension dst_ld) = src (16 x 16, leading dimension src_ld) transposed:
// 32-bit and 64-bit unpacks gather each column's elements of four rows into one 128-bit lane,
// then two rounds of lane shuffles put the four lanes of an output row together.
inline void transpose16(const float* src, int64_t src_ld, float* dst, int64_t dst_ld) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_ld);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + c], lane L: column 4L + c of rows 4g..4g+3
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 1]), d = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 lo_a = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), hi_a = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 lo_b = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 hi_b = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_f32x4(lo_a, lo_b, 0x88);       // output row c
    t[4 + c] = _mm512_shuffle_f32x4(lo_a, lo_b, 0xDD);   // row 4 + c
    t[8 + c] = _mm512_shuffle_f32x4(hi_a, hi_b, 0x88);   // row 8 + c
    t[12 + c] = _mm512_shuffle_f32x4(hi_a, hi_b, 0xDD);  // row 12 + c
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * dst_ld, t[i]);
}
#endif

// A matrix operand: its first element, leading dimension and whether rows are contiguous.
template <typename T>
struct Operand {
  const T* data;
  int64_t rows, cols, row_stride, col_stride;

  bool row_major() const { return (col_stride == 1 || cols == 1) && (rows == 1 || row_stride >= cols); }

  // The matrix as row-major with leading dimension `ld`: itself, or a copy in `buffer`.
  const T* row_major_view(std::vector<T>& buffer, int64_t& ld) const {
    if (row_major()) {
      ld = rows == 1 ? cols : row_stride;
      return data;
    }
    buffer.resize(rows * cols);
    ld = cols;
    if (transpose_tiles(buffer.data())) return buffer.data();
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = 0; i < rows; ++i) buffer[i * cols + j] = data[i * row_stride + j * col_stride];
    return buffer.data();
  }

  // A column-major matrix (row_stride 1) whose sides are multiples of 16, copied to row-major in
  // 16 x 16 register tiles (AVX-512); false where that does not apply (the plain loop does it).
  bool transpose_tiles(T* dst) const {
#ifdef __AVX512F__
    if constexpr (std::is_same_v<T, float>) {
      if (row_stride != 1 || rows % 16 != 0 || cols % 16 != 0) return false;
      // data holds this matrix transposed, row-major (cols x rows, leading dimension col_stride)
      for (int64_t j = 0; j < cols; j += 16)
        for (int64_t i = 0; i < rows; i += 16) transpose16(data + j * col_stride + i, col_stride, dst + i * cols + j, cols);
      return true;
    }
#endif
    (void)dst;
    return false;
  }
};

template <typename T>
void product(const T* A, const T* B, T* C, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb);

template <>
void product<float>(const float* A, const float* B, float* C, int64_t M, int64_t N, int64_t K, int64_t lda,
                    int64_t ldb) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, N, false, A, B, C);
}

template <>
void product<double>(const double* A, const double* B, double* C, int64_t M, int64_t N, int64_t K, int64_t lda,
                     int64_t ldb) {
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * N;
    for (int64_t j = 0; j < N; ++j) c[j] = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[i * lda + k];
      const double* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// Whether oneDNN has a float32 micro-kernel for this CPU (asked once, by trying one product).
bool float_kernel_available() {
  static const bool available = [] {
    float a = 1.0f, b = 1.0f, c = 0.0f;
    try {
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, &a, &b, &c);
      at::native::cpublas::brgemm_release(false);
    } catch (const c10::Error&) {
      return false;
    }
    return c == 1.0f;
  }();
  return available;
}

// The offset of flat batch index `flat` in a tensor with these batch sizes and strides.
int64_t batch_offset(int64_t flat, at::IntArrayRef sizes, at::IntArrayRef strides) {
  int64_t offset = 0;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    offset += (flat % sizes[d]) * strides[d];
    flat /= sizes[d];
  }
  return offset;
}

template <typename T>
void run(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const int64_t dims = a.dim(), M = a.size(-2), K = a.size(-1), N = b.size(-1);
  const auto batch = a.sizes().slice(0, dims - 2);
  const auto a_strides = a.strides().slice(0, dims - 2), b_strides = b.strides().slice(0, dims - 2);
  const T* a_data = a.const_data_ptr<T>();
  const T* b_data = b.const_data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  at::parallel_for(0, out.numel() / (M * N), 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> a_buffer, b_buffer;
    for (int64_t i = lo; i < hi; ++i) {
      const Operand<T> lhs{a_data + batch_offset(i, batch, a_strides), M, K, a.stride(-2), a.stride(-1)};
      const Operand<T> rhs{b_data + batch_offset(i, batch, b_strides), K, N, b.stride(-2), b.stride(-1)};
      int64_t lda = 0, ldb = 0;
      const T* A = lhs.row_major_view(a_buffer, lda);
      const T* B = rhs.row_major_view(b_buffer, ldb);
      product<T>(A, B, out_data + i * M * N, M, N, K, lda, ldb);
    }
    if constexpr (std::is_same_v<T, float>) at::native::cpublas::brgemm_release(false);
  });
}

at::Tensor batched_matmul(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() >= 3 && a.dim() == b.dim() && a.sizes().slice(0, a.dim() - 2) == b.sizes().slice(0, b.dim() - 2)
              && a.size(-1) == b.size(-2), "batched_matmul: expected (..., M, K) and (..., K, N) with equal batch "
              "dims, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              "batched_matmul: expected two float32 or two float64 tensors, got ", a.scalar_type(), " and ",
              b.scalar_type());
  if (a.scalar_type() == at::kFloat && !float_kernel_available()) return at::matmul(a, b).contiguous();
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  shape.back() = b.size(-1);
  at::Tensor out = at::empty(shape, a.options());
  if (out.numel() == 0) return out;
  if (a.size(-1) == 0) return out.zero_();
  if (a.scalar_type() == at::kFloat) {
    run<float>(a, b, out);
  } else {
    run<double>(a, b, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nestlearn, m) { m.def("batched_matmul(Tensor a, Tensor b) -> Tensor"); }

TORCH_LIBRARY_IMPL(nestlearn, CPU, m) { m.impl("batched_matmul", &batched_matmul); }
