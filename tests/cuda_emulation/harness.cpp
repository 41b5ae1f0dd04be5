// Host emulation of the CUDA lattice backend, for CPU-only CI (tests/test_cuda_logic_on_cpu.py).
//
// Compiled with a plain C++ compiler (no CUDA, no torch): it includes the per-thread bodies of
// the CUDA kernels, crfrnn/csrc/cuda/lattice_device.cuh (and through it lattice_math.h and
// lattice_filter_steps.h, whose filter steps the C++ backend runs too), and replays
// crfrnn/csrc/cuda/lattice_cuda.cpp's launch sequence, running every kernel body one index at a
// time in a random order (a fresh permutation per kernel, seeded). That stands in for
// the GPU threads' unordered execution: the lock-free hash inserts, the owner (smallest entry)
// election, the vertex numbering, the neighbour lookups, the CSR offsets and the gathers of
// splat/blur/slice must give the same tables and the same bits whatever the order. The steps
// the launcher does with torch (prefix sum of the owner flags, stable sort of the entries by
// vertex, weights cast to the filter's dtype) are done here with the standard library.
//
// What it does NOT emulate (only a GPU run, tests/test_lattice_cuda.py, checks these):
//   - real concurrency: each body runs to completion before the next starts, so interleavings
//     inside insert_one (a stale read of a slot between another thread's CAS and atomicMin) and
//     the memory ordering of the real atomics (atomicCAS/atomicMin/atomicExch, relaxed loads) are
//     not exercised; on the host the atomics are plain serial read-modify-writes;
//   - the GPU's float arithmetic and nvcc's code generation: this harness rounds with the host's
//     IEEE float/double (compiled with -ffp-contract=off, no fused multiply-add), which matches
//     the device only if the extension is built with --fmad=false, as setup.py asks; whether nvcc
//     honoured it, and device math functions (sqrt, rint, pow in lattice_math.h), are not checked;
//   - the launcher itself (allocation, streams, grid-stride loops, launch error checks).
//
// Usage: harness IN OUT SEED
// IN (little-endian, as written by the test):
//   int64 header[7] = {N, P, d, C, feature_dtype, value_dtype, capacity}
//     dtypes: 0 = float64, 1 = float32; capacity: hash slots (a power of two), 0 = the launcher's
//     rule (smallest power of two >= 1024 and >= 2 N P (d+1));
//   features [N*P, d] in feature_dtype, values [N*P, C] in value_dtype.
// OUT: int64 M, int64 capacity, int32 vertex_index [N*P*(d+1)], float64 bary [N*P*(d+1)],
//   int32 neighbors [d+1, M, 2], int32 splat_offsets [M+1], int32 splat_entries [N*P*(d+1)],
//   value_dtype filter outputs [2, N*P, C] (forward, then reverse = adjoint blur order).
// Exit status: 0 ok, 2 bad input, 3 hash table overflow reported by insert_one (the launcher's
// error), 4 a kernel left an output element unwritten.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/lattice_device.cuh"

namespace {

using crfrnn::blur_alpha;
namespace device = crfrnn::device;

[[noreturn]] void fail(int code, const char* what) {
  std::fprintf(stderr, "harness: %s\n", what);
  std::exit(code);
}

template <typename T>
std::vector<T> read_array(std::FILE* f, int64_t n) {
  std::vector<T> v(static_cast<size_t>(n));
  if (n > 0 && std::fread(v.data(), sizeof(T), v.size(), f) != v.size()) fail(2, "input file too short");
  return v;
}

template <typename T>
void write_array(std::FILE* f, const std::vector<T>& v) {
  if (!v.empty() && std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) fail(2, "write failed");
}

// Indices 0..n-1 in a random order: the order in which the "threads" of one launch run.
std::vector<int64_t> shuffled(int64_t n, std::mt19937_64& rng) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::shuffle(order.begin(), order.end(), rng);
  return order;
}

// Every element written by a kernel that must write all of them (the GPU leaves garbage).
void check_written(const std::vector<int>& v, int sentinel, const char* kernel) {
  for (int x : v) {
    if (x == sentinel) {
      std::fprintf(stderr, "harness: kernel '%s' left an element unwritten\n", kernel);
      std::exit(4);
    }
  }
}

struct Lattice {
  int64_t m = 0, capacity = 0;
  std::vector<int> vertex_index, neighbors, offsets, entries;
  std::vector<double> bary;
};

// lattice_cuda.cpp's build_lattice_cuda, kernel by kernel. features: [num_points, d].
template <typename F>
Lattice build(const std::vector<F>& features, int64_t num_images, int64_t per_image, int d,
              int64_t capacity, std::mt19937_64& rng) {
  constexpr int kUnset = -7;  // a value no kernel writes
  const int d1 = d + 1;
  const int64_t num_points = num_images * per_image, num_entries = num_points * d1;
  Lattice lat;

  // 1. embed
  std::vector<int> simplex(static_cast<size_t>(num_points * 2 * d1), kUnset);
  lat.bary.assign(static_cast<size_t>(num_entries), 0.0);
  for (int64_t p : shuffled(num_points, rng)) {
    device::embed_one<F>(p, features.data(), d, simplex.data(), lat.bary.data());
  }
  check_written(simplex, kUnset, "embed");

  // 2. insert (capacity: the launcher's rule unless the test asks for a smaller table)
  if (capacity == 0) {
    capacity = 1024;
    while (capacity < 2 * num_entries) capacity *= 2;
  }
  if (capacity < 1 || (capacity & (capacity - 1)) != 0) fail(2, "capacity must be a power of two");
  lat.capacity = capacity;
  const uint64_t mask = static_cast<uint64_t>(capacity - 1);
  std::vector<int> slots(static_cast<size_t>(capacity), -1);
  std::vector<int> slot_of_entry(static_cast<size_t>(num_entries), kUnset);
  int overflow = 0;
  for (int64_t e : shuffled(num_entries, rng)) {
    device::insert_one(e, simplex.data(), d, per_image, slots.data(), mask, slot_of_entry.data(), &overflow);
  }
  if (overflow) fail(3, "hash table overflow");
  check_written(slot_of_entry, kUnset, "insert");

  // 3. owner flags, prefix sum (torch.cumsum in the launcher), numbering
  std::vector<int> owner_flag(static_cast<size_t>(num_entries), kUnset);
  for (int64_t e : shuffled(num_entries, rng)) {
    device::owner_flag_one(e, slots.data(), slot_of_entry.data(), owner_flag.data());
  }
  check_written(owner_flag, kUnset, "owner_flags");
  std::vector<int> owner_csum(static_cast<size_t>(num_entries));
  std::partial_sum(owner_flag.begin(), owner_flag.end(), owner_csum.begin());
  lat.m = num_entries > 0 ? owner_csum.back() : 0;
  lat.vertex_index.assign(static_cast<size_t>(num_entries), kUnset);
  std::vector<int> owner(static_cast<size_t>(lat.m), kUnset);
  for (int64_t e : shuffled(num_entries, rng)) {
    device::number_one(e, slots.data(), slot_of_entry.data(), owner_flag.data(), owner_csum.data(),
                       lat.vertex_index.data(), owner.data());
  }
  check_written(lat.vertex_index, kUnset, "number (vertex_index)");
  check_written(owner, kUnset, "number (owner)");

  // 4. neighbours
  lat.neighbors.assign(static_cast<size_t>(d1 * lat.m * 2), kUnset);
  for (int64_t t : shuffled(d1 * lat.m, rng)) {
    device::neighbor_one(t, simplex.data(), d, per_image, owner.data(), lat.m, slots.data(), mask,
                         owner_csum.data(), lat.neighbors.data());
  }
  check_written(lat.neighbors, kUnset, "neighbors");

  // 5. CSR: entries stably sorted by vertex (torch.sort(stable=True) in the launcher), offsets
  lat.entries.resize(static_cast<size_t>(num_entries));
  std::iota(lat.entries.begin(), lat.entries.end(), 0);
  std::stable_sort(lat.entries.begin(), lat.entries.end(),
                   [&](int a, int b) { return lat.vertex_index[a] < lat.vertex_index[b]; });
  std::vector<int> sorted_vertex(static_cast<size_t>(num_entries));
  for (int64_t i = 0; i < num_entries; ++i) sorted_vertex[i] = lat.vertex_index[lat.entries[i]];
  lat.offsets.assign(static_cast<size_t>(lat.m + 1), kUnset);
  for (int64_t i : shuffled(num_entries, rng)) {
    device::csr_offsets_one(i, sorted_vertex.data(), num_entries, lat.m, lat.offsets.data());
  }
  check_written(lat.offsets, kUnset, "csr_offsets");
  return lat;
}

// lattice_cuda.cpp's lattice_filter_cuda in dtype T, forward (reverse = false) or adjoint.
template <typename T>
std::vector<T> filter(const Lattice& lat, const std::vector<T>& values, int64_t num_points, int d1,
                      int64_t channels, bool reverse, std::mt19937_64& rng) {
  const int64_t m = lat.m;
  std::vector<T> weights(lat.bary.begin(), lat.bary.end());  // bary.to(weight_dtype)
  // Two (M+1) x C buffers, zero-initialised (row M stays zero: missing neighbours point at it).
  std::vector<T> grid(static_cast<size_t>((m + 1) * channels), T(0));
  std::vector<T> next(grid.size(), T(0));
  std::vector<T> out(static_cast<size_t>(num_points * channels), T(0));
  for (int64_t t : shuffled(m * channels, rng)) {
    device::splat_one<T>(t, values.data(), weights.data(), d1, lat.offsets.data(), lat.entries.data(),
                         channels, grid.data());
  }
  for (int step = 0; step < d1; ++step) {
    const int j = reverse ? d1 - 1 - step : step;
    const int* neighbors_j = lat.neighbors.data() + static_cast<int64_t>(j) * m * 2;
    for (int64_t t : shuffled(m * channels, rng)) {
      device::blur_one<T>(t, grid.data(), neighbors_j, channels, next.data());
    }
    grid.swap(next);
  }
  const T alpha = static_cast<T>(blur_alpha(d1 - 1));
  for (int64_t t : shuffled(num_points * channels, rng)) {
    device::slice_one<T>(t, grid.data(), lat.vertex_index.data(), weights.data(), d1, channels, alpha,
                         out.data());
  }
  return out;
}

template <typename F, typename T>
void run(std::FILE* in, std::FILE* out, int64_t n, int64_t p, int d, int64_t c, int64_t capacity,
         std::mt19937_64& rng) {
  const int64_t num_points = n * p;
  const std::vector<F> features = read_array<F>(in, num_points * d);
  const std::vector<T> values = read_array<T>(in, num_points * c);
  const Lattice lat = build<F>(features, n, p, d, capacity, rng);
  std::vector<T> results = filter<T>(lat, values, num_points, d + 1, c, false, rng);
  const std::vector<T> adjoint = filter<T>(lat, values, num_points, d + 1, c, true, rng);
  results.insert(results.end(), adjoint.begin(), adjoint.end());
  const std::vector<int64_t> sizes = {lat.m, lat.capacity};
  write_array(out, sizes);
  write_array(out, lat.vertex_index);
  write_array(out, lat.bary);
  write_array(out, lat.neighbors);
  write_array(out, lat.offsets);
  write_array(out, lat.entries);
  write_array(out, results);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) fail(2, "usage: harness IN OUT SEED");
  std::FILE* in = std::fopen(argv[1], "rb");
  if (!in) fail(2, "cannot open the input file");
  std::mt19937_64 rng(std::strtoull(argv[3], nullptr, 10));
  const std::vector<int64_t> h = read_array<int64_t>(in, 7);
  const int64_t n = h[0], p = h[1], c = h[3], feature_dtype = h[4], value_dtype = h[5], capacity = h[6];
  const int d = static_cast<int>(h[2]);
  if (n < 1 || p < 1 || d < 1 || d > crfrnn::kMaxDim || c < 1 || capacity < 0 ||
      feature_dtype < 0 || feature_dtype > 1 || value_dtype < 0 || value_dtype > 1) {
    fail(2, "bad header");
  }
  std::FILE* out = std::fopen(argv[2], "wb");
  if (!out) fail(2, "cannot open the output file");
  if (feature_dtype == 0 && value_dtype == 0) run<double, double>(in, out, n, p, d, c, capacity, rng);
  if (feature_dtype == 0 && value_dtype == 1) run<double, float>(in, out, n, p, d, c, capacity, rng);
  if (feature_dtype == 1 && value_dtype == 0) run<float, double>(in, out, n, p, d, c, capacity, rng);
  if (feature_dtype == 1 && value_dtype == 1) run<float, float>(in, out, n, p, d, c, capacity, rng);
  if (std::fclose(out) != 0) fail(2, "write failed");
  std::fclose(in);
  return 0;
}
