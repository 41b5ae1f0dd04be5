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

// The CPU hash tables' hash of a key of n ints: a linear form sum_i key[i] c_i modulo 2^64 with
// random odd 64-bit c_i (independent multiplies, where hash_key of lattice_math.h chains them),
// mixed by murmur3's finaliser. Linear, so a key's neighbour (the key plus a fixed shift) has the
// linear form plus the shift's (blur_neighbors). Only the tables' layout depends on it, never a
// result: the CUDA build may hash as it likes.
constexpr uint64_t hash_multiplier(uint64_t i) {
  uint64_t x = 0x9E3779B97F4A7C15ull * (i + 1);  // splitmix64 of i
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return (x ^ (x >> 31)) | 1;
}

struct HashMultipliers {
  uint64_t c[2 * kMaxDim + 3];  // the longest key: a simplex's (image, rem0[0..d], rank[0..d])
  constexpr HashMultipliers() : c() {
    for (int i = 0; i < 2 * kMaxDim + 3; ++i) c[i] = hash_multiplier(static_cast<uint64_t>(i));
  }
};
constexpr HashMultipliers kHashMultipliers{};

template <typename Len>
inline uint64_t linear_form(const int* key, Len n) {
  uint64_t h = 0;
  for (int i = 0; i < n; ++i) h += static_cast<uint64_t>(static_cast<int64_t>(key[i])) * kHashMultipliers.c[i];
  return h;
}

template <typename Len>
inline uint64_t table_hash(const int* key, Len n) { return murmur_finalize(linear_form(key, n)); }

// Open-addressing hash table from keys (key_len ints) to numbers 0..M-1 in insertion order.
// Each slot holds the number and 32 bits of the key's hash (table_hash), so a probe that meets
// another key is rejected without fetching that key (a cache miss on large lattices).
class VertexTable {
 public:
  VertexTable(int key_len, int64_t expected) : key_len_(key_len) {
    int64_t capacity = 1024;
    while (capacity < 2 * expected) capacity *= 2;
    slots_.assign(capacity, Slot{0, -1});
  }

  int size() const { return static_cast<int>(keys_.size() / key_len_); }
  const int* key(int v) const { return keys_.data() + static_cast<int64_t>(v) * key_len_; }

  // Number of `key`, or -1; h = table_hash(key, key_len).
  int find(const int* key, uint64_t h) const { return slots_[probe(key, h)].id; }

  // Starts fetching the first slot a probe for hash h reads (its cache miss then overlaps others').
  void prefetch(uint64_t h) const { __builtin_prefetch(slots_.data() + (h & (slots_.size() - 1))); }

  int find_or_insert(const int* key) { return find_or_insert(key, table_hash(key, key_len_)); }

  // Same, with h = table_hash(key, key_len) computed by the caller.
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
      uint64_t i = table_hash(key(slot.id), key_len_) & mask;
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
//
// The vertices are numbered in order of first appearance in (point, corner) order, as the CUDA
// backend numbers them: the numbering is part of the result, the same on any number of threads.
// Phase 1 cuts the points into contiguous chunks, one per thread; each thread embeds its points,
// groups them by simplex (the points of a group share its d+1 vertices, so a group costs d+1 key
// lookups however many points it has) and numbers the vertices of its groups in a hash table of
// its own, in order of first appearance within the chunk. Phase 2 merges these tables, chunk by
// chunk, into the lattice's: a vertex new to it was first met in that chunk, and among the
// chunk's new vertices in the chunk's order, so the merge numbers every vertex in order of first
// appearance overall. It handles each chunk's distinct vertices (the lattice's M and a few more,
// M << P (d+1)); all the work per point or per corner runs in parallel.
//
// Why groups keep that order: a chunk's groups are sets of points with one simplex each, listed
// in order of their first points, and their corners are visited group by group. A vertex first
// met at corner r of point p (in (point, corner) order) is met at corner r of the first point of
// p's group, which therefore is p: the visit meets every vertex first where the points do. Any
// such grouping will do, so each thread picks the cheaper one for its points: a hash table of the
// simplices (images: ten points or more per simplex, and a table that stays in cache) or, where
// that saves less than half of the work, runs of consecutive points with one simplex (volumes and
// point clouds: most simplices hold one or two points, and a table of them misses the cache).

// Points per check of a chunk's grouping: it keeps its table of simplices while that at least
// halves the groups that runs of equal simplices would make.
constexpr int64_t kGroupingCheck = 4096;
// Entries of a chunk's cache of recently met vertices (a power of two).
constexpr int64_t kRecentVertices = 4096;
// Probes after which that cache is dropped if it served fewer than one in eight.
constexpr int64_t kRecentTrial = 16384;
// Fewest points per chunk of phase 1 (fewer points: fewer chunks, one for a small lattice).
constexpr int64_t kMinChunkPoints = 4096;

// One chunk of points, from phase 1 on.
struct Chunk {
  int64_t begin = 0, end = 0;      // its points
  std::vector<int> group_key;      // [G, 2(d+1)+1]: each group's simplex (image, rem0, rank)
  VertexTable vertices{1, 0};      // its vertices (keys of d+1 ints), numbered in order of first appearance
  std::vector<int> corner_vertex;  // [G, d+1]: the vertex (chunk's number) of each group's corners
  std::vector<int> global;         // [its vertices]: their numbers in the lattice (phase 2)
  int64_t non_finite = 0;          // feature checks
  bool too_big = false;
};

// Phase 1 for one chunk (features f [P, d]; group[p]: p's group in its chunk): embed each point
// (barycentric weights into weights [P, d+1]), group the points, number the groups' vertices.
// Points with NaN/Inf or too large features are counted and skipped (the build then fails).
template <typename scalar_t, typename Dim, typename Weight>
void embed_and_group(const scalar_t* f, int64_t per_image, Dim d, const LatticeScales& scales, Chunk& chunk,
                     int* group, Weight* weights) {
  const int d1 = d + 1, key_len = 2 * d1 + 1;
  const int64_t size = chunk.end - chunk.begin;
  VertexTable simplices(key_len, std::max<int64_t>(size / 16, 1));
  bool use_table = true;
  int64_t runs = 0, num_groups = 0, last_group = -1;
  int key[2 * kMaxDim + 3];
  int last_key[2 * kMaxDim + 3];
  double bary[kMaxDim + 1];
  for (int64_t p = chunk.begin; p < chunk.end; ++p) {
    const scalar_t* fp = f + p * d;
    bool skip = false;
    for (int i = 0; i < d; ++i) {
      const double x = static_cast<double>(fp[i]);
      const bool finite = std::isfinite(x);
      chunk.non_finite += !finite;
      chunk.too_big |= finite && std::fabs(x) > kMaxAbsFeature;
      skip |= !finite || std::fabs(x) > kMaxAbsFeature;
    }
    if (skip) continue;  // the build fails after phase 1; never embed (overflowing) garbage
    key[0] = static_cast<int>(p / per_image);
    embed_point_scaled(fp, scales, d, key + 1, key + 1 + d1, bary);
    std::copy(bary, bary + d1, weights + p * d1);
    if (last_group >= 0 && keys_equal(key, last_key, key_len)) {  // the previous point's simplex
      group[p] = static_cast<int>(last_group);
    } else {
      ++runs;
      int64_t g = num_groups;
      if (use_table) g = simplices.find_or_insert(key);
      if (g == num_groups) {
        chunk.group_key.insert(chunk.group_key.end(), key, key + key_len);
        ++num_groups;
      }
      group[p] = static_cast<int>(g);
      last_group = g;
      std::copy(key, key + key_len, last_key);
    }
    if (use_table && (p - chunk.begin + 1) % kGroupingCheck == 0 && 2 * num_groups > runs) {
      use_table = false;  // it saves less than half of the groups: runs from here on
      simplices = VertexTable(key_len, 0);
    }
  }
  // The groups' vertices, numbered in order of first appearance (group by group, corner by corner).
  chunk.vertices = VertexTable(d1, std::max<int64_t>(num_groups / 2, 1));
  chunk.corner_vertex.resize(static_cast<size_t>(num_groups * d1));
  // Consecutive groups are often neighbouring simplices, which share most vertices, at the same
  // corners (in volumes half the corners): compare with the previous group's before probing.
  // Then a small cache of recently met vertices (by hash, a few kB: nearby groups, such as the
  // previous row's, meet them again) before the table, whose slots miss the cache.
  int keys[2][kMaxDim + 1][kMaxDim + 1];
  struct Recent {
    uint32_t tag;
    int32_t id;  // -1: empty
  };
  std::vector<Recent> recent(kRecentVertices, Recent{0, -1});
  bool use_recent = true;  // until it proves useless (points in no spatial order)
  int64_t probes = 0, hits = 0;
  // A group's corners in two passes: first the keys, the cheap matches (the previous group's
  // corner, the cache) and a prefetch of the table slot of each other corner; then the table
  // lookups, in corner order (new vertices are numbered in order), their cache misses overlapped.
  uint64_t hashes[kMaxDim + 1];
  bool pending[kMaxDim + 1];
  for (int64_t g = 0; g < num_groups; ++g) {
    const int* s = chunk.group_key.data() + g * key_len;
    int* corner = chunk.corner_vertex.data() + g * d1;
    for (int r = 0; r < d1; ++r) {
      int* vertex_key = keys[g & 1][r];
      simplex_vertex_key(s + 1, s + 1 + d1, d, r, s[0], vertex_key);
      pending[r] = false;
      if (g > 0 && keys_equal(vertex_key, keys[(g - 1) & 1][r], d1)) {
        corner[r] = corner[r - d1];
        continue;
      }
      const uint64_t h = table_hash(vertex_key, d1);
      hashes[r] = h;
      if (use_recent) {
        const Recent& seen = recent[(h >> 16) & (kRecentVertices - 1)];
        ++probes;
        if (seen.id >= 0 && seen.tag == static_cast<uint32_t>(h >> 32) &&
            keys_equal(chunk.vertices.key(seen.id), vertex_key, d1)) {
          corner[r] = seen.id;
          ++hits;
          continue;
        }
      }
      pending[r] = true;
      chunk.vertices.prefetch(h);
    }
    for (int r = 0; r < d1; ++r) {
      if (!pending[r]) continue;
      const uint64_t h = hashes[r];
      corner[r] = chunk.vertices.find_or_insert(keys[g & 1][r], h);
      if (use_recent) recent[(h >> 16) & (kRecentVertices - 1)] = Recent{static_cast<uint32_t>(h >> 32), corner[r]};
    }
    if (use_recent && probes >= kRecentTrial && hits < probes / 8) use_recent = false;
  }
}

// Phase 1 (parallel over chunks): the chunks of features [N, P, d] (contiguous), each embedded,
// grouped and with its vertices numbered; the barycentric weights into `weights` [N*P, d+1]; the
// NaN/Inf and range checks of the features fused into the pass (ValueError, with
// crfrnn.reference.check_feature_values' messages).
std::vector<Chunk> embed_and_group_points(const at::Tensor& features, Scratch<int>& group, at::Tensor& weights) {
  const int64_t per_image = features.size(1), num_points = features.size(0) * per_image;
  const int d = static_cast<int>(features.size(2));
  const int64_t most_chunks = std::max<int64_t>(1, num_points / kMinChunkPoints);
  const int64_t num_chunks = num_points == 0 ? 0 : std::min<int64_t>(at::get_num_threads(), most_chunks);
  std::vector<Chunk> chunks(static_cast<size_t>(num_chunks));
  for (int64_t c = 0; c < num_chunks; ++c) {
    chunks[c].begin = num_points * c / num_chunks;
    chunks[c].end = num_points * (c + 1) / num_chunks;
  }
  LatticeScales scales;
  lattice_scales(d, &scales);
  // (By dtype, not by pointer: an empty tensor's data pointer is null.)
  const bool double_weights = weights.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crfrnn_embed", [&] {
    const scalar_t* f = features.data_ptr<scalar_t>();
    auto run = [&](Chunk& chunk, auto dim) {
      if (double_weights) embed_and_group(f, per_image, dim, scales, chunk, group.data(), weights.data_ptr<double>());
      else embed_and_group(f, per_image, dim, scales, chunk, group.data(), weights.data_ptr<float>());
    };
    at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        switch (d) {  // the CRF's kernels: 2-D spatial and bilateral, 3-D, point clouds
          case 2: run(chunks[c], std::integral_constant<int, 2>{}); break;
          case 3: run(chunks[c], std::integral_constant<int, 3>{}); break;
          case 4: run(chunks[c], std::integral_constant<int, 4>{}); break;
          case 5: run(chunks[c], std::integral_constant<int, 5>{}); break;
          case 6: run(chunks[c], std::integral_constant<int, 6>{}); break;
          case 7: run(chunks[c], std::integral_constant<int, 7>{}); break;
          default: run(chunks[c], d);
        }
      }
    });
  });
  int64_t non_finite = 0;
  bool too_big = false;
  for (const Chunk& chunk : chunks) {
    non_finite += chunk.non_finite;
    too_big |= chunk.too_big;
  }
  TORCH_CHECK_VALUE(non_finite == 0, "features contain ", non_finite, " NaN/Inf values");
  if (too_big) {
    TORCH_CHECK_VALUE(false, "features must be at most ", kMaxAbsFeature,
                      " in magnitude (after scaling by 1/sigma), got ", features.abs().max().item<double>(),
                      ": is a bandwidth tiny or not applied?");
  }
  return chunks;
}

// Phase 2 (serial over the chunks' distinct vertices): the lattice's vertices, numbered in order of
// first appearance, and each chunk's vertices' numbers in it.
VertexTable merge_vertices(std::vector<Chunk>& chunks, int d1) {
  int64_t total = 0;
  for (const Chunk& chunk : chunks) total += chunk.vertices.size();
  VertexTable table(d1, std::max<int64_t>(total, 1));  // never grows
  constexpr int kAhead = 8;  // keys hashed and their slots prefetched this far ahead
  for (Chunk& chunk : chunks) {
    const int n = chunk.vertices.size();
    chunk.global.resize(static_cast<size_t>(n));
    uint64_t hashes[kAhead];
    for (int v = 0; v < std::min(n, kAhead); ++v) {
      hashes[v] = table_hash(chunk.vertices.key(v), d1);
      table.prefetch(hashes[v]);
    }
    for (int v = 0; v < n; ++v) {
      const uint64_t h = hashes[v % kAhead];
      if (v + kAhead < n) {
        hashes[v % kAhead] = table_hash(chunk.vertices.key(v + kAhead), d1);
        table.prefetch(hashes[v % kAhead]);
      }
      chunk.global[v] = table.find_or_insert(chunk.vertices.key(v), h);
    }
  }
  return table;
}

// Phase 3 (parallel): each point's vertices, vertex_index [P, d+1], from its group's.
at::Tensor point_vertices(const std::vector<Chunk>& chunks, const Scratch<int>& group, int64_t num_points, int d1,
                          const at::TensorOptions& int_opts) {
  at::Tensor vertex_index = at::empty({num_points, d1}, int_opts);
  int* vi = vertex_index.data_ptr<int>();
  at::parallel_for(0, num_points, 4096, [&](int64_t lo, int64_t hi) {
    size_t c = 0;
    for (int64_t p = lo; p < hi; ++p) {
      while (p >= chunks[c].end) ++c;
      const Chunk& chunk = chunks[c];
      const int* corner = chunk.corner_vertex.data() + static_cast<int64_t>(group[p]) * d1;
      for (int r = 0; r < d1; ++r) vi[p * d1 + r] = chunk.global[corner[r]];
    }
  });
  return vertex_index;
}

// Phase 4 (parallel, read-only lookups): the blur neighbours [d+1, M, 2] of the M vertices of
// `table`; missing ones point at row M. A neighbour's key is the vertex's plus a shift fixed by the
// direction and side, so its linear form (table_hash) is the vertex's plus the shift's.
at::Tensor blur_neighbors(const VertexTable& table, int d, const at::TensorOptions& int_opts) {
  const int d1 = d + 1;
  const int64_t m = table.size();
  at::Tensor neighbors = at::empty({d1, m, 2}, int_opts);
  int* nb = neighbors.data_ptr<int>();
  uint64_t shift_form[kMaxDim + 1][2];  // linear form of each shift
  {
    int zero[kMaxDim + 1] = {}, shifted[kMaxDim + 1];
    for (int j = 0; j < d1; ++j) {
      for (int side = 0; side < 2; ++side) {
        neighbor_key(zero, d, j, side == 0 ? 1 : -1, shifted);
        shift_form[j][side] = linear_form(shifted, d1);
      }
    }
  }
  at::parallel_for(0, m, 256, [&](int64_t lo, int64_t hi) {
    int nkey[kMaxDim + 1];
    // The neighbours' hashes one vertex ahead, their slots prefetched: the probes' cache misses
    // (the table is megabytes) overlap.
    uint64_t hashes[2][2 * (kMaxDim + 1)];
    auto hash_neighbours = [&](int64_t v, uint64_t* out) {
      const uint64_t form = linear_form(table.key(static_cast<int>(v)), d1);
      for (int j = 0; j < d1; ++j) {
        for (int side = 0; side < 2; ++side) {
          out[2 * j + side] = murmur_finalize(form + shift_form[j][side]);
          table.prefetch(out[2 * j + side]);
        }
      }
    };
    hash_neighbours(lo, hashes[0]);
    for (int64_t v = lo; v < hi; ++v) {
      if (v + 1 < hi) hash_neighbours(v + 1, hashes[(v + 1 - lo) & 1]);
      const uint64_t* h = hashes[(v - lo) & 1];
      const int* key = table.key(static_cast<int>(v));
      for (int j = 0; j < d1; ++j) {
        for (int side = 0; side < 2; ++side) {
          neighbor_key(key, d, j, side == 0 ? 1 : -1, nkey);
          const int found = table.find(nkey, h[2 * j + side]);
          nb[(j * m + v) * 2 + side] = found < 0 ? static_cast<int>(m) : found;
        }
      }
    }
  });
  return neighbors;
}

// Phase 5 (parallel): the vertex -> entries table (splat_offsets [M+1], splat_entries [P (d+1)]:
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

// The lattice of features [N, P, d], phase by phase.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_lattice_cpu(
    const at::Tensor& features_in) {
  check_features(features_in);
  TORCH_CHECK(features_in.device().is_cpu(), "crfrnn::build_lattice (CPU kernel): features on ",
              features_in.device());
  const at::Tensor features = features_in.contiguous();
  const int64_t num_points = features.size(0) * features.size(1);
  const int d = static_cast<int>(features.size(2)), d1 = d + 1;
  const auto int_opts = features.options().dtype(at::kInt);
  const bool low_precision = features.scalar_type() == at::kHalf || features.scalar_type() == at::kBFloat16;
  at::Tensor weights = at::empty({num_points, d1}, features.options().dtype(low_precision ? at::kFloat
                                                                                          : features.scalar_type()));

  Scratch<int> group(num_points);
  std::vector<Chunk> chunks = embed_and_group_points(features, group, weights);
  const VertexTable table = merge_vertices(chunks, d1);
  at::Tensor vertex_index = point_vertices(chunks, group, num_points, d1, int_opts);
  chunks.clear();
  at::Tensor neighbors = blur_neighbors(table, d, int_opts);
  auto [splat_offsets, splat_entries] = vertex_entries_table(vertex_index, table.size());
  return {vertex_index, weights, neighbors, splat_offsets, splat_entries};
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
