// Permutohedral lattice arithmetic shared by the C++ (CPU) and CUDA backends.
//
// Everything here is plain arithmetic on raw pointers, `__host__ __device__` under nvcc, so that
// the CPU tests exercise exactly the code the GPU runs. The pure-PyTorch reference
// (crfrnn/reference.py) mirrors these functions step for step: both compute the embedding in the
// same precisions (simplex decisions in float32 for float32 features, as densecrf; weights in
// double) and in the same order, so all backends build the same lattice.
//
// Conventions (Adams, Baek & Davis 2010; Kraehenbuehl's densecrf):
//   - a point's d scaled features are elevated onto the plane sum(x) = 0 of Z^{d+1};
//   - its enclosing simplex has d+1 vertices; vertex r has key  rem0 + r - (d+1)[rank > d - r];
//   - a key is stored as (image index, k_0, ..., k_{d-1}): the last coordinate is redundant
//     (the coordinates sum to zero) and the image index keeps images of a batch apart;
//   - the blur neighbours of key k along direction j are k + (d+1)e_j - 1 and k - (d+1)e_j + 1
//     (for j = d only the -1/+1 shift shows in the stored coordinates).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CRFRNN_HD __host__ __device__ __forceinline__
#else
#define CRFRNN_HD inline
#endif

namespace crfrnn {

// Largest feature dimension d; per-point scratch arrays have this size (+2).
constexpr int kMaxDim = 31;
// Largest accepted |feature|: elevated coordinates stay below ~100 |f| < 2^31 (int32 keys).
constexpr double kMaxAbsFeature = 1048576.0;  // 2^20

// Scale of feature i that makes the lattice blur a Gaussian of std 1 in feature space:
// sqrt(2/3) (d+1) / sqrt((i+1)(i+2)), as Adams et al. and densecrf.
CRFRNN_HD double lattice_scale(int d, int i) {
  return sqrt(2.0 / 3.0) * (d + 1) / sqrt(static_cast<double>(i + 1) * (i + 2));
}

// The scales of lattice_scale in float32, computed as densecrf's Permutohedral::init does (its
// inv_std_dev a float, the product in double, then rounded to float): the scales of the float32
// decisions below.
CRFRNN_HD float lattice_scale_float(int d, int i) {
  const float inv_std = static_cast<float>(sqrt(2.0 / 3.0) * (d + 1));
  return static_cast<float>(1.0 / sqrt(static_cast<double>((i + 2) * (i + 1))) * static_cast<double>(inv_std));
}

// A lattice's scales, both kinds: `value` (double) makes the barycentric weights, `decision`
// (float) the simplex decisions of float32 features.
struct LatticeScales {
  double value[kMaxDim];
  float decision[kMaxDim];
};

CRFRNN_HD void lattice_scales(int d, LatticeScales* s) {
  for (int i = 0; i < d; ++i) {
    s->value[i] = lattice_scale(d, i);
    s->decision[i] = lattice_scale_float(d, i);
  }
}

// Features whose simplex is decided in float32 (densecrf's arithmetic): all but float64. A half or
// bfloat16 value is exactly a float, and the CUDA launcher converts them to float.
template <typename scalar_t>
struct DecidesInFloat {
  static constexpr bool value = true;
};
template <>
struct DecidesInFloat<double> {
  static constexpr bool value = false;
};

// Largest |float32 elevated coordinate| at which a point's simplex is decided in float32:
// densecrf's keys are int16, so it embeds nothing beyond; here float32's rounding error is still
// ~1e-3 lattice units (at 2^20, the largest feature accepted, it would be several units). A point
// with a coordinate beyond it is decided in double, as float64 features are.
constexpr float kFloatDecisionLimit = 32768.0f;  // 2^15

// The simplex of a point from its remainders (elevated - rem0, either precision): rank[i] = how
// many coordinates have a larger remainder, a tie going to the later coordinate. Without branches:
// on image features the comparisons are coin flips, and mispredicted branches took a third of the
// embedding's time.
template <typename T, typename Dim>
CRFRNN_HD void rank_remainders(const T* remainder, Dim d, int* r) {
  for (int i = 0; i <= d; ++i) r[i] = 0;
  for (int i = 0; i < d; ++i) {
    for (int j = i + 1; j <= d; ++j) {
      const int i_is_lower = remainder[i] < remainder[j];
      r[i] += i_is_lower;
      r[j] += 1 - i_is_lower;
    }
  }
}

// Elevate the point `f` (d scaled features, any float type) and find its simplex.
// `scales` holds lattice_scales(d) (precomputed once per lattice on the CPU).
// Writes rem0[0..d] (remainder-0 lattice point), rank[0..d] (rank of each coordinate's
// remainder) and bary[0..d] (barycentric weight of simplex vertex r).
//
// The decisions (rem0 and rank) are made as densecrf makes them: for float32 (and half) features
// in float32, with its operations in its order (float scales, elevated accumulated from the right,
// times 1.0f/(d+1) rounded half to even, remainders in float), so that points on a simplex
// boundary in real arithmetic (exact ties: grid-aligned bandwidths, integer colours) fall into
// densecrf's simplex; for float64 features (and float32 points beyond kFloatDecisionLimit) in
// double. The barycentric weights are always computed in double, from the double elevated
// coordinates relative to the simplex decided: where the two precisions decide alike, the result
// is the all-double embedding's, bit for bit.
// Dim: int, or std::integral_constant<int, d> where the C++ build fixes d at compile time (its
// loops then unroll and the point stays in registers).
template <typename scalar_t, typename Dim>
CRFRNN_HD void embed_point_scaled(const scalar_t* f, const LatticeScales& scales, Dim d, int* rem0, int* rank,
                                  double* bary) {
  double elevated[kMaxDim + 1];
  double b[kMaxDim + 2];
  // elevated[j] = sum_{k >= j} cf[k] - j cf[j-1], accumulated from the right.
  double running = 0.0;
  for (int j = d; j > 0; --j) {
    const double c = static_cast<double>(f[j - 1]) * scales.value[j - 1];
    elevated[j] = running - j * c;
    running = running + c;
  }
  elevated[0] = running;

  int coord_sum = 0;
  int r[kMaxDim + 1];  // the ranks, in registers until the end
  bool decided = false;
  if (DecidesInFloat<scalar_t>::value) {
    // densecrf's float32 arithmetic (Permutohedral::init), step for step.
    float elevated_f[kMaxDim + 1];
    float running_f = 0.0f;
    bool in_range = true;
    for (int j = d; j > 0; --j) {
      const float c = static_cast<float>(f[j - 1]) * scales.decision[j - 1];
      elevated_f[j] = running_f - static_cast<float>(j) * c;
      running_f = running_f + c;
      in_range &= fabsf(elevated_f[j]) <= kFloatDecisionLimit;
    }
    elevated_f[0] = running_f;
    in_range &= fabsf(running_f) <= kFloatDecisionLimit;
    if (in_range) {
      const float inv_d1 = 1.0f / static_cast<float>(d + 1);
      float remainder[kMaxDim + 1];
      for (int i = 0; i <= d; ++i) {
        const int rounded = static_cast<int>(rintf(inv_d1 * elevated_f[i]));
        rem0[i] = rounded * (d + 1);
        coord_sum += rounded;
        remainder[i] = elevated_f[i] - static_cast<float>(rem0[i]);
      }
      rank_remainders(remainder, d, r);
      decided = true;
    }
  }
  if (!decided) {
    // Nearest remainder-0 point (round half to even, as torch.round).
    double remainder[kMaxDim + 1];
    for (int i = 0; i <= d; ++i) {
      const double rounded = rint(elevated[i] / (d + 1));
      rem0[i] = static_cast<int>(rounded) * (d + 1);
      coord_sum += static_cast<int>(rounded);
      remainder[i] = elevated[i] - rem0[i];
    }
    rank_remainders(remainder, d, r);
  }
  // Bring the point back onto the plane sum = 0.
  for (int i = 0; i <= d; ++i) {
    rank[i] = r[i] + coord_sum;
    if (rank[i] < 0) { rank[i] += d + 1; rem0[i] += d + 1; }
    else if (rank[i] > d) { rank[i] -= d + 1; rem0[i] -= d + 1; }
  }
  // Barycentric weights, slot d+1 wrapping into slot 0.
  for (int i = 0; i <= d + 1; ++i) b[i] = 0.0;
  for (int i = 0; i <= d; ++i) {
    const double v = (elevated[i] - rem0[i]) / (d + 1);
    b[d - rank[i]] += v;
    b[d - rank[i] + 1] -= v;
  }
  b[0] += 1.0 + b[d + 1];
  for (int i = 0; i <= d; ++i) bary[i] = b[i];
}

// embed_point_scaled with the scales computed on the spot (the GPU's choice: no table to share).
template <typename scalar_t>
CRFRNN_HD void embed_point(const scalar_t* f, int d, int* rem0, int* rank, double* bary) {
  LatticeScales scales;
  lattice_scales(d, &scales);
  embed_point_scaled(f, scales, d, rem0, rank, bary);
}

// Gradient of sum_r grad_bary[r] * bary[r] with respect to the point's d features, with its simplex
// held fixed (the rank embed_point_scaled found for it; the weights are linear in the features
// within a simplex): the transpose of embed_point_scaled's map features -> barycentric weights.
//   forward: cf = f * scale; elevated[j] = sum_{k >= j} cf[k] - j cf[j-1]; v_i = (elevated[i] -
//            rem0[i]) / (d+1); bary[d - rank_i] += v_i, bary[d - rank_i + 1] -= v_i (slot d+1
//            wraps into slot 0)
//   here:    grad v_i = g[d - rank_i] - g[d - rank_i + 1] (g[d+1] = g[0]);
//            grad cf[k] = sum_{j <= k} grad elevated[j] - (k+1) grad elevated[k+1]
// In double, in this order (crfrnn.reference.barycentric_weights_grad computes the same).
CRFRNN_HD void barycentric_weights_backward(const int* rank, const double* scale, int d, const double* grad_bary,
                                            double* grad_f) {
  double grad_elevated[kMaxDim + 1];
  for (int i = 0; i <= d; ++i) {
    const int slot = d - rank[i];
    const double next = slot + 1 == d + 1 ? grad_bary[0] : grad_bary[slot + 1];
    grad_elevated[i] = (grad_bary[slot] - next) / (d + 1);
  }
  double prefix = 0.0;
  for (int k = 0; k < d; ++k) {
    prefix = prefix + grad_elevated[k];
    grad_f[k] = (prefix - (k + 1) * grad_elevated[k + 1]) * scale[k];
  }
}

// barycentric_weights_backward for the point `f` (d features): its simplex found again.
template <typename scalar_t>
CRFRNN_HD void embed_point_backward(const scalar_t* f, const LatticeScales& scales, int d, const double* grad_bary,
                                    double* grad_f) {
  int rem0[kMaxDim + 1];
  int rank[kMaxDim + 1];
  double bary[kMaxDim + 1];
  embed_point_scaled(f, scales, d, rem0, rank, bary);
  barycentric_weights_backward(rank, scales.value, d, grad_bary, grad_f);
}

// Key (length d+1: image, k_0..k_{d-1}) of vertex r of the simplex found by embed_point.
CRFRNN_HD void simplex_vertex_key(const int* rem0, const int* rank, int d, int r, int image, int* key) {
  key[0] = image;
  for (int i = 0; i < d; ++i) key[i + 1] = rem0[i] + r - (rank[i] > d - r ? d + 1 : 0);
}

// Key of the blur neighbour of `key` along direction j (0..d); sign +1 or -1.
CRFRNN_HD void neighbor_key(const int* key, int d, int j, int sign, int* out) {
  out[0] = key[0];
  for (int i = 0; i < d; ++i) out[i + 1] = key[i + 1] - sign * (i == j ? -d : 1);
}

// murmur3's 64-bit finaliser: every input bit reaches every output bit.
CRFRNN_HD uint64_t murmur_finalize(uint64_t h) {
  h ^= h >> 33;
  h *= 0xFF51AFD7ED558CCDull;
  h ^= h >> 33;
  h *= 0xC4CEB9FE1A85EC53ull;
  h ^= h >> 33;
  return h;
}

// 64-bit hash of a key of n ints: multiply-xorshift per coordinate, then murmur3's finaliser,
// so that keys differing by +-1 in one coordinate (lattice neighbours) land far apart.
CRFRNN_HD uint64_t hash_key(const int* key, int n) {
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (int i = 0; i < n; ++i) {
    h = (h ^ static_cast<uint64_t>(static_cast<uint32_t>(key[i]))) * 0x100000001B3ull;
    h ^= h >> 29;
  }
  return murmur_finalize(h);
}

CRFRNN_HD bool keys_equal(const int* a, const int* b, int n) {
  for (int i = 0; i < n; ++i) if (a[i] != b[i]) return false;
  return true;
}

// Slice gain compensation 1/(1 + 2^-d), as densecrf.
CRFRNN_HD double blur_alpha(int d) { return 1.0 / (1.0 + pow(2.0, -static_cast<double>(d))); }

}  // namespace crfrnn
