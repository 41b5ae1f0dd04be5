// CPU (C++) backend of the permutohedral lattice: build and filter, parallel over points and
// vertices with at::parallel_for, deterministic (no racy accumulation anywhere).
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../lattice_math.h"
#include "filter_loops.h"

namespace crfrnn {
namespace {

// Open-addressing hash table from keys (key_len ints) to numbers 0..M-1 in insertion order.
// Each slot holds the number and 32 bits of the key's hash, so a probe that meets another key
// is rejected without fetching that key (a cache miss on large lattices).
class VertexTable {
 public:
  VertexTable(int key_len, int64_t expected) : key_len_(key_len) {
    int64_t capacity = 1024;
    while (capacity < 2 * expected) capacity *= 2;
    slots_.assign(capacity, Slot{0, -1});
  }

  int size() const { return static_cast<int>(keys_.size() / key_len_); }
  const int* key(int v) const { return keys_.data() + static_cast<int64_t>(v) * key_len_; }

  // Number of `key`, or -1.
  int find(const int* key) const { return slots_[probe(key, hash_key(key, key_len_))].id; }

  int find_or_insert(const int* key) { return find_or_insert(key, hash_key(key, key_len_)); }

  // Same, with h = hash_key(key, key_len) computed by the caller (in a parallel pass).
  int find_or_insert(const int* key, uint64_t h) {
    const uint64_t i = probe(key, h);
    if (slots_[i].id >= 0) return slots_[i].id;
    const int v = size();
    keys_.insert(keys_.end(), key, key + key_len_);
    slots_[i] = Slot{tag(h), v};
    if (2 * static_cast<int64_t>(size()) > static_cast<int64_t>(slots_.size())) grow();
    return v;
  }

 private:
  struct Slot {
    uint32_t tag;  // high half of the key's hash
    int32_t id;    // -1: empty
  };
  static uint32_t tag(uint64_t h) { return static_cast<uint32_t>(h >> 32); }

  // Slot holding `key`, or the empty slot where it would go (linear probing, load <= 1/2).
  uint64_t probe(const int* key, uint64_t h) const {
    const uint64_t mask = slots_.size() - 1;
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
      const Slot& slot = slots_[i];
      if (slot.id < 0 || (slot.tag == tag(h) && keys_equal(this->key(slot.id), key, key_len_))) return i;
    }
  }

  void grow() {
    std::vector<Slot> bigger(slots_.size() * 2, Slot{0, -1});
    const uint64_t mask = bigger.size() - 1;
    for (const Slot& slot : slots_) {
      if (slot.id < 0) continue;
      uint64_t i = hash_key(key(slot.id), key_len_) & mask;
      while (bigger[i].id >= 0) i = (i + 1) & mask;
      bigger[i] = slot;
    }
    slots_.swap(bigger);
  }

  int key_len_;
  std::vector<int> keys_;
  std::vector<Slot> slots_;
};

// A scratch array left uninitialised: every element is written before it is read, and zeroing
// megabytes first would put a serial pass (and its page faults) in front of parallel ones.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : data_(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]) {}
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }

 private:
  std::unique_ptr<T[]> data_;
};

// ---- build: its phases in order ---------------------------------------------------------------

// Phase 1's result, per point: its simplex key (image, rem0[0..d], rank[0..d]), the key's hash
// and the barycentric weights.
struct EmbeddedPoints {
  int key_len;             // 2 (d+1) + 1
  Scratch<int> simplex;    // [P, key_len]
  Scratch<uint64_t> hash;  // [P]
  at::Tensor weights;      // [P, d+1]: float32 for half/bfloat16 features, else their dtype
};

// Phase 1 (parallel): the simplex, its key's hash and the barycentric weights of every point
// (features [N, P, d], contiguous), with the NaN/Inf and range checks of the features fused into
// the same pass (ValueError, with crfrnn.reference.check_feature_values' messages).
EmbeddedPoints embed_points(const at::Tensor& features) {
  const int64_t per_image = features.size(1), num_points = features.size(0) * per_image;
  const int d = static_cast<int>(features.size(2)), d1 = d + 1;
  const bool low_precision = features.scalar_type() == at::kHalf || features.scalar_type() == at::kBFloat16;
  const auto weight_dtype = low_precision ? at::kFloat : features.scalar_type();
  const int key_len = 2 * d1 + 1;
  EmbeddedPoints points{key_len, Scratch<int>(num_points * key_len), Scratch<uint64_t>(num_points),
                        at::empty({num_points, d1}, features.options().dtype(weight_dtype))};
  // (By dtype, not by pointer: an empty tensor's data pointer is null.)
  const bool double_weights = points.weights.scalar_type() == at::kDouble;
  double* weights_double = double_weights ? points.weights.data_ptr<double>() : nullptr;
  float* weights_float = double_weights ? nullptr : points.weights.data_ptr<float>();
  LatticeScales scales;
  lattice_scales(d, &scales);
  std::atomic<int64_t> non_finite{0};
  std::atomic<bool> out_of_range{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crfrnn_embed", [&] {
    const scalar_t* f = features.data_ptr<scalar_t>();
    // The points of [lo, hi), the dimension a constant (dim) for the CRF's kernels.
    auto embed_range = [&](int64_t lo, int64_t hi, auto dim) {
      int64_t bad = 0;
      bool too_big = false;
      for (int64_t p = lo; p < hi; ++p) {
        const scalar_t* fp = f + p * d;
        bool skip = false;
        for (int i = 0; i < d; ++i) {
          const double x = static_cast<double>(fp[i]);
          const bool finite = std::isfinite(x);
          bad += !finite;
          too_big |= finite && std::fabs(x) > kMaxAbsFeature;
          skip |= !finite || std::fabs(x) > kMaxAbsFeature;
        }
        if (skip) continue;  // the build fails below; never embed (overflowing) garbage
        int* key = points.simplex.data() + p * key_len;
        key[0] = static_cast<int>(p / per_image);
        double bary[kMaxDim + 1];
        embed_point_scaled(fp, scales, dim, key + 1, key + 1 + d1, bary);
        points.hash[p] = hash_key(key, key_len);
        if (weights_double) std::copy(bary, bary + d1, weights_double + p * d1);
        else std::copy(bary, bary + d1, weights_float + p * d1);
      }
      non_finite += bad;
      if (too_big) out_of_range = true;
    };
    at::parallel_for(0, num_points, 2048, [&](int64_t lo, int64_t hi) {
      switch (d) {  // the bilateral (d = 5) and spatial (d = 2) kernels
        case 5: return embed_range(lo, hi, std::integral_constant<int, 5>{});
        case 2: return embed_range(lo, hi, std::integral_constant<int, 2>{});
        default: return embed_range(lo, hi, d);
      }
    });
  });
  TORCH_CHECK_VALUE(non_finite == 0, "features contain ", non_finite.load(), " NaN/Inf values");
  if (out_of_range) {
    TORCH_CHECK_VALUE(false, "features must be at most ", kMaxAbsFeature,
                      " in magnitude (after scaling by 1/sigma), got ", features.abs().max().item<double>(),
                      ": is a bandwidth tiny or not applied?");
  }
  return points;
}

// Phase 2a's result: each point's simplex number, and the first point of each simplex.
struct SimplexNumbering {
  Scratch<int> of_point;             // [P]
  std::vector<int64_t> first_point;  // [S]
};

// Phase 2a (serial): number the simplices in order of first appearance, so that numbering is
// deterministic (the CUDA backend numbers the vertices in the same order). Many pixels share a
// simplex, so most points cost one lookup instead of d+1 in the vertex numbering after it.
SimplexNumbering number_simplices(const EmbeddedPoints& points, int64_t num_points) {
  const int key_len = points.key_len;
  VertexTable simplices(key_len, std::max<int64_t>(num_points / 4, 1));
  SimplexNumbering numbering{Scratch<int>(num_points), {}};
  for (int64_t p = 0; p < num_points; ++p) {
    const int* key = points.simplex.data() + p * key_len;
    // Neighbouring pixels often share a simplex: compare with the previous point's key (in
    // cache) before probing the table (a likely cache miss).
    if (p > 0 && points.hash[p] == points.hash[p - 1] && keys_equal(key, key - key_len, key_len)) {
      numbering.of_point[p] = numbering.of_point[p - 1];
      continue;
    }
    const int known = simplices.size();
    const int id = simplices.find_or_insert(key, points.hash[p]);
    if (id == known) numbering.first_point.push_back(p);
    numbering.of_point[p] = id;
  }
  return numbering;
}

// Phase 2b's result: the keys ([S, d+1, d+1]) and hashes ([S, d+1]) of each simplex's vertices.
struct SimplexVertexKeys {
  Scratch<int> key;
  Scratch<uint64_t> hash;
};

// Phase 2b (parallel): the keys and hashes of the d+1 vertices of each simplex.
SimplexVertexKeys simplex_vertex_keys(const EmbeddedPoints& points, const std::vector<int64_t>& first_point, int d) {
  const int d1 = d + 1;
  const int64_t num_simplices = static_cast<int64_t>(first_point.size());
  SimplexVertexKeys vertices{Scratch<int>(num_simplices * d1 * d1), Scratch<uint64_t>(num_simplices * d1)};
  at::parallel_for(0, num_simplices, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int* key = points.simplex.data() + first_point[t] * points.key_len;
      for (int r = 0; r < d1; ++r) {
        int* vertex_key = vertices.key.data() + (t * d1 + r) * d1;
        simplex_vertex_key(key + 1, key + 1 + d1, d, r, key[0], vertex_key);
        vertices.hash[t * d1 + r] = hash_key(vertex_key, d1);
      }
    }
  });
  return vertices;
}

// Phase 2c (serial): number the vertices in order of first appearance into `table` (keys of d+1
// ints); returns the d+1 vertex numbers of each of the num_simplices simplices.
Scratch<int> number_vertices(const SimplexVertexKeys& vertices, int64_t num_simplices, int d1, VertexTable& table) {
  Scratch<int> simplex_vertices(num_simplices * d1);
  for (int64_t j = 0; j < num_simplices * d1; ++j) {
    simplex_vertices[j] = table.find_or_insert(vertices.key.data() + j * d1, vertices.hash[j]);
  }
  return simplex_vertices;
}

// Phase 2d (parallel): each point's vertices, vertex_index [P, d+1], from its simplex's.
at::Tensor point_vertices(const Scratch<int>& simplex_vertices, const Scratch<int>& simplex_of_point,
                          int64_t num_points, int d1, const at::TensorOptions& int_opts) {
  at::Tensor vertex_index = at::empty({num_points, d1}, int_opts);
  int* vi = vertex_index.data_ptr<int>();
  at::parallel_for(0, num_points, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const int* from = simplex_vertices.data() + static_cast<int64_t>(simplex_of_point[p]) * d1;
      std::copy(from, from + d1, vi + p * d1);
    }
  });
  return vertex_index;
}

// Phase 3 (parallel, read-only lookups): the blur neighbours [d+1, M, 2] of the M vertices of
// `table`; missing ones point at row M.
at::Tensor blur_neighbors(const VertexTable& table, int d, const at::TensorOptions& int_opts) {
  const int d1 = d + 1;
  const int64_t m = table.size();
  at::Tensor neighbors = at::empty({d1, m, 2}, int_opts);
  int* nb = neighbors.data_ptr<int>();
  at::parallel_for(0, m, 256, [&](int64_t lo, int64_t hi) {
    int nkey[kMaxDim + 1];
    for (int64_t v = lo; v < hi; ++v) {
      for (int j = 0; j < d1; ++j) {
        for (int side = 0; side < 2; ++side) {
          neighbor_key(table.key(static_cast<int>(v)), d, j, side == 0 ? 1 : -1, nkey);
          const int found = table.find(nkey);
          nb[(j * m + v) * 2 + side] = found < 0 ? static_cast<int>(m) : found;
        }
      }
    }
  });
  return neighbors;
}

// Phase 4 (parallel): the vertex -> entries table (splat_offsets [M+1], splat_entries [P (d+1)]:
// the entries p*(d+1) + r of each vertex in increasing order), a counting sort of the entries'
// vertex numbers vertex_index [P, d+1]. The entries are cut into blocks (a number fixed by the
// problem, not the thread count): each block counts its entries per vertex, then fills its own
// slots in entry order, so the table is the same as a serial sort's.
std::pair<at::Tensor, at::Tensor> vertex_entries_table(const at::Tensor& vertex_index, int64_t m) {
  const int* vi = vertex_index.data_ptr<int>();
  const int64_t num_entries = vertex_index.numel();
  at::Tensor splat_offsets = at::empty({m + 1}, vertex_index.options());
  at::Tensor splat_entries = at::empty({num_entries}, vertex_index.options());
  int* offsets = splat_offsets.data_ptr<int>();
  int* entries = splat_entries.data_ptr<int>();
  // Per-block counts cost blocks x M ints: at most 4 ints per entry, at most 16 blocks.
  const int64_t blocks = std::min<int64_t>(16, std::max<int64_t>(1, 4 * num_entries / std::max<int64_t>(m, 1)));
  auto block_start = [&](int64_t b) { return num_entries * b / blocks; };
  std::vector<int> slot(static_cast<size_t>(blocks * m), 0);  // counts, then each block's next slot
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int* count = slot.data() + b * m;
      for (int64_t e = block_start(b); e < block_start(b + 1); ++e) ++count[vi[e]];
    }
  });
  offsets[0] = 0;
  for (int64_t v = 0; v < m; ++v) {
    int total = 0;
    for (int64_t b = 0; b < blocks; ++b) total += slot[b * m + v];
    offsets[v + 1] = offsets[v] + total;
  }
  at::parallel_for(0, m, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t v = lo; v < hi; ++v) {
      int next = offsets[v];
      for (int64_t b = 0; b < blocks; ++b) {
        const int count = slot[b * m + v];
        slot[b * m + v] = next;
        next += count;
      }
    }
  });
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int* next = slot.data() + b * m;
      for (int64_t e = block_start(b); e < block_start(b + 1); ++e) entries[next[vi[e]]++] = static_cast<int>(e);
    }
  });
  return {splat_offsets, splat_entries};
}

// The lattice of features [N, P, d], phase by phase. Phases 2a-2d number the simplices, then their
// vertices, in order of first appearance in (point, corner) order, as the CUDA backend numbers
// them: the table insertions are serial, the hashing and key arithmetic around them parallel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_lattice_cpu(
    const at::Tensor& features_in) {
  check_features(features_in);
  TORCH_CHECK(features_in.device().is_cpu(), "crfrnn::build_lattice (CPU kernel): features on ",
              features_in.device());
  const at::Tensor features = features_in.contiguous();
  const int64_t num_points = features.size(0) * features.size(1);
  const int d = static_cast<int>(features.size(2)), d1 = d + 1;
  const auto int_opts = features.options().dtype(at::kInt);

  const EmbeddedPoints points = embed_points(features);
  const SimplexNumbering simplices = number_simplices(points, num_points);
  const SimplexVertexKeys vertex_keys = simplex_vertex_keys(points, simplices.first_point, d);
  VertexTable table(d1, std::max<int64_t>(num_points / 4, 1));
  const Scratch<int> simplex_vertices =
      number_vertices(vertex_keys, static_cast<int64_t>(simplices.first_point.size()), d1, table);
  at::Tensor vertex_index = point_vertices(simplex_vertices, simplices.of_point, num_points, d1, int_opts);
  at::Tensor neighbors = blur_neighbors(table, d, int_opts);
  auto [splat_offsets, splat_entries] = vertex_entries_table(vertex_index, table.size());
  return {vertex_index, points.weights, neighbors, splat_offsets, splat_entries};
}

// ---- filter ---------------------------------------------------------------------------------------

// The blurred splat of values [P, C]: splat, then blur along the d1 directions (in reverse order if
// `reverse`), in the (M+1) x C buffers `grid` and `next`; returns the one holding the result (its
// row M zero).
template <typename T>
const T* splat_and_blur(const T* values, int64_t num_points, int64_t c, const int* vi, const T* w, int d1,
                        const int* nb, const int* offsets, const int* entries, int64_t m, bool reverse, T* grid,
                        T* next) {
  std::fill(next + m * c, next + (m + 1) * c, T(0));  // the zero row (every other row is written)
  if (c < at::get_num_threads()) splat_by_vertex(values, c, w, d1, offsets, entries, m, grid);
  else splat_by_point(values, num_points, c, vi, w, d1, m, grid);
  return blur_grid(grid, next, nb, m, c, d1, reverse);
}

template <typename T>
void filter_cpu_impl(const T* values, int64_t num_points, int64_t c, const int* vi, const T* w, int d1,
                     const int* nb, const int* offsets, const int* entries, int64_t m, bool reverse, T* out) {
  // Two (M+1) x C grids, kept per thread between calls up to kReusedBytes (filter_loops.h).
  thread_local std::vector<T> kept_grid, kept_next;
  std::vector<T> own_grid, own_next;
  const size_t size = static_cast<size_t>((m + 1) * c);
  const bool reuse = size * sizeof(T) <= kReusedBytes;
  std::vector<T>& grid_buffer = reuse ? kept_grid : own_grid;
  std::vector<T>& next_buffer = reuse ? kept_next : own_next;
  if (grid_buffer.size() < size) { grid_buffer.resize(size); next_buffer.resize(size); }
  const T* grid = splat_and_blur(values, num_points, c, vi, w, d1, nb, offsets, entries, m, reverse,
                                 grid_buffer.data(), next_buffer.data());
  slice_points(grid, vi, w, d1, num_points, c, static_cast<T>(blur_alpha(d1 - 1)), out);
}

at::Tensor lattice_filter_cpu(const at::Tensor& values_in, const at::Tensor& vertex_index,
                              const at::Tensor& weights, const at::Tensor& neighbors,
                              const at::Tensor& splat_offsets, const at::Tensor& splat_entries,
                              bool reverse) {
  check_filter_args(values_in, vertex_index, weights, neighbors, splat_offsets, splat_entries);
  check_filter_tables(vertex_index, neighbors, splat_offsets, splat_entries);
  const at::Tensor values = values_in.contiguous();
  at::Tensor out = at::empty_like(values);
  if (values.numel() == 0) return out;
  const at::Tensor vi = vertex_index.contiguous(), w = weights.contiguous(), nb = neighbors.contiguous();
  const at::Tensor offsets = splat_offsets.contiguous(), entries = splat_entries.contiguous();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "crfrnn_filter", [&] {
    filter_cpu_impl<scalar_t>(values.data_ptr<scalar_t>(), values.size(0), values.size(1),
                              vi.data_ptr<int>(), w.data_ptr<scalar_t>(), static_cast<int>(vi.size(1)),
                              nb.data_ptr<int>(), offsets.data_ptr<int>(), entries.data_ptr<int>(), nb.size(1),
                              reverse, out.data_ptr<scalar_t>());
  });
  return out;
}

// ---- the feature gradient ---------------------------------------------------------------------

// The weights' gradient [P, d1] of <grad, filter(values)> (weight_grad_entry, parallel over the
// entries), from the forward grid (values splatted and blurred in the filter's order) and the
// adjoint grid (grad splatted and blurred in the reverse order).
template <typename T>
void weights_backward_cpu_impl(const T* values, const T* grad, int64_t num_points, int64_t c, const int* vi,
                               const T* w, int d1, const int* nb, const int* offsets, const int* entries, int64_t m,
                               bool reverse, T* out) {
  const int64_t size = (m + 1) * c;
  std::vector<T> buffers(static_cast<size_t>(4 * size));
  T* b = buffers.data();
  const T* forward_grid = splat_and_blur(values, num_points, c, vi, w, d1, nb, offsets, entries, m, reverse, b,
                                         b + size);
  const T* adjoint_grid = splat_and_blur(grad, num_points, c, vi, w, d1, nb, offsets, entries, m, !reverse,
                                         b + 2 * size, b + 3 * size);
  const T alpha = static_cast<T>(blur_alpha(d1 - 1));
  at::parallel_for(0, num_points * d1, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t e = lo; e < hi; ++e) {
      out[e] = weight_grad_entry(e, d1, vi, values, grad, forward_grid, adjoint_grid, c, alpha);
    }
  });
}

at::Tensor lattice_filter_weights_backward_cpu(const at::Tensor& values_in, const at::Tensor& grad_in,
                                               const at::Tensor& vertex_index, const at::Tensor& weights,
                                               const at::Tensor& neighbors, const at::Tensor& splat_offsets,
                                               const at::Tensor& splat_entries, bool reverse) {
  check_weights_backward_args(values_in, grad_in, vertex_index, weights, neighbors, splat_offsets, splat_entries);
  check_filter_tables(vertex_index, neighbors, splat_offsets, splat_entries);
  const at::Tensor values = values_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor vi = vertex_index.contiguous(), w = weights.contiguous(), nb = neighbors.contiguous();
  const at::Tensor offsets = splat_offsets.contiguous(), entries = splat_entries.contiguous();
  at::Tensor out = at::zeros(vi.sizes(), values.options());
  if (values.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "crfrnn_weights_backward", [&] {
    weights_backward_cpu_impl<scalar_t>(values.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                                        values.size(0), values.size(1), vi.const_data_ptr<int>(),
                                        w.const_data_ptr<scalar_t>(), static_cast<int>(vi.size(1)),
                                        nb.const_data_ptr<int>(), offsets.const_data_ptr<int>(),
                                        entries.const_data_ptr<int>(), nb.size(1), reverse,
                                        out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// The features' gradient [N, P, d] from the weights' (embed_point_backward, parallel over the
// points), in double, returned in the features' dtype (float32 for half/bfloat16 features).
at::Tensor barycentric_weights_backward_cpu(const at::Tensor& features_in, const at::Tensor& grad_weights) {
  check_barycentric_backward_args(features_in, grad_weights);
  TORCH_CHECK(features_in.device().is_cpu(), "crfrnn::barycentric_weights_backward (CPU kernel): features on ",
              features_in.device());
  check_feature_values(features_in);
  const at::Tensor features = features_in.contiguous();
  const at::Tensor g = grad_weights.to(at::kDouble).contiguous();
  const int64_t num_points = features.size(0) * features.size(1);
  const int d = static_cast<int>(features.size(2));
  const bool low_precision = features.scalar_type() == at::kHalf || features.scalar_type() == at::kBFloat16;
  at::Tensor grad = at::empty(features.sizes(), features.options().dtype(at::kDouble));
  LatticeScales scales;
  lattice_scales(d, &scales);
  const double* gw = g.const_data_ptr<double>();
  double* out = grad.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crfrnn_bary_backward", [&] {
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    at::parallel_for(0, num_points, 2048, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) embed_point_backward(f + p * d, scales, d, gw + p * (d + 1), out + p * d);
    });
  });
  return grad.to(low_precision ? at::kFloat : features.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(crfrnn, CPU, m) {
  m.impl("build_lattice", &build_lattice_cpu);
  m.impl("lattice_filter", &lattice_filter_cpu);
  m.impl("lattice_filter_weights_backward", &lattice_filter_weights_backward_cpu);
  m.impl("barycentric_weights_backward", &barycentric_weights_backward_cpu);
}

}  // namespace crfrnn
