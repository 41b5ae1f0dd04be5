"""Pure-PyTorch permutohedral lattice: the oracle for the C++ and CUDA backends.

Runs on any device. Every step mirrors, in vectorised form, the per-point arithmetic of
`csrc/lattice_math.h` (the header the C++ and CUDA backends share), so that all backends
build the same lattice from the same features:

1. Embed each scaled feature vector f (d values) into the hyperplane sum(x) = 0 of R^{d+1}
   ("elevate"), find the remainder-0 lattice point nearest to it, the rank of each
   coordinate's remainder, and from the ranks the enclosing simplex and barycentric weights.
2. The simplex's d+1 vertices get integer keys (d+1 coordinates plus the image index, so
   images of a batch never share a vertex); `torch.unique` numbers the distinct keys.
3. Blur neighbours of vertex k along direction j are k + (d+1)e_j - 1 and k - (d+1)e_j + 1;
   a neighbour that is not a vertex of the lattice is marked with index M (a zero row).

Each point's simplex is decided as densecrf decides it: for float32 (and half) features in
float32, with densecrf's operations in its order, so that points on a simplex boundary in real
arithmetic (exact ties: grid-aligned bandwidths, integer colours) fall into densecrf's simplex;
for float64 features in float64. The barycentric weights are always computed in float64 from the
float64 lattice coordinates, relative to the simplex decided.
"""
import math

import torch

__all__ = ["build_lattice", "lattice_filter", "lattice_filter_weights_grad", "barycentric_weights_grad",
           "check_features", "check_feature_values", "check_has_values", "check_lattice_tables", "check_lattice_size",
           "max_lattice_points", "MAX_ABS_FEATURE", "MAX_FEATURE_DIM"]

#: Largest accepted |feature| (after scaling by 1/sigma): keeps int32 keys from overflowing.
MAX_ABS_FEATURE = 2.0 ** 20
#: Largest feature dimension d (the C++/CUDA code keeps per-point scratch arrays of this size).
MAX_FEATURE_DIM = 31
#: The lattice's tables are int32, and the C++ build indexes its scratch up to N*P*d*(d+1).
INDEX_LIMIT = 2 ** 31


def max_lattice_points(d: int) -> int:
    """Most points (N*P, all images together) a lattice of feature dimension d can hold:
    N*P*d*(d+1) < 2^31 (e.g. 71.5 million pixels for the CRF's bilateral kernel, d = 5)."""
    return (INDEX_LIMIT - 1) // (d * (d + 1))


def check_lattice_size(num_points: int, d: int, what: str = "features"):
    """ValueError, before anything is allocated, for more points than a lattice can index."""
    if num_points > max_lattice_points(d):
        raise ValueError(f"{what}: {num_points} points (N*P, all images together) with d = {d} features "
                         f"are more than a lattice can index: at most {max_lattice_points(d)} for d = {d} "
                         f"(N*P*d*(d+1) < 2^31). Split the batch or downscale the images.")


def check_features(features: torch.Tensor, op: str = "crfrnn::build_lattice_ref"):
    """TypeError/ValueError for features the build cannot use (the checks of csrc/checks.h's
    check_features): Tensor[N, P, d], floating point, 1 <= d <= MAX_FEATURE_DIM, not too many points."""
    if not features.is_floating_point():
        raise TypeError(f"{op}: features must be floating point, got {features.dtype}")
    if features.dim() != 3:
        raise ValueError(f"{op}: features must be [N, P, d], got {tuple(features.shape)}")
    n, p, d = features.shape
    if not 1 <= d <= MAX_FEATURE_DIM:
        raise ValueError(f"{op}: feature dimension d must be in 1..{MAX_FEATURE_DIM}, got {d}")
    check_lattice_size(n * p, d, f"{op}: features {tuple(features.shape)}")


def check_has_values(op, *tensors):
    """ValueError for tensors on the meta device where `op` needs their values (the tables'
    ranges, the features' values): the ops themselves take meta tensors (their fake kernels give
    the shapes), these functions, their kernels, cannot."""
    for t in tensors:
        if t is not None and t.device.type == "meta":
            raise ValueError(f"{op}: tensors on the meta device have no values, and this computation needs them: "
                             "call the op (torch.ops.crfrnn.*) with meta tensors for shapes only")


def check_feature_values(points: torch.Tensor):
    """ValueError for NaN/Inf or out-of-range features (the same checks as csrc/checks.h)."""
    check_has_values("crfrnn::build_lattice_ref", points)
    if points.numel() == 0:
        return
    bad = ~torch.isfinite(points)
    if bad.any():
        raise ValueError(f"features contain {int(bad.sum())} NaN/Inf values")
    largest = points.abs().max().item()
    if largest > MAX_ABS_FEATURE:
        raise ValueError(f"features must be at most {MAX_ABS_FEATURE:g} in magnitude (after scaling "
                         f"by 1/sigma), got {largest:g}: is a bandwidth tiny or not applied?")


def check_lattice_tables(op, vertex_index, neighbors, splat_offsets=None, splat_entries=None):
    """ValueError unless the lattice's index tables hold only values the filter can use (the same
    rules and messages as csrc/checks.h): vertex_index [P, d+1] in [0, M), neighbors [d+1, M, 2]
    in [0, M] (M: no neighbour), splat_offsets [M+1] non-decreasing from 0 to K = P*(d+1),
    splat_entries [K] in [0, K). One device sync for all of them."""
    check_has_values(op, vertex_index, neighbors, splat_offsets, splat_entries)
    if vertex_index.dim() != 2 or neighbors.dim() != 3 or neighbors.shape[0] != vertex_index.shape[1] \
            or neighbors.shape[2] != 2:
        raise ValueError(f"{op}: vertex_index must be [P, d+1] and neighbors [d+1, M, 2], got "
                         f"{tuple(vertex_index.shape)} and {tuple(neighbors.shape)}")
    m, k = neighbors.shape[1], vertex_index.numel()
    # (name, table, smallest allowed, largest allowed, what the values are)
    rules = [("vertex_index", vertex_index, 0, m - 1, f"vertex numbers below M = neighbors.size(1) = {m}"),
             ("neighbors", neighbors, 0, m, f"vertex numbers up to M = {m}, which marks a missing neighbour")]
    if splat_offsets is not None:
        if tuple(splat_offsets.shape) != (m + 1,):
            raise ValueError(f"{op}: splat_offsets must be [M+1 = {m + 1}], got {tuple(splat_offsets.shape)}")
        rules.append(("splat_offsets", splat_offsets, 0, k,
                      f"positions in splat_entries, up to K = vertex_index.numel() = {k}"))
    if splat_entries is not None:
        if tuple(splat_entries.shape) != (k,):
            raise ValueError(f"{op}: splat_entries must be [K = {k}], got {tuple(splat_entries.shape)}")
        rules.append(("splat_entries", splat_entries, 0, k - 1,
                      f"entries p*(d+1) + r below K = vertex_index.numel() = {k}"))
    for name, table, *_ in rules:
        if table.dtype != torch.int32:
            raise ValueError(f"{op}: lattice index tensors must be int32, got {name} {table.dtype}")
    rules = [rule for rule in rules if rule[1].numel() > 0]
    stats = [x.long() for _, table, *_ in rules for x in torch.aminmax(table)]
    if splat_offsets is not None:
        steps = splat_offsets[1:].long() - splat_offsets[:-1].long()
        stats += [splat_offsets[0].long(), splat_offsets[-1].long(),
                  steps.min() if steps.numel() else splat_offsets.new_zeros((), dtype=torch.long)]
    if not stats:
        return
    values = torch.stack(stats).tolist()
    for i, (name, _, lo, hi, meaning) in enumerate(rules):
        smallest, largest = values[2 * i], values[2 * i + 1]
        if smallest < lo or largest > hi:
            raise ValueError(f"{op}: {name} holds values in [{smallest}, {largest}], expected [{lo}, {hi}] "
                             f"({meaning})")
    if splat_offsets is not None:
        first, last, smallest_step = values[-3:]
        if first != 0 or last != k:
            raise ValueError(f"{op}: splat_offsets must run from 0 to K = vertex_index.numel() = {k}, "
                             f"got {first} ... {last}")
        if smallest_step < 0:
            i = int((steps < 0).nonzero()[0, 0])
            raise ValueError(f"{op}: splat_offsets must be non-decreasing, got splat_offsets[{i}] = "
                             f"{int(splat_offsets[i])} > splat_offsets[{i + 1}] = {int(splat_offsets[i + 1])}")


def scale_factors(d: int, device) -> torch.Tensor:
    """Per-dimension scale that makes the lattice blur a Gaussian of std 1 in feature space.

    Same constants as Adams et al. and densecrf: inv_std = sqrt(2/3) (d + 1),
    scale_i = inv_std / sqrt((i + 1)(i + 2)).
    """
    # A tensor divided by a tensor: true division, as in lattice_scale of csrc/lattice_math.h.
    # (A Python number divided by a tensor is computed as number * reciprocal(tensor), which
    # differs by one ulp for most (d, i) and flipped rank decisions on real images.)
    inv_std = torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float64, device=device)
    i = torch.arange(d, dtype=torch.float64, device=device)
    return inv_std / torch.sqrt((i + 1) * (i + 2))


#: Points per chunk of the build's per-point work, as (d+1)^2 elements each (the rank decisions
#: compare every pair of coordinates): temporaries stay at a few tens of MB at any size and d.
CHUNK_ELEMENTS = 2 ** 21


#: Largest |float32 elevated coordinate| at which a point's simplex is decided in float32
#: (kFloatDecisionLimit of csrc/lattice_math.h): densecrf's keys are int16, so it embeds nothing
#: beyond, and float32's rounding error grows with the coordinates; beyond it, double decides.
FLOAT_DECISION_LIMIT = 2.0 ** 15


def float_scale_factors(d: int, device) -> torch.Tensor:
    """scale_factors in float32 as densecrf computes them (lattice_scale_float of
    csrc/lattice_math.h): inv_std rounded to float, the product in double, then rounded to float."""
    inv_std = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    scales = [1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std for i in range(d)]
    return torch.tensor(scales, dtype=torch.float64).to(device=device, dtype=torch.float32)


def embed(points: torch.Tensor, float_decisions: bool = False):
    """Simplex and barycentric weights of each point.

    The simplex (rem0 and rank) is decided in float32 with densecrf's arithmetic if
    `float_decisions` (the features were float32 or narrower; points beyond FLOAT_DECISION_LIMIT
    excepted), else in float64; the weights are always computed in float64 from the float64
    elevated coordinates, relative to the simplex decided (see embed_point_scaled of
    csrc/lattice_math.h).

    Args:
        points (Tensor[P, d], float64): scaled features (exact float32 values if float_decisions).
        float_decisions (bool): decide the simplices in float32.
    Returns:
        rem0 (Tensor[P, d+1], int64): remainder-0 lattice point after the wrap-around.
        rank (Tensor[P, d+1], int64): rank of each coordinate's remainder, in 0..d.
        bary (Tensor[P, d+1], float64): barycentric weight of vertex r (r = 0..d), summing to 1.
    """
    num_points, d = points.shape
    chunk = max(1, CHUNK_ELEMENTS // (d + 1) ** 2)
    if num_points <= chunk:
        return _embed(points, float_decisions)
    parts = [_embed(points[i:i + chunk], float_decisions) for i in range(0, num_points, chunk)]
    return tuple(torch.cat(group) for group in zip(*parts))


def _elevate(cf: torch.Tensor) -> torch.Tensor:
    """elevated[j] = sum_{k >= j} cf[k] - j cf[j-1] (Tensor[P, d+1], cf's dtype), accumulated right
    to left in the same order as the C++ loop, so that the results are bit-identical."""
    num_points, d = cf.shape
    elevated = cf.new_empty(num_points, d + 1)
    running = cf.new_zeros(num_points)
    for j in range(d, 0, -1):
        c = cf[:, j - 1]
        elevated[:, j] = running - j * c
        running = running + c
    elevated[:, 0] = running
    return elevated


def _ranks(remainder: torch.Tensor) -> torch.Tensor:
    """rank[i] = number of coordinates with a larger remainder; ties go to the later index,
    exactly as the pairwise loop of the C++ code (rank_remainders) decides them."""
    d1 = remainder.shape[1]
    di, dj = remainder[:, :, None], remainder[:, None, :]
    idx = torch.arange(d1, device=remainder.device)
    later = idx[None, :] > idx[:, None]  # [i, j]: j comes after i
    bigger = torch.where(later, di < dj, di <= dj)
    bigger &= idx[None, :] != idx[:, None]
    return bigger.sum(2)


def _decide(elevated: torch.Tensor, inv_or_d1: torch.Tensor, multiply: bool):
    """(rem0, unwrapped rank) Tensor[P, d+1] int64 from the elevated coordinates (either dtype):
    round each coordinate to a multiple of d+1 (half to even: torch.round, C's rint), rank the
    remainders, add the coordinate sum."""
    d1 = elevated.shape[1]
    rounded = torch.round(inv_or_d1 * elevated if multiply else elevated / inv_or_d1)
    rem0 = rounded.to(torch.int64) * d1
    coord_sum = rounded.to(torch.int64).sum(1, keepdim=True)
    return rem0, _ranks(elevated - rem0.to(elevated.dtype)) + coord_sum


def _embed(points: torch.Tensor, float_decisions: bool = False):
    """`embed` of one chunk of points (its temporaries are [P, d+1, d+1])."""
    num_points, d = points.shape
    dev = points.device
    elevated = _elevate(points * scale_factors(d, dev))

    # Divide by a tensor on the points' device: on CUDA, division by a Python number is done as
    # a multiplication by its reciprocal, which can differ from the C++ by one ulp.
    d_plus_1 = torch.tensor(float(d + 1), dtype=torch.float64, device=dev)
    if float_decisions:
        # densecrf's float32 arithmetic: float scales, times 1.0f/(d+1) (a float product).
        elevated_f = _elevate(points.to(torch.float32) * float_scale_factors(d, dev))
        inv_d1 = torch.tensor(1.0, dtype=torch.float32, device=dev) / torch.tensor(float(d + 1),
                                                                                   dtype=torch.float32, device=dev)
        rem0, rank = _decide(elevated_f, inv_d1, multiply=True)
        in_range = (elevated_f.abs() <= FLOAT_DECISION_LIMIT).all(1, keepdim=True)
        if not bool(in_range.all()):  # points beyond the limit: decided in double
            rem0_d, rank_d = _decide(elevated, d_plus_1, multiply=False)
            rem0, rank = torch.where(in_range, rem0, rem0_d), torch.where(in_range, rank, rank_d)
    else:
        rem0, rank = _decide(elevated, d_plus_1, multiply=False)

    # Bring the point back onto the plane sum = 0 (wrap ranks into 0..d).
    low, high = rank < 0, rank > d
    rank = torch.where(low, rank + d + 1, torch.where(high, rank - d - 1, rank))
    rem0 = torch.where(low, rem0 + d + 1, torch.where(high, rem0 - d - 1, rem0))
    return rem0, rank, _barycentric(elevated, rem0, rank)


def _barycentric(elevated, rem0, rank):
    """Barycentric weights Tensor[P, d+1] float64 (Adams et al. p. 10) of the elevated points
    (float64) in the simplices (rem0, rank), with the wrap-around of slot d+1 into slot 0."""
    num_points, d1 = elevated.shape
    d = d1 - 1
    d_plus_1 = torch.tensor(float(d1), dtype=torch.float64, device=elevated.device)
    v = (elevated - rem0.to(torch.float64)) / d_plus_1
    bary = torch.zeros(num_points, d + 2, dtype=torch.float64, device=elevated.device)
    bary.scatter_add_(1, d - rank, v)
    bary.scatter_add_(1, d - rank + 1, -v)
    bary[:, 0] += 1.0 + bary[:, d + 1]
    return bary[:, : d + 1].contiguous()


def barycentric_weights(points: torch.Tensor, rem0: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """The barycentric weights Tensor[P, d+1] float64 of points (Tensor[P, d], float64) in the given
    simplices (rem0, rank of `embed`, held fixed): an affine function of the points, whose
    transpose `barycentric_weights_grad` applies."""
    return _barycentric(_elevate(points * scale_factors(points.shape[1], points.device)), rem0, rank)


def vertex_keys(rem0: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Integer keys of the d+1 simplex vertices of each point.

    Args:
        rem0, rank (Tensor[P, d+1], int64): from `embed`.
    Returns:
        Tensor[P, d+1, d+1] int64: key of vertex r (dim 1) = rem0 + r, minus (d+1) where
        rank > d - r.
    """
    d = rem0.shape[1] - 1
    r = torch.arange(d + 1, device=rem0.device)[None, :, None]
    return rem0[:, None, :] + r - (d + 1) * (rank[:, None, :] > d - r).to(torch.int64)


#: The vertex keys (image, d coordinates) are numbered through two linear hashes modulo this
#: prime, 2^31 - 1, whose pair is one int64: a coefficient (< 2^31) times a reduced coordinate
#: (< 2^31) stays below 2^62, so nothing overflows. Collisions are detected (every key is
#: compared with its vertex's) and never silently used.
HASH_PRIME = 2 ** 31 - 1


def _hash_coefficients(d, attempt, device):
    """Tensor[2, d+1] int64 in [1, HASH_PRIME): the two hashes' coefficients of the image index
    and the d key coordinates, fixed per attempt (the build is deterministic)."""
    g = torch.Generator().manual_seed(0x5EED + attempt)
    return torch.randint(1, HASH_PRIME, (2, d + 1), generator=g, dtype=torch.int64).to(device)


def _combine(h1, h2):
    """One int64 of the two hashes (each in [0, HASH_PRIME))."""
    return h1 * 2 ** 31 + h2


def _hash(image, coords, coeffs):
    """Tensor[P] int64: the pair of hashes of the keys (image[P], coords[P, d]) as one int64."""
    hashes = []
    for c in coeffs:
        h = (torch.remainder(coords, HASH_PRIME) * c[1:]).remainder_(HASH_PRIME).sum(1)
        hashes.append((h + image * c[0]).remainder_(HASH_PRIME))
    return _combine(*hashes)


def _corner_coords(rem0, rank, r):
    """Tensor[P, d] int64: the key coordinates of simplex corner r (an int or Tensor[P]) of each
    point (see `vertex_keys`; the last coordinate, minus the sum of the others, dropped)."""
    d = rem0.shape[1] - 1
    r = torch.as_tensor(r, device=rem0.device)
    r = r[:, None] if r.dim() else r
    return rem0[:, :d] + r - (d + 1) * (rank[:, :d] > d - r).to(torch.int64)


def _number_vertices(image, rem0, rank, coeffs):
    """Hash every simplex corner's key and number the distinct hashes: (vertex_index
    Tensor[P, d+1] int64, hashes Tensor[M] sorted, keys Tensor[M, d+1] int64 (image, d coordinates)
    of each vertex), or None if two distinct keys share a hash. Temporaries of O(P d) at a time."""
    num_points, d1 = rem0.shape
    hashes = torch.stack([_hash(image, _corner_coords(rem0, rank, r), coeffs) for r in range(d1)], 1)
    uniq, vertex_index = torch.unique(hashes, return_inverse=True)
    del hashes
    m, k = uniq.numel(), vertex_index.numel()
    first = torch.full((m,), k, dtype=torch.int64, device=rem0.device)
    first.scatter_reduce_(0, vertex_index.reshape(-1), torch.arange(k, device=rem0.device), "amin")
    point, corner = first // d1, first % d1
    keys = torch.cat([image[point, None], _corner_coords(rem0[point], rank[point], corner)], 1)
    for r in range(d1):  # every corner's key is its vertex's: no two keys share a hash
        own = _corner_coords(rem0, rank, r)
        theirs = keys[vertex_index[:, r]]
        if not (torch.equal(own, theirs[:, 1:]) and torch.equal(image, theirs[:, 0])):
            return None
    return vertex_index, uniq, keys


def _blur_neighbours(uniq, keys, coeffs):
    """Tensor[d+1, M, 2] int64: the two blur neighbours of every vertex along each direction j,
    keys +-(-1, ..., -1 + (d+1) [at j], ..., -1) (image unchanged; for j = d only the -1s show, the
    last coordinate being dropped), M where the neighbour is not a vertex. Found by their hash
    (the hashes are linear, so a shift moves them by the shift's hash) and confirmed by their key."""
    m, d1 = keys.shape
    d = d1 - 1
    dev = keys.device
    h = (uniq // 2 ** 31, uniq % 2 ** 31)
    neighbors = torch.empty(d1, m, 2, dtype=torch.int64, device=dev)
    chunk = max(1, CHUNK_ELEMENTS // d1)
    for j in range(d1):
        shift = torch.full((d,), -1, dtype=torch.int64, device=dev)
        if j < d:
            shift[j] += d1
        shift_hash = [int((torch.remainder(shift, HASH_PRIME) * c[1:]).remainder(HASH_PRIME).sum()) % HASH_PRIME
                      for c in coeffs]
        for side, sign in enumerate((1, -1)):
            target = _combine(*((hk + sign * sk) % HASH_PRIME for hk, sk in zip(h, shift_hash)))
            found = torch.searchsorted(uniq, target).clamp_(max=m - 1)
            matched = uniq[found] == target
            hit = matched.nonzero()[:, 0]
            found.masked_fill_(~matched, m)
            for start in range(0, hit.numel(), chunk):  # is the hash's vertex the neighbour? keys tell
                mine = hit[start:start + chunk]
                theirs = keys[found[mine]]
                same = (theirs[:, 0] == keys[mine, 0]) & (theirs[:, 1:] == keys[mine, 1:] + sign * shift).all(1)
                found[mine[~same]] = m
            neighbors[j, :, side] = found
    return neighbors


def build_lattice(features: torch.Tensor):
    """Build the permutohedral lattice of a batch of point sets.

    Memory: the tables it returns (O(N*P*d)), the neighbour table (O(M*d)), and temporaries of
    the same orders: the vertices are numbered by a hash of their keys (collisions detected:
    every key is compared with its vertex's), the neighbours found by hash and confirmed by key,
    and the per-point work runs in chunks.

    Args:
        features (Tensor[N, P, d]): scaled features, any float dtype.
    Returns:
        vertex_index (Tensor[N*P, d+1], int32): lattice vertex of each point's simplex corners.
        weights (Tensor[N*P, d+1], features' dtype, float32 for half): barycentric weights.
        neighbors (Tensor[d+1, M, 2], int32): per direction, the two blur neighbours of each
            vertex, M where the neighbour is not in the lattice.
        splat_offsets (Tensor[M+1], int32), splat_entries (Tensor[N*P*(d+1)], int32): the
            vertex -> (point, corner) table in CSR form: the entries of vertex v are
            splat_entries[splat_offsets[v]:splat_offsets[v+1]], each p*(d+1) + r, in increasing
            order. It makes the splat a deterministic gather (the C++/CUDA backends use it).
        (Vertices are numbered in an order of their own: the backends' numberings differ, the
        lattices they describe do not.)
    """
    check_features(features)
    check_feature_values(features)
    n, p, d = features.shape
    dev = features.device
    points = features.detach().reshape(n * p, d).to(torch.float64)
    rem0, rank, bary = embed(points, float_decisions=features.dtype != torch.float64)
    del points
    image = torch.arange(n, device=dev).repeat_interleave(p)
    for attempt in range(4):
        coeffs = _hash_coefficients(d, attempt, dev)
        numbered = _number_vertices(image, rem0, rank, coeffs)
        if numbered is not None:
            break
    else:  # four independent hashes, each colliding with probability ~ M^2 / 2^63
        raise RuntimeError("crfrnn::build_lattice_ref: vertex keys collided under four hashes")
    vertex_index, uniq, keys = numbered
    del rem0, rank
    m = uniq.numel()
    neighbors = _blur_neighbours(uniq, keys, coeffs)

    flat_index = vertex_index.reshape(-1)
    splat_entries = torch.argsort(flat_index, stable=True)
    counts = torch.bincount(flat_index, minlength=m)
    splat_offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])

    weight_dtype = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
    i32 = torch.int32
    return (vertex_index.reshape(n * p, d + 1).to(i32), bary.to(weight_dtype), neighbors.to(i32),
            splat_offsets.to(i32), splat_entries.to(i32))


def _splat(values, vertex_index, weights, num_vertices):
    """Grid Tensor[M+1, C] (row M zero): grid[v] = sum of weights[p, r] values[p] over the
    (p, r) with vertex_index[p, r] = v."""
    c = values.shape[1]
    grid = values.new_zeros(num_vertices + 1, c)
    terms = (weights[:, :, None] * values[:, None, :]).reshape(vertex_index.numel(), c)
    grid.index_add_(0, vertex_index.reshape(-1), terms)
    return grid


def _blur(grid, neighbors, reverse):
    """[0.5, 1, 0.5] along each direction of `neighbors` [d+1, M, 2] (reversed order if
    `reverse`: the adjoint); row M stays zero."""
    d1, m, _ = neighbors.shape
    for j in (range(d1 - 1, -1, -1) if reverse else range(d1)):
        blurred = grid[:m] + 0.5 * (grid[neighbors[j, :, 0]] + grid[neighbors[j, :, 1]])
        grid = torch.cat([blurred, grid[m:]])
    return grid


def _corner_rows(grid, vertex_index):
    """Tensor[N*P, d+1, C]: the grid row of each point's simplex corners."""
    return grid[vertex_index]


def _alpha(d1):
    # 1/(1 + 2^-d) compensates the blur's gain, as in densecrf (d = number of features).
    return 1.0 / (1.0 + 2.0 ** (-(d1 - 1)))


def lattice_filter(values, vertex_index, weights, neighbors, splat_offsets=None, splat_entries=None,
                   reverse: bool = False):
    """Raw lattice filter: slice(blur(splat(values))), blur directions reversed if `reverse`.

    The blur of each direction is symmetric, so the filter with `reverse=True` is the exact
    adjoint (transpose) of the filter with `reverse=False`.

    Args:
        values (Tensor[N*P, C]): values per point.
        vertex_index, weights (Tensor[N*P, d+1]), neighbors (Tensor[d+1, M, 2]): the lattice.
        splat_offsets, splat_entries: checked when given (see `check_lattice_tables`), else
            unused (the reference splats with index_add_).
    Returns:
        Tensor[N*P, C] in the values' dtype (accumulated in float32 at least).
    """
    check_lattice_tables("crfrnn::lattice_filter_ref", vertex_index, neighbors, splat_offsets, splat_entries)
    d1, m, _ = neighbors.shape
    acc = torch.promote_types(values.dtype, torch.float32)
    w = weights.to(acc)
    idx = vertex_index.long()
    grid = _blur(_splat(values.to(acc), idx, w, m), neighbors.long(), reverse)
    out = (_corner_rows(grid, idx) * w[:, :, None]).sum(1) * _alpha(d1)
    return out.to(values.dtype)


def lattice_filter_weights_grad(values, grad_out, vertex_index, weights, neighbors, splat_offsets=None,
                                splat_entries=None, reverse: bool = False, check_tables: bool = True):
    """Gradient of <grad_out, lattice_filter(values, ..., weights, reverse)> w.r.t. the weights.

    The filter is out = alpha S B S^T values, with S[p, v] = sum of weights[p, r] over the corners
    r with vertex_index[p, r] = v, and B the blur. Each weight enters twice, through the slice and
    through the splat:

        d/dweights[p, r] = alpha <grad_out[p], G[vertex(p, r)]> + <values[p], H[vertex(p, r)]>,
        G = B S^T values,   H = B^T S^T (alpha grad_out)  (the adjoint grid: blur order reversed).

    Args:
        values, grad_out (Tensor[N*P, C]); vertex_index, weights (Tensor[N*P, d+1]);
        neighbors (Tensor[d+1, M, 2]); splat_offsets, splat_entries: checked when given;
        reverse (bool): the filter's blur order.
        check_tables (bool): False skips the tables' range checks (one device sync), for tables an
            op has checked already (this function's use in autograd, which torch.compile traces).
    Returns:
        Tensor[N*P, d+1] in the weights' dtype.
    """
    op = "crfrnn::lattice_filter_weights_backward_ref"
    if check_tables:
        check_lattice_tables(op, vertex_index, neighbors, splat_offsets, splat_entries)
    if grad_out.shape != values.shape or values.dim() != 2 or values.shape[0] != vertex_index.shape[0]:
        raise ValueError(f"{op}: values and grad must both be [P, C] with P = vertex_index.size(0) = "
                         f"{vertex_index.shape[0]}, got {tuple(values.shape)} and {tuple(grad_out.shape)}")
    d1, m, _ = neighbors.shape
    acc = torch.promote_types(torch.promote_types(values.dtype, grad_out.dtype), torch.float32)
    w = weights.to(acc)
    idx, nb = vertex_index.long(), neighbors.long()
    alpha = _alpha(d1)
    forward_grid = _blur(_splat(values.to(acc), idx, w, m), nb, reverse)
    adjoint_grid = _blur(_splat(grad_out.to(acc) * alpha, idx, w, m), nb, not reverse)
    through_slice = (_corner_rows(forward_grid, idx) * grad_out.to(acc)[:, None, :]).sum(2) * alpha
    through_splat = (_corner_rows(adjoint_grid, idx) * values.to(acc)[:, None, :]).sum(2)
    return (through_slice + through_splat).to(weights.dtype)


def barycentric_weights_grad(features: torch.Tensor, grad_weights: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the features of <grad_weights, barycentric weights>, simplices held fixed.

    For a fixed simplex (rank and rem0 of `embed`) the weights are linear in the features:
    f -> cf = f * scale -> elevated (a fixed linear map) -> v = (elevated - rem0) / (d+1) ->
    bary[d - rank_i] += v_i, bary[d - rank_i + 1] -= v_i (slot d+1 wraps into slot 0). This is
    the transpose of that chain, point by point (as ``barycentric_weights_backward`` of
    csrc/lattice_math.h, the C++ and CUDA backends' body).

    Args:
        features (Tensor[N, P, d]): the features the lattice was built from.
        grad_weights (Tensor[N*P, d+1]).
    Returns:
        Tensor[N, P, d] in the features' dtype (float32 for half features).
    """
    op = "crfrnn::barycentric_weights_backward_ref"
    check_features(features, op)
    n, p, d = features.shape
    if tuple(grad_weights.shape) != (n * p, d + 1):
        raise ValueError(f"{op}: grad_weights must be [N*P, d+1] = {[n * p, d + 1]} for features "
                         f"{tuple(features.shape)}, got {tuple(grad_weights.shape)}")
    points = features.detach().reshape(n * p, d).to(torch.float64)
    _, rank, _ = embed(points, float_decisions=features.dtype != torch.float64)
    g = grad_weights.to(torch.float64)
    g_ext = torch.cat([g, g[:, :1]], 1)  # slot d+1 is slot 0
    slot = d - rank
    grad_elevated = (g_ext.gather(1, slot) - g_ext.gather(1, slot + 1)) / (d + 1)
    # elevated[j] = sum_{k >= j} cf[k] - j cf[j-1]  =>  dcf[k] = sum_{j <= k} de[j] - (k+1) de[k+1]
    ks = torch.arange(1, d + 1, dtype=torch.float64, device=points.device)
    grad_cf = torch.cumsum(grad_elevated[:, :d], 1) - ks * grad_elevated[:, 1:]
    grad = grad_cf * scale_factors(d, points.device)
    out_dtype = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
    return grad.reshape(n, p, d).to(out_dtype)
