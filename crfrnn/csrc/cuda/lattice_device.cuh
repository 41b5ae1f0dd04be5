// Per-element bodies of the CUDA lattice kernels: what one GPU thread does for one index.
//
// The kernels of lattice_kernels.cu are grid-stride loops around these functions. They are
// `__host__ __device__` (CRFRNN_HD, as lattice_math.h) so that a host program can run them
// without a GPU (tests/cuda_emulation/harness.cpp: one index at a time in any order, or on many
// std::threads at once): on the host the atomics below are real atomics too.
//
// Build (K = P*(d+1) entries e = p*(d+1) + r, the corners of the points' simplices):
//   1. embed_one:   simplex (rem0, rank) and barycentric weights of each point;
//   2. insert_one:  lock-free open addressing (linear probing, atomicCAS on an int slot holding an
//                   entry id). A key is never stored: the key of entry e is recomputed from the
//                   (read-only) simplex table, so a slot is published by a single CAS and nothing
//                   can be read half-written. A slot only ever holds entries of one key, and
//                   atomicMin leaves in it the smallest entry of that key: its "owner";
//   3. owner_flag_one + a prefix sum (done with torch) + number_one: vertices numbered by their
//                   owner entry, i.e. in order of first appearance, exactly as the CPU
//                   build numbers them, whatever the slot layout the race produced;
//   4. neighbor_one: the blur neighbours of each vertex, by lookup;
//   5. csr_offsets_one: offsets of the vertex -> entries table from the entries stably sorted by
//                   vertex (the sort itself is torch's).
// Filter (deterministic gathers, no atomics): splat_one, blur_one, slice_one, one channel of one
// row each, run the steps of lattice_filter_steps.h, the bodies the C++ backend runs too.
// Feature gradient: weight_grad_one (one simplex corner of one point: weight_grad_entry of
// lattice_filter_steps.h) and feature_grad_one (one point: embed_point_backward of lattice_math.h).
#pragma once

#include <cstdint>

#include "../lattice_filter_steps.h"
#include "../lattice_math.h"

namespace crfrnn {
namespace device {

// ---- atomics ----------------------------------------------------------------------------------
//
// The only memory that one thread of a kernel writes while others read or write it is
// insert_one's hash table `slots` (and the overflow flag); every other kernel writes elements of
// its own. Those accesses go through the functions below: CUDA's atomics on the GPU, the GCC/Clang
// __atomic builtins on the host, so that the host harness runs the same race on real threads and
// ThreadSanitizer sees them as atomics (and any plain access to a slot as the race it would be).
//
// Memory order: relaxed is enough, on both sides, because a slot publishes nothing but its own
// value. It holds an entry id, and the key of that entry is recomputed from `simplex`, which an
// earlier kernel wrote: the launch boundary orders that before every insert (on the host, joining
// the threads of the launch does), so no reader needs acquire/release to see the key. What
// insert_one does need, relaxed atomics give:
//   - atomicity: two threads cannot both claim one empty slot (CAS), and no smaller entry of a
//     key is lost (min);
//   - coherence of each single slot: a slot goes from -1 to an entry and then only to smaller
//     entries of the same key, and a thread never reads it older than a value it has already
//     seen there; a CAS reads the newest value. So a stale load is harmless: a stale -1 is
//     corrected by the CAS, a stale larger entry has the same key and at worst costs a needless
//     atomicMin.
// The tables are read by later kernels, after the launch boundary, with plain loads. On the GPU
// load_relaxed is a volatile load (the PTX memory model treats ld.volatile as a relaxed load),
// and atomicCAS / atomicMin / atomicExch are relaxed, device-scope read-modify-writes.

CRFRNN_HD int load_relaxed(const int* address) {
#if defined(__CUDA_ARCH__)
  return *static_cast<const volatile int*>(address);
#else
  return __atomic_load_n(address, __ATOMIC_RELAXED);
#endif
}

#if !defined(__CUDA_ARCH__)
// The host's compare-and-swap (GCC/Clang builtin), as atomicCAS: returns the value found.
inline int host_atomic_cas(int* address, int expected, int desired) {
  int found = expected;  // the builtin replaces it by the value found when that is not `expected`
  __atomic_compare_exchange_n(address, &found, desired, /*weak=*/false, __ATOMIC_RELAXED,
                              __ATOMIC_RELAXED);
  return found;
}
#endif

// Returns the value found at `address`; wrote `desired` if (and only if) that was `expected`.
CRFRNN_HD int atomic_cas(int* address, int expected, int desired) {
#if defined(__CUDA_ARCH__)
  return atomicCAS(address, expected, desired);
#elif defined(CRFRNN_HOST_CAS_HOOK)
  // tests/cuda_emulation/harness.cpp's: host_atomic_cas after a yield (a wider race window), or
  // a deliberately non-atomic CAS, to show that the concurrent harness catches one.
  return CRFRNN_HOST_CAS_HOOK(address, expected, desired);
#else
  return host_atomic_cas(address, expected, desired);
#endif
}

CRFRNN_HD void atomic_min(int* address, int value) {
#if defined(__CUDA_ARCH__)
  atomicMin(address, value);
#else
  // GCC has no __atomic_fetch_min: a CAS loop, which ends when the slot holds `value` or less.
  int current = load_relaxed(address);
  while (value < current) {
    const int found = atomic_cas(address, current, value);
    if (found == current) return;
    current = found;
  }
#endif
}

CRFRNN_HD void atomic_raise_flag(int* address) {
#if defined(__CUDA_ARCH__)
  atomicExch(address, 1);
#else
  __atomic_store_n(address, 1, __ATOMIC_RELAXED);
#endif
}

// ---- build ----------------------------------------------------------------------------------------

// Key (image, k_0..k_{d-1}) of entry e = p*(d+1) + r: vertex r of point p's simplex.
// simplex: [P, 2(d+1)] (rem0 then rank per point); points p of image p / per_image.
CRFRNN_HD void entry_key(const int* simplex, int d, int64_t per_image, int64_t e, int* key) {
  const int d1 = d + 1;
  const int64_t p = e / d1;
  const int r = static_cast<int>(e - p * d1);
  const int* s = simplex + p * 2 * d1;
  simplex_vertex_key(s, s + d1, d, r, static_cast<int>(p / per_image), key);
}

// Point p: simplex[p] = (rem0, rank), bary[p, 0:d+1]. features: [P, d].
template <typename scalar_t>
CRFRNN_HD void embed_one(int64_t p, const scalar_t* features, int d, int* simplex, double* bary) {
  const int d1 = d + 1;
  int* s = simplex + p * 2 * d1;
  embed_point(features + p * d, d, s, s + d1, bary + p * d1);
}

// Entry e: find or claim the slot of its key; slot_of_entry[e] = that slot (-1 and *overflow = 1
// if every slot was probed, impossible while the table is less than full).
CRFRNN_HD void insert_one(int64_t e, const int* simplex, int d, int64_t per_image, int* slots,
                          uint64_t mask, int* slot_of_entry, int* overflow) {
  const int d1 = d + 1;
  int key[kMaxDim + 1];
  int other[kMaxDim + 1];
  entry_key(simplex, d, per_image, e, key);
  const int self = static_cast<int>(e);
  uint64_t i = hash_key(key, d1) & mask;
  for (uint64_t probes = 0; probes <= mask; ++probes, i = (i + 1) & mask) {
    // A stale read is harmless: -1 is corrected by the CAS, and an older occupant has the same
    // key as the newer one (a slot never changes key).
    int occupant = load_relaxed(slots + i);
    if (occupant < 0) {
      occupant = atomic_cas(slots + i, -1, self);
      if (occupant < 0) {  // claimed the empty slot
        slot_of_entry[e] = static_cast<int>(i);
        return;
      }
    }
    entry_key(simplex, d, per_image, occupant, other);
    if (keys_equal(key, other, d1)) {
      // Slot values only decrease: if it is already below `self`, its final value will be too.
      if (self < occupant) atomic_min(slots + i, self);
      slot_of_entry[e] = static_cast<int>(i);
      return;
    }
  }
  slot_of_entry[e] = -1;
  atomic_raise_flag(overflow);
}

// Entry e: 1 if it owns its vertex (the slot kept it as the smallest entry of the key).
CRFRNN_HD void owner_flag_one(int64_t e, const int* slots, const int* slot_of_entry, int* owner_flag) {
  const int slot = slot_of_entry[e];
  owner_flag[e] = (slot >= 0 && slots[slot] == static_cast<int>(e)) ? 1 : 0;
}

// Entry e: its vertex number (owner_csum: inclusive prefix sum of owner_flag), and owner[v] = e
// for the vertex it owns.
CRFRNN_HD void number_one(int64_t e, const int* slots, const int* slot_of_entry,
                          const int* owner_flag, const int* owner_csum, int* vertex_index, int* owner) {
  const int owner_entry = slots[slot_of_entry[e]];
  vertex_index[e] = owner_csum[owner_entry] - 1;
  if (owner_flag[e]) owner[owner_csum[e] - 1] = static_cast<int>(e);
}

// Vertex number of `key`, or `missing` when it is not in the table.
CRFRNN_HD int lookup(const int* key, const int* simplex, int d, int64_t per_image, const int* slots,
                     uint64_t mask, const int* owner_csum, int missing) {
  const int d1 = d + 1;
  int other[kMaxDim + 1];
  uint64_t i = hash_key(key, d1) & mask;
  for (uint64_t probes = 0; probes <= mask; ++probes, i = (i + 1) & mask) {
    const int occupant = slots[i];
    if (occupant < 0) return missing;
    entry_key(simplex, d, per_image, occupant, other);
    if (keys_equal(key, other, d1)) return owner_csum[occupant] - 1;
  }
  return missing;
}

// t = j*M + v: both blur neighbours of vertex v along direction j, into neighbors[t, 0:2]
// (neighbors: [d+1, M, 2]; side 0 is sign +1, side 1 sign -1, as the CPU build).
CRFRNN_HD void neighbor_one(int64_t t, const int* simplex, int d, int64_t per_image, const int* owner,
                            int64_t num_vertices, const int* slots, uint64_t mask,
                            const int* owner_csum, int* neighbors) {
  const int64_t j = t / num_vertices;
  const int64_t v = t - j * num_vertices;
  int key[kMaxDim + 1];
  int nkey[kMaxDim + 1];
  entry_key(simplex, d, per_image, owner[v], key);
  for (int side = 0; side < 2; ++side) {
    neighbor_key(key, d, static_cast<int>(j), side == 0 ? 1 : -1, nkey);
    neighbors[2 * t + side] = lookup(nkey, simplex, d, per_image, slots, mask, owner_csum,
                                     static_cast<int>(num_vertices));
  }
}

// Position i of the entries sorted by vertex: sets offsets[v] = i for every v in
// (sorted[i-1], sorted[i]], and the last position also the tail (sorted[K-1], M] to K; so every
// offsets[0..M] is written exactly once, even for a vertex without entries.
CRFRNN_HD void csr_offsets_one(int64_t i, const int* sorted_vertex, int64_t num_entries,
                               int64_t num_vertices, int* offsets) {
  const int64_t current = sorted_vertex[i];
  const int64_t previous = i == 0 ? -1 : sorted_vertex[i - 1];
  for (int64_t v = previous + 1; v <= current; ++v) offsets[v] = static_cast<int>(i);
  if (i == num_entries - 1) {
    for (int64_t v = current + 1; v <= num_vertices; ++v) offsets[v] = static_cast<int>(num_entries);
  }
}

// ---- filter: one channel of one row per thread, the bodies of lattice_filter_steps.h ------------

// t = v*C + k: channel k of the splat of vertex v into grid [M+1, C] (row M is the caller's).
template <typename T>
CRFRNN_HD void splat_one(int64_t t, const T* values, const T* weights, int d1, const int* offsets,
                         const int* entries, int64_t channels, T* grid) {
  const int64_t v = t / channels;
  T sum;
  splat_vertex(OneChannel<T>{t - v * channels}, sum, v, offsets, entries, weights, d1, values, channels);
  grid[t] = sum;
}

// t = v*C + k: channel k of one blur step of vertex v along one direction (neighbors_j: [M, 2]).
template <typename T>
CRFRNN_HD void blur_one(int64_t t, const T* src, const int* neighbors_j, int64_t channels, T* dst) {
  const int64_t v = t / channels;
  blur_vertex(OneChannel<T>{t - v * channels}, v, neighbors_j, src, channels, dst);
}

// t = p*C + k: channel k of the slice of point p, times alpha.
template <typename T>
CRFRNN_HD void slice_one(int64_t t, const T* grid, const int* vertex_index, const T* weights, int d1,
                         int64_t channels, T alpha, T* out) {
  const int64_t p = t / channels;
  T sum;
  slice_point(OneChannel<T>{t - p * channels}, sum, p, vertex_index, weights, d1, grid, channels, alpha);
  out[t] = sum;
}

// ---- the feature gradient ----------------------------------------------------------------------

// t = e, an entry p*d1 + r: the weights' gradient at that simplex corner (weight_grad_entry), from
// the forward and adjoint grids [M+1, C].
template <typename T>
CRFRNN_HD void weight_grad_one(int64_t e, int d1, const int* vertex_index, const T* values, const T* grad,
                               const T* forward_grid, const T* adjoint_grid, int64_t channels, T alpha,
                               T* grad_weights) {
  grad_weights[e] = weight_grad_entry(e, d1, vertex_index, values, grad, forward_grid, adjoint_grid, channels, alpha);
}

// Point p: grad_features[p, 0:d] from grad_weights[p, 0:d+1] (embed_point_backward; both double).
// features: [P, d].
template <typename scalar_t>
CRFRNN_HD void feature_grad_one(int64_t p, const scalar_t* features, int d, const double* grad_weights,
                                double* grad_features) {
  LatticeScales scales = {};  // zeroed: GCC cannot see that only [0..d) is read, and warns
  lattice_scales(d, &scales);
  embed_point_backward(features + p * d, scales, d, grad_weights + p * (d + 1), grad_features + p * d);
}

}  // namespace device
}  // namespace crfrnn
