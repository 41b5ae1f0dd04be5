// Host emulation of the CUDA lattice backend, for CPU-only CI (tests/test_cuda_logic_on_cpu.py).
//
// Compiled with a plain C++ compiler (no CUDA, no torch): it includes the per-thread bodies of
// the CUDA kernels, crfrnn/csrc/cuda/lattice_device.cuh (and through it lattice_math.h and
// lattice_filter_steps.h, whose filter steps the C++ backend runs too), and replays
// crfrnn/csrc/cuda/lattice_cuda.cpp's launch sequence, running every kernel body over its
// indices in one of two ways (Launcher below):
//   - serially, one index at a time in a random order (a fresh permutation per kernel, seeded):
//     every order a GPU could serialise its threads to;
//   - concurrently, on K std::threads started together (--threads K), the hash table's CAS and
//     min being real atomics (lattice_device.cuh): insert_one's interleavings (a stale read of a
//     slot between another thread's CAS and atomicMin, two claims of one empty slot) really
//     happen, and a build with -fsanitize=thread reports any unsynchronised access. With
//     --cas yielding every CAS first yields its core, so that they happen thousands of times per
//     run instead of a few; --cas nonatomic makes the CAS a plain read then write, the bug this
//     mode must catch (tests/test_cuda_logic_on_cpu.py shows it does).
// The lock-free hash inserts, the owner (smallest entry) election, the vertex numbering, the
// neighbour lookups, the CSR offsets, the gathers of splat/blur/slice and the feature gradient's
// per-element bodies (weight_grad_one, feature_grad_one: each writes its own element only) must
// give the same tables and the same bits whatever the order or interleaving; --repeats R runs it
// all R times and fails unless every repetition equals the first. The steps the launcher does
// with torch (prefix sum of the owner flags, stable sort of the entries by vertex, weights cast
// to the filter's dtype, the weights' gradient cast to double) are done here with the standard
// library.
//
// What it does NOT emulate (only a GPU run, tests/test_lattice_cuda.py, checks these):
//   - the GPU's scale and memory model: K host threads on a few cores, not thousands in flight,
//     on x86, whose hardware orders memory more strongly than a GPU does. ThreadSanitizer checks
//     the C++ memory model's happens-before (so a missing atomic is found whatever the timing),
//     but it does not replay the reorderings a weaker machine may make of relaxed accesses;
//     lattice_device.cuh says why relaxed is enough;
//   - the GPU's float arithmetic and nvcc's code generation: this harness rounds with the host's
//     IEEE float/double (compiled with -ffp-contract=off, no fused multiply-add), which matches
//     the device only if the extension is built with --fmad=false, as setup.py asks; whether nvcc
//     honoured it, and device math functions (sqrt, rint, pow in lattice_math.h), are not checked;
//   - the launcher itself (allocation, streams, grid-stride loops, launch error checks).
//
// The fused mean-field ops (crfrnn/csrc/cuda/mean_field_device.cuh): the harness runs their
// schedules themselves (run_mean_field_forward, run_mean_field_backward) with an Exec whose every
// launch runs the per-thread bodies one index at a time in a random order; the launcher's torch
// steps (the vertex -> entries table, the scaled splat weights, the matrices) are done here with
// the standard library. See run_mean_field below for its input and output.
//
// Usage: harness IN OUT SEED [--threads K] [--repeats R] [--schedule NAME] [--cas MODE]
//   K = 0 (default): serial random order; K >= 1: K threads per launch, NAME one of interleaved,
//   blocked, shuffled, mixed (default: a schedule drawn per launch); R >= 1 (default 1); MODE the
//   hash table's compare-and-swap (harness_cas below): atomic (default), yielding (the same after
//   a yield: the race windows wide open), nonatomic (a plain read then write: a bug to catch).
//        harness --racy-toy
//   Two threads increment a plain int: a ThreadSanitizer build must report it (a check that the
//   race detector is alive, so that its silence means something).
//        harness mean_field IN OUT SEED [--threads K] [--schedule NAME]
//   The fused mean-field ops, forward and backward (see run_mean_field), launched as above.
// IN (little-endian, as written by the test):
//   int64 header[7] = {N, P, d, C, feature_dtype, value_dtype, capacity}
//     dtypes: 0 = float64, 1 = float32; capacity: hash slots (a power of two), 0 = the launcher's
//     rule (smallest power of two >= 1024 and >= 2 N P (d+1));
//   features [N*P, d] in feature_dtype, values [N*P, C] in value_dtype.
// OUT (of the first repetition): int64 M, int64 capacity, int32 vertex_index [N*P*(d+1)],
//   float64 bary [N*P*(d+1)], int32 neighbors [d+1, M, 2], int32 splat_offsets [M+1],
//   int32 splat_entries [N*P*(d+1)], value_dtype filter outputs [2, N*P, C] (forward, then
//   reverse = adjoint blur order), value_dtype weight gradients [2, N*P, d+1] of
//   <grad, filter(values)> with grad = the values' rows in reverse order (forward, then reverse
//   blur order: lattice_filter_weights_backward), float64 feature gradient [N*P, d] from the
//   forward one (barycentric_weights_backward, before the launcher's cast to the features' dtype).
// Exit status: 0 ok, 2 bad input, 3 hash table overflow reported by insert_one (the launcher's
// error), 4 a kernel left an output element unwritten, 5 a repetition differs from the first.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

// The compare-and-swap of insert_one (and of the host's atomicMin loop), chosen by --cas.
namespace harness_cas {
enum class Mode {
  kAtomic,    // lattice_device.cuh's host_atomic_cas
  kYielding,  // the same after a yield: other threads run between insert_one's load of a slot
              // and its CAS, or between its CAS and atomicMin (the races' windows made wide)
  kNonatomic  // a plain read, a yield, a plain write: the bug the concurrent mode must catch
};
Mode mode = Mode::kAtomic;  // set before any thread starts
int cas(int* address, int expected, int desired);
}  // namespace harness_cas
#define CRFRNN_HOST_CAS_HOOK ::harness_cas::cas

#include "cuda/lattice_device.cuh"
#include "cuda/mean_field_device.cuh"

namespace harness_cas {
int cas(int* address, int expected, int desired) {
  if (mode == Mode::kAtomic) return crfrnn::device::host_atomic_cas(address, expected, desired);
  std::this_thread::yield();
  if (mode == Mode::kYielding) return crfrnn::device::host_atomic_cas(address, expected, desired);
  const int found = *address;  // not atomic: another thread may write between this and the write
  std::this_thread::yield();
  if (found == expected) *address = desired;
  return found;
}
}  // namespace harness_cas

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

// ---- launches ------------------------------------------------------------------------------

// How one kernel launch runs its body over the indices 0..n-1 (with K threads):
//   serial:      one index at a time on the calling thread, in a random order;
//   interleaved: thread k runs k, k+K, k+2K, ... (the kernels' grid-stride loop);
//   blocked:     thread k runs the k-th of K contiguous blocks;
//   shuffled:    thread k runs the k-th part of a random permutation (random sets, random order);
//   mixed:       one of the three concurrent schedules, drawn per launch.
enum class Schedule { kSerial, kInterleaved, kBlocked, kShuffled, kMixed };

const char* const kScheduleNames[] = {"serial", "interleaved", "blocked", "shuffled", "mixed"};

Schedule parse_schedule(const char* name) {
  for (int s = 1; s <= static_cast<int>(Schedule::kMixed); ++s) {
    if (std::strcmp(name, kScheduleNames[s]) == 0) return static_cast<Schedule>(s);
  }
  fail(2, "unknown --schedule (expected interleaved, blocked, shuffled or mixed)");
}

// Runs kernel bodies as a launch would: `launch(n, body)` calls body(i) once for every i < n,
// serially or on `threads` std::threads at once. Every launch ends with all its bodies done (the
// threads joined), as a kernel ends before the next on a stream. To add a kernel, call its
// per-thread body through a launch.
class Launcher {
 public:
  Launcher(Schedule schedule, int threads, uint64_t seed)
      : schedule_(threads == 0 ? Schedule::kSerial : schedule), threads_(threads), rng_(seed) {}

  template <typename Body>
  void operator()(int64_t n, const Body& body) {
    if (schedule_ == Schedule::kSerial) {
      for (int64_t i : shuffled(n)) body(i);
      return;
    }
    const std::vector<std::vector<int64_t>> parts = deal(n);
    // The threads wait here until all have started, so that their bodies overlap rather than
    // run one thread after another.
    std::atomic<int> not_started{threads_};
    std::vector<std::thread> workers;
    for (const std::vector<int64_t>& part : parts) {
      workers.emplace_back([&body, &part, &not_started] {
        not_started.fetch_sub(1);
        while (not_started.load() > 0) std::this_thread::yield();
        for (int64_t i : part) body(i);
      });
    }
    for (std::thread& worker : workers) worker.join();
  }

 private:
  // Indices 0..n-1 in a random order.
  std::vector<int64_t> shuffled(int64_t n) {
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), int64_t{0});
    std::shuffle(order.begin(), order.end(), rng_);
    return order;
  }

  // The indices each of the threads runs, in the order it runs them.
  std::vector<std::vector<int64_t>> deal(int64_t n) {
    Schedule schedule = schedule_;
    if (schedule == Schedule::kMixed) {
      schedule = static_cast<Schedule>(1 + std::uniform_int_distribution<int>(0, 2)(rng_));
    }
    const int64_t k = threads_;
    std::vector<std::vector<int64_t>> parts(static_cast<size_t>(k));
    const std::vector<int64_t> order = schedule == Schedule::kShuffled ? shuffled(n) : std::vector<int64_t>{};
    for (int64_t t = 0; t < k; ++t) {
      const int64_t begin = t * n / k, end = (t + 1) * n / k;  // the t-th block
      if (schedule == Schedule::kInterleaved) {
        for (int64_t i = t; i < n; i += k) parts[t].push_back(i);
      } else if (schedule == Schedule::kBlocked) {
        for (int64_t i = begin; i < end; ++i) parts[t].push_back(i);
      } else {
        parts[t].assign(order.begin() + begin, order.begin() + end);
      }
    }
    return parts;
  }

  Schedule schedule_;
  int threads_;
  std::mt19937_64 rng_;
};

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
              int64_t capacity, Launcher& launch) {
  constexpr int kUnset = -7;  // a value no kernel writes
  const int d1 = d + 1;
  const int64_t num_points = num_images * per_image, num_entries = num_points * d1;
  Lattice lat;

  // 1. embed
  std::vector<int> simplex(static_cast<size_t>(num_points * 2 * d1), kUnset);
  lat.bary.assign(static_cast<size_t>(num_entries), 0.0);
  launch(num_points, [&](int64_t p) {
    device::embed_one<F>(p, features.data(), d, simplex.data(), lat.bary.data());
  });
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
  launch(num_entries, [&](int64_t e) {
    device::insert_one(e, simplex.data(), d, per_image, slots.data(), mask, slot_of_entry.data(), &overflow);
  });
  if (overflow) fail(3, "hash table overflow");
  check_written(slot_of_entry, kUnset, "insert");

  // 3. owner flags, prefix sum (torch.cumsum in the launcher), numbering
  std::vector<int> owner_flag(static_cast<size_t>(num_entries), kUnset);
  launch(num_entries, [&](int64_t e) {
    device::owner_flag_one(e, slots.data(), slot_of_entry.data(), owner_flag.data());
  });
  check_written(owner_flag, kUnset, "owner_flags");
  std::vector<int> owner_csum(static_cast<size_t>(num_entries));
  std::partial_sum(owner_flag.begin(), owner_flag.end(), owner_csum.begin());
  lat.m = num_entries > 0 ? owner_csum.back() : 0;
  lat.vertex_index.assign(static_cast<size_t>(num_entries), kUnset);
  std::vector<int> owner(static_cast<size_t>(lat.m), kUnset);
  launch(num_entries, [&](int64_t e) {
    device::number_one(e, slots.data(), slot_of_entry.data(), owner_flag.data(), owner_csum.data(),
                       lat.vertex_index.data(), owner.data());
  });
  check_written(lat.vertex_index, kUnset, "number (vertex_index)");
  check_written(owner, kUnset, "number (owner)");

  // 4. neighbours
  lat.neighbors.assign(static_cast<size_t>(d1 * lat.m * 2), kUnset);
  launch(d1 * lat.m, [&](int64_t t) {
    device::neighbor_one(t, simplex.data(), d, per_image, owner.data(), lat.m, slots.data(), mask,
                         owner_csum.data(), lat.neighbors.data());
  });
  check_written(lat.neighbors, kUnset, "neighbors");

  // 5. CSR: entries stably sorted by vertex (torch.sort(stable=True) in the launcher), offsets
  lat.entries.resize(static_cast<size_t>(num_entries));
  std::iota(lat.entries.begin(), lat.entries.end(), 0);
  std::stable_sort(lat.entries.begin(), lat.entries.end(),
                   [&](int a, int b) { return lat.vertex_index[a] < lat.vertex_index[b]; });
  std::vector<int> sorted_vertex(static_cast<size_t>(num_entries));
  for (int64_t i = 0; i < num_entries; ++i) sorted_vertex[i] = lat.vertex_index[lat.entries[i]];
  lat.offsets.assign(static_cast<size_t>(lat.m + 1), kUnset);
  launch(num_entries, [&](int64_t i) {
    device::csr_offsets_one(i, sorted_vertex.data(), num_entries, lat.m, lat.offsets.data());
  });
  check_written(lat.offsets, kUnset, "csr_offsets");
  return lat;
}

// lattice_cuda.cpp's splat_and_blur in dtype T: the grid [M+1, C] of values [P, C], blur
// directions in reverse order if `reverse`.
template <typename T>
std::vector<T> splat_and_blur(const Lattice& lat, const std::vector<T>& weights, const std::vector<T>& values,
                              int d1, int64_t channels, bool reverse, Launcher& launch) {
  const int64_t m = lat.m;
  // Two (M+1) x C buffers, zero-initialised (row M stays zero: missing neighbours point at it).
  std::vector<T> grid(static_cast<size_t>((m + 1) * channels), T(0));
  std::vector<T> next(grid.size(), T(0));
  launch(m * channels, [&](int64_t t) {
    device::splat_one<T>(t, values.data(), weights.data(), d1, lat.offsets.data(), lat.entries.data(),
                         channels, grid.data());
  });
  for (int step = 0; step < d1; ++step) {
    const int j = reverse ? d1 - 1 - step : step;
    const int* neighbors_j = lat.neighbors.data() + static_cast<int64_t>(j) * m * 2;
    launch(m * channels, [&](int64_t t) { device::blur_one<T>(t, grid.data(), neighbors_j, channels, next.data()); });
    grid.swap(next);
  }
  return grid;
}

// lattice_cuda.cpp's lattice_filter_cuda in dtype T, forward (reverse = false) or adjoint.
template <typename T>
std::vector<T> filter(const Lattice& lat, const std::vector<T>& values, int64_t num_points, int d1,
                      int64_t channels, bool reverse, Launcher& launch) {
  const std::vector<T> weights(lat.bary.begin(), lat.bary.end());  // bary.to(weight_dtype)
  const std::vector<T> grid = splat_and_blur<T>(lat, weights, values, d1, channels, reverse, launch);
  std::vector<T> out(static_cast<size_t>(num_points * channels), T(0));
  const T alpha = static_cast<T>(blur_alpha(d1 - 1));
  launch(num_points * channels, [&](int64_t t) {
    device::slice_one<T>(t, grid.data(), lat.vertex_index.data(), weights.data(), d1, channels, alpha,
                         out.data());
  });
  return out;
}

// NaN, the initial value of the gradients' outputs: an element a kernel leaves unwritten stays
// NaN (the GPU's at::empty would leave garbage) and fails the test's bit comparison.
template <typename X>
std::vector<X> unwritten(int64_t n) {
  return std::vector<X>(static_cast<size_t>(n), std::numeric_limits<X>::quiet_NaN());
}

// lattice_cuda.cpp's lattice_filter_weights_backward_cuda in dtype T: the weights' gradient
// [P, d1] of <grad, filter(values)> (filter in the blur order `reverse`), one body per simplex
// corner, from the forward grid (values) and the adjoint grid (grad, the other blur order).
template <typename T>
std::vector<T> weight_grad(const Lattice& lat, const std::vector<T>& values, const std::vector<T>& grad,
                           int64_t num_points, int d1, int64_t channels, bool reverse, Launcher& launch) {
  const std::vector<T> weights(lat.bary.begin(), lat.bary.end());
  const std::vector<T> forward_grid = splat_and_blur<T>(lat, weights, values, d1, channels, reverse, launch);
  const std::vector<T> adjoint_grid = splat_and_blur<T>(lat, weights, grad, d1, channels, !reverse, launch);
  const T alpha = static_cast<T>(blur_alpha(d1 - 1));
  std::vector<T> out = unwritten<T>(num_points * d1);
  launch(num_points * d1, [&](int64_t e) {
    device::weight_grad_one<T>(e, d1, lat.vertex_index.data(), values.data(), grad.data(), forward_grid.data(),
                               adjoint_grid.data(), channels, alpha, out.data());
  });
  return out;
}

// lattice_cuda.cpp's barycentric_weights_backward_cuda before its cast: the features' gradient
// [P, d] in double from the weights' [P, d+1] (cast to double), one body per point.
template <typename F, typename T>
std::vector<double> feature_grad(const std::vector<F>& features, int64_t num_points, int d,
                                 const std::vector<T>& weight_grads, Launcher& launch) {
  const std::vector<double> grad_weights(weight_grads.begin(), weight_grads.end());  // .to(kDouble)
  std::vector<double> out = unwritten<double>(num_points * d);
  launch(num_points, [&](int64_t p) {
    device::feature_grad_one<F>(p, features.data(), d, grad_weights.data(), out.data());
  });
  return out;
}

// What one repetition computes: the lattice, the forward then adjoint filter outputs, and the
// feature gradient of <grad, filter(values)>: the weights' (forward, then reverse blur order) and
// the features' (from the forward one).
template <typename T>
struct Outcome {
  Lattice lat;
  std::vector<T> filtered, weight_grads;
  std::vector<double> feature_grads;
};

// The upstream gradient of the feature-gradient check: the values' rows [P, C] in reverse order
// (known to the test without another input).
template <typename T>
std::vector<T> reversed_rows(const std::vector<T>& values, int64_t num_points, int64_t c) {
  std::vector<T> grad(values.size());
  for (int64_t q = 0; q < num_points; ++q) {
    std::copy_n(values.begin() + (num_points - 1 - q) * c, c, grad.begin() + q * c);
  }
  return grad;
}

template <typename F, typename T>
Outcome<T> build_filter_and_differentiate(const std::vector<F>& features, const std::vector<T>& values, int64_t n,
                                          int64_t p, int d, int64_t c, int64_t capacity, Launcher& launch) {
  const int64_t num_points = n * p;
  Outcome<T> o{build<F>(features, n, p, d, capacity, launch), {}, {}, {}};
  o.filtered = filter<T>(o.lat, values, num_points, d + 1, c, false, launch);
  const std::vector<T> adjoint = filter<T>(o.lat, values, num_points, d + 1, c, true, launch);
  o.filtered.insert(o.filtered.end(), adjoint.begin(), adjoint.end());
  const std::vector<T> grad = reversed_rows(values, num_points, c);
  o.weight_grads = weight_grad<T>(o.lat, values, grad, num_points, d + 1, c, false, launch);
  o.feature_grads = feature_grad<F, T>(features, num_points, d, o.weight_grads, launch);
  const std::vector<T> reverse = weight_grad<T>(o.lat, values, grad, num_points, d + 1, c, true, launch);
  o.weight_grads.insert(o.weight_grads.end(), reverse.begin(), reverse.end());
  return o;
}

template <typename X>
bool same_bits(const std::vector<X>& a, const std::vector<X>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(X)) == 0);
}

// The first output in which two repetitions differ (bit for bit), or nullptr if none does.
template <typename T>
const char* first_difference(const Outcome<T>& a, const Outcome<T>& b) {
  if (a.lat.m != b.lat.m) return "the vertex count";
  if (!same_bits(a.lat.vertex_index, b.lat.vertex_index)) return "vertex_index";
  if (!same_bits(a.lat.bary, b.lat.bary)) return "bary";
  if (!same_bits(a.lat.neighbors, b.lat.neighbors)) return "neighbors";
  if (!same_bits(a.lat.offsets, b.lat.offsets)) return "splat_offsets";
  if (!same_bits(a.lat.entries, b.lat.entries)) return "splat_entries";
  if (!same_bits(a.filtered, b.filtered)) return "the filter outputs";
  if (!same_bits(a.weight_grads, b.weight_grads)) return "the weights' gradients";
  if (!same_bits(a.feature_grads, b.feature_grads)) return "the features' gradient";
  return nullptr;
}

struct Options {
  int threads = 0;  // 0: serial random order
  int repeats = 1;
  Schedule schedule = Schedule::kMixed;
  harness_cas::Mode cas = harness_cas::Mode::kAtomic;
};

harness_cas::Mode parse_cas(const std::string& name) {
  if (name == "atomic") return harness_cas::Mode::kAtomic;
  if (name == "yielding") return harness_cas::Mode::kYielding;
  if (name == "nonatomic") return harness_cas::Mode::kNonatomic;
  fail(2, "unknown --cas (expected atomic, yielding or nonatomic)");
}

template <typename F, typename T>
void run(std::FILE* in, std::FILE* out, int64_t n, int64_t p, int d, int64_t c, int64_t capacity,
         int repeats, Launcher& launch) {
  const std::vector<F> features = read_array<F>(in, n * p * d);
  const std::vector<T> values = read_array<T>(in, n * p * c);
  const Outcome<T> first = build_filter_and_differentiate<F, T>(features, values, n, p, d, c, capacity, launch);
  for (int r = 1; r < repeats; ++r) {
    const Outcome<T> again = build_filter_and_differentiate<F, T>(features, values, n, p, d, c, capacity, launch);
    if (const char* what = first_difference(first, again)) {
      std::fprintf(stderr, "harness: repetition %d differs from the first in %s\n", r, what);
      std::exit(5);
    }
  }
  const std::vector<int64_t> sizes = {first.lat.m, first.lat.capacity};
  write_array(out, sizes);
  write_array(out, first.lat.vertex_index);
  write_array(out, first.lat.bary);
  write_array(out, first.lat.neighbors);
  write_array(out, first.lat.offsets);
  write_array(out, first.lat.entries);
  write_array(out, first.filtered);
  write_array(out, first.weight_grads);
  write_array(out, first.feature_grads);
}

// --threads K --repeats R --schedule NAME --cas MODE, after IN OUT SEED.
Options parse_options(int argc, char** argv) {
  Options options;
  for (int i = 4; i < argc; i += 2) {
    if (i + 1 == argc) fail(2, "an option without its value");
    const std::string flag = argv[i];
    if (flag == "--threads") {
      options.threads = std::atoi(argv[i + 1]);
      if (options.threads < 0 || options.threads > 256) fail(2, "--threads must be in [0, 256]");
    } else if (flag == "--repeats") {
      options.repeats = std::atoi(argv[i + 1]);
      if (options.repeats < 1) fail(2, "--repeats must be at least 1");
    } else if (flag == "--schedule") {
      options.schedule = parse_schedule(argv[i + 1]);
    } else if (flag == "--cas") {
      options.cas = parse_cas(argv[i + 1]);
    } else {
      fail(2, "unknown option (expected --threads, --repeats, --schedule or --cas)");
    }
  }
  return options;
}

// Two threads increment one plain int: the data race that a ThreadSanitizer build must report.
int racy_toy() {
  int counter = 0;
  const auto add = [&counter] {
    for (int i = 0; i < 1000; ++i) ++counter;
  };
  std::thread a(add), b(add);
  a.join();
  b.join();
  std::printf("%d\n", counter);
  return 0;
}


// ---- the fused mean-field ops -----------------------------------------------------------------------

// The Exec of mean_field_device.cuh's schedules: each launch through the Launcher (serial random
// order, or concurrent threads).
struct LauncherExec {
  Launcher& launch;

  template <class Body>
  void run(int64_t n, const Body& body) {
    launch(n, body);
  }
};

// One CRF kernel's inputs and the buffers the launcher (mean_field_cuda.cpp) makes for it.
template <typename T>
struct MeanFieldKernelData {
  int64_t d1 = 0, m = 0;
  std::vector<int> vertex_index, neighbors, offsets, entries;
  std::vector<T> weights, splat_scale, slice_scale, pairwise, splat_weights, adjoint_weights, transform,
      adjoint_transform, grid, next, mixed, blurred, outer_total;
};

// IN (after the mode): int64 header[8] = {P, C, T, kernels, dtype (0 float64, 1 float32),
//   save_marginals, N (images), prune (0 or 1)}; per kernel int64 {d1, M}, int32 vertex_index
//   [P, d1], int32 neighbors [d1, M, 2], then in dtype weights [P, d1], splat_scale [P],
//   slice_scale [P], pairwise [C, C]; then unary [P, C] and the logits' gradient [P, C]; with
//   prune, the classes' thresholds [C] (crfrnn.inference.sender_thresholds).
// OUT (dtype): logits [P, C]; per kernel blurred [T, M, C]; marginals [T-1, P, C] if saved;
//   grad_unary [P, C]; per kernel grad_pairwise [C, C]; with prune the senders [T, N, C] (0, 1).
template <typename T>
void run_mean_field(std::FILE* in, std::FILE* out, const std::vector<int64_t>& h, Launcher& launch) {
  const int64_t num_points = h[0], c = h[1], iterations = h[2], count = h[3], images = h[6];
  const bool save_marginals = h[5] != 0, prune = h[7] != 0;
  std::vector<MeanFieldKernelData<T>> data(static_cast<size_t>(count));
  device::MeanFieldView<T> mf{};
  mf.num_points = num_points;
  mf.c = c;
  mf.iterations = iterations;
  mf.kernels.count = static_cast<int>(count);
  for (int64_t i = 0; i < count; ++i) {
    MeanFieldKernelData<T>& k = data[i];
    const std::vector<int64_t> sizes = read_array<int64_t>(in, 2);
    k.d1 = sizes[0];
    k.m = sizes[1];
    const int64_t num_entries = num_points * k.d1;
    k.vertex_index = read_array<int>(in, num_entries);
    k.neighbors = read_array<int>(in, k.d1 * k.m * 2);
    k.weights = read_array<T>(in, num_entries);
    k.splat_scale = read_array<T>(in, num_points);
    k.slice_scale = read_array<T>(in, num_points);
    k.pairwise = read_array<T>(in, c * c);
    // The vertex -> entries table (stable sort by vertex, then csr_offsets_one), as the launcher.
    k.entries.resize(static_cast<size_t>(num_entries));
    std::iota(k.entries.begin(), k.entries.end(), 0);
    std::stable_sort(k.entries.begin(), k.entries.end(),
                     [&](int a, int b) { return k.vertex_index[a] < k.vertex_index[b]; });
    std::vector<int> sorted_vertex(static_cast<size_t>(num_entries));
    for (int64_t e = 0; e < num_entries; ++e) sorted_vertex[e] = k.vertex_index[k.entries[e]];
    k.offsets.assign(static_cast<size_t>(k.m + 1), -7);
    launch(num_entries, [&](int64_t e) {
      device::csr_offsets_one(e, sorted_vertex.data(), num_entries, k.m, k.offsets.data());
    });
    check_written(k.offsets, -7, "csr_offsets (mean field)");
    k.splat_weights.resize(static_cast<size_t>(num_entries));
    k.adjoint_weights.resize(static_cast<size_t>(num_entries));
    for (int64_t e = 0; e < num_entries; ++e) {
      k.splat_weights[e] = k.splat_scale[e / k.d1] * k.weights[e];
      k.adjoint_weights[e] = k.slice_scale[e / k.d1] * k.weights[e];
    }
    const T alpha = static_cast<T>(blur_alpha(static_cast<int>(k.d1 - 1)));
    k.transform.resize(static_cast<size_t>(c * c));
    k.adjoint_transform.resize(static_cast<size_t>(c * c));
    for (int64_t j = 0; j < c; ++j) {
      for (int64_t l = 0; l < c; ++l) {
        k.transform[j * c + l] = k.pairwise[l * c + j] * alpha;
        k.adjoint_transform[j * c + l] = k.pairwise[j * c + l] * -alpha;
      }
    }
    k.grid.assign(static_cast<size_t>((k.m + 1) * c), T(0));
    k.next = k.grid;
    k.mixed = k.grid;
    k.blurred.assign(static_cast<size_t>(iterations * k.m * c), T(0));
    k.outer_total.assign(static_cast<size_t>(c * c), T(0));
    device::CrfKernelView<T>& v = mf.kernels.k[i];
    v.tables = crfrnn::PointTables<T>{k.vertex_index.data(), k.weights.data(), k.splat_scale.data(),
                                      k.slice_scale.data(), static_cast<int>(k.d1)};
    v.neighbors = k.neighbors.data();
    v.splat_offsets = k.offsets.data();
    v.splat_entries = k.entries.data();
    v.splat_weights = k.splat_weights.data();
    v.adjoint_weights = k.adjoint_weights.data();
    v.transform = k.transform.data();
    v.adjoint_transform = k.adjoint_transform.data();
    v.m = k.m;
    v.grid = k.grid.data();
    v.next = k.next.data();
    v.mixed = k.mixed.data();
    v.blurred = k.blurred.data();
    v.outer_total = k.outer_total.data();
  }
  const std::vector<T> unary = read_array<T>(in, num_points * c);
  const std::vector<T> grad_logits = read_array<T>(in, num_points * c);
  // Sender pruning's inputs and buffers, as the launcher makes them.
  const std::vector<T> thresholds = prune ? read_array<T>(in, c) : std::vector<T>();
  std::vector<T> block_max(static_cast<size_t>(images * device::max_blocks(num_points / images) * c), T(-7));
  std::vector<T> mask(static_cast<size_t>(images * c), T(-7));
  std::vector<uint8_t> senders(prune ? static_cast<size_t>(iterations * images * c) : 0, 7);
  if (prune) {
    mf.prune.thresholds = thresholds.data();
    mf.prune.images = images;
    mf.prune.block_max = block_max.data();
    mf.prune.mask = mask.data();
    mf.prune.senders = senders.data();
  }
  const size_t rows = static_cast<size_t>(num_points * c);
  std::vector<T> logits(rows), q0(rows), q1(rows);
  std::vector<T> marginals(save_marginals ? static_cast<size_t>((iterations - 1) * num_points * c) : 0);
  mf.unary = unary.data();
  mf.out = logits.data();
  mf.marginals = save_marginals && iterations > 1 ? marginals.data() : nullptr;
  mf.q_scratch[0] = q0.data();
  mf.q_scratch[1] = q1.data();
  LauncherExec exec{launch};
  device::run_mean_field_forward(exec, mf);
  std::vector<T> grad(rows), du(rows), grad_unary(rows), q(rows);
  device::MeanFieldGradientView<T> gv{grad_logits.data(), grad.data(), du.data(), grad_unary.data(), q.data()};
  if (prune) {
    gv.senders = senders.data();
    gv.images = images;
  }
  device::run_mean_field_backward(exec, mf, gv);
  write_array(out, logits);
  for (const auto& k : data) write_array(out, k.blurred);
  write_array(out, marginals);
  write_array(out, grad_unary);
  for (const auto& k : data) {
    const T alpha = static_cast<T>(blur_alpha(static_cast<int>(k.d1 - 1)));
    std::vector<T> grad_pairwise(static_cast<size_t>(c * c));
    for (int64_t j = 0; j < c; ++j) {
      for (int64_t l = 0; l < c; ++l) grad_pairwise[j * c + l] = k.outer_total[l * c + j] * -alpha;
    }
    write_array(out, grad_pairwise);
  }
  if (prune) {
    std::vector<T> sent(senders.size());
    for (size_t i = 0; i < senders.size(); ++i) {
      if (senders[i] > 1) fail(4, "harness: kernel 'SenderMask' left an element unwritten");
      sent[i] = static_cast<T>(senders[i]);
    }
    write_array(out, sent);
  }
}

// argv: "mean_field" IN OUT SEED [--threads K] [--schedule NAME]
int mean_field_main(int argc, char** argv) {
  if (argc < 5) fail(2, "usage: harness mean_field IN OUT SEED [--threads K] [--schedule NAME]");
  const Options options = parse_options(argc - 1, argv + 1);
  std::FILE* in = std::fopen(argv[2], "rb");
  if (!in) fail(2, "cannot open the input file");
  Launcher launch(options.schedule, options.threads, std::strtoull(argv[4], nullptr, 10));
  const std::vector<int64_t> h = read_array<int64_t>(in, 8);
  if (h[0] < 1 || h[1] < 1 || h[2] < 1 || h[3] < 1 || h[3] > device::kMaxCrfKernels || h[4] < 0 || h[4] > 1 ||
      h[6] < 1 || h[0] % h[6] != 0 || h[7] < 0 || h[7] > 1) {
    fail(2, "bad mean_field header");
  }
  std::FILE* out = std::fopen(argv[3], "wb");
  if (!out) fail(2, "cannot open the output file");
  if (h[4] == 0) run_mean_field<double>(in, out, h, launch);
  else run_mean_field<float>(in, out, h, launch);
  if (std::fclose(out) != 0) fail(2, "write failed");
  std::fclose(in);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "mean_field") return mean_field_main(argc, argv);
  if (argc == 2 && std::strcmp(argv[1], "--racy-toy") == 0) return racy_toy();
  if (argc < 4) fail(2, "usage: harness IN OUT SEED [--threads K] [--repeats R] [--schedule NAME] [--cas MODE]");
  const Options options = parse_options(argc, argv);
  harness_cas::mode = options.cas;
  std::FILE* in = std::fopen(argv[1], "rb");
  if (!in) fail(2, "cannot open the input file");
  Launcher launch(options.schedule, options.threads, std::strtoull(argv[3], nullptr, 10));
  const std::vector<int64_t> h = read_array<int64_t>(in, 7);
  const int64_t n = h[0], p = h[1], c = h[3], feature_dtype = h[4], value_dtype = h[5], capacity = h[6];
  const int d = static_cast<int>(h[2]);
  if (n < 1 || p < 1 || d < 1 || d > crfrnn::kMaxDim || c < 1 || capacity < 0 ||
      feature_dtype < 0 || feature_dtype > 1 || value_dtype < 0 || value_dtype > 1) {
    fail(2, "bad header");
  }
  std::FILE* out = std::fopen(argv[2], "wb");
  if (!out) fail(2, "cannot open the output file");
  if (feature_dtype == 0 && value_dtype == 0) run<double, double>(in, out, n, p, d, c, capacity, options.repeats, launch);
  if (feature_dtype == 0 && value_dtype == 1) run<double, float>(in, out, n, p, d, c, capacity, options.repeats, launch);
  if (feature_dtype == 1 && value_dtype == 0) run<float, double>(in, out, n, p, d, c, capacity, options.repeats, launch);
  if (feature_dtype == 1 && value_dtype == 1) run<float, float>(in, out, n, p, d, c, capacity, options.repeats, launch);
  if (std::fclose(out) != 0) fail(2, "write failed");
  std::fclose(in);
  return 0;
}
