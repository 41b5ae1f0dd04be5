"""The value checks that the CRF layer, `mean_field` and `dense_crf` share: one rule per kind of
input, one message per mistake, naming what was expected and what came.

Arguments are checked where they enter (ValueError/TypeError before any work); the checks that
need the values of large tensors (NaN/Inf, colour ranges, overflow) run after the work, in one
device sync (`check_layer_values`).
"""
import math
import numbers
import operator
import warnings

import torch

from . import ops
from .lattice import MAX_FEATURE_DIM, NORMALIZATIONS, check_lattice_size

#: The most mean-field iterations a layer runs per call (the fused ops' own cap). Mean field
#: settles within tens (CRF-RNN trains with 5, DeepLab infers with 10); a count beyond this, e.g.
#: from a damaged state dict, would make a forward run for hours, so it is refused.
MAX_ITERATIONS = ops.MAX_ITERATIONS

#: Image dtypes the CRF reads (what torch's CPU and CUDA reductions cover: no uint16/32/64,
#: float8, bool or complex).
IMAGE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                torch.float32, torch.float64)

#: How far (in 0..255 units) de-normalised colours may stray outside 0..255 before the layer
#: warns that the image seems not normalised as declared (rounding and augmentations stray a bit).
COLOUR_SLACK = 64.0
#: An image whose colours all lie in 0..1 is warned about only if its brightest is above this: a
#: (nearly) black image is the same in either convention, and rounding leaves a normalised black
#: one a hair above 0.
DARKEST_0_TO_1_MAX = 0.01


def iteration_count(value, name="num_iterations"):
    """`value` as a Python int, if it is an integer (numpy ones too, not bool) in
    0..MAX_ITERATIONS; else ValueError naming `name`. Every iteration count the library takes
    (the layer's, mean_field's, dense_crf's) passes here."""
    if not isinstance(value, bool):
        try:
            value = operator.index(value)  # numpy integers (also as torch.compile passes them)
        except TypeError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ITERATIONS:
        raise ValueError(f"{name} must be an int in 0..{MAX_ITERATIONS}, got {value!r}")
    return value


def prune_threshold(value, name="prune"):
    """`value` as a float if it is a real number in [0, 1] (not bool), else ValueError naming
    `name`: sender pruning's epsilon (see `crfrnn.mean_field`)."""
    value = scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1] (0: no pruning), got {value!r}")
    return float(value)


def scalar(value):
    """A 0-d tensor or array as its Python number (a parameter read back as ``t[0]``, numpy's
    ``np.float32(3)``); anything else as it is."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def positive(name, value):
    """`value` as a float if it is a positive finite real number (not bool; a 0-d tensor or
    array holding one too), else ValueError."""
    value = scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def finite(name, value):
    """`value` as a float if it is a finite real number (not bool; a 0-d tensor or array holding
    one too), else ValueError."""
    value = scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def kernel_parameters(bilateral, spatial):
    """((sigma_xy, sigma_rgb, weight), (sigma_xy, weight)) checked, as tuples of floats."""
    # (1-D arrays and tensors as the tuples they hold: bilateral=np.array([80, 13, 10]))
    bilateral, spatial = (v.tolist() if getattr(v, "ndim", None) == 1 else v for v in (bilateral, spatial))
    if not (isinstance(bilateral, (tuple, list)) and len(bilateral) == 3):
        raise ValueError(f"bilateral must be (sigma_xy, sigma_rgb, weight), got {bilateral!r}")
    if not (isinstance(spatial, (tuple, list)) and len(spatial) == 2):
        raise ValueError(f"spatial must be (sigma_xy, weight), got {spatial!r}")
    bil = (positive("bilateral sigma_xy", bilateral[0]), positive("bilateral sigma_rgb", bilateral[1]),
           finite("bilateral weight", bilateral[2]))
    spa = (positive("spatial sigma_xy", spatial[0]), finite("spatial weight", spatial[1]))
    return bil, spa


def choice(name, value, allowed):
    """`value` if it is one of `allowed`, else ValueError naming `name` and the choices."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def image_normalisation(image_mean, image_std):
    """(mean, std) as Tensor[3] float32 each, checked: 3 finite values each, std positive; (None,
    None) when neither is given (images in 0..255)."""
    if (image_mean is None) != (image_std is None):
        raise ValueError("give both image_mean and image_std (for normalised 0..1 images) or neither (images in "
                         "0..255)")
    if image_mean is None:
        return None, None
    mean = torch.as_tensor(image_mean, dtype=torch.float32).flatten()
    std = torch.as_tensor(image_std, dtype=torch.float32).flatten()
    if mean.numel() != 3 or std.numel() != 3:
        raise ValueError(f"image_mean and image_std need 3 values (RGB), got {mean.numel()} and {std.numel()}")
    if not (torch.isfinite(std).all() and (std > 0).all() and torch.isfinite(mean).all()):
        raise ValueError(f"image_std must be positive and finite, got {std.tolist()}")
    return mean, std


def normalizations(normalize, num_kernels):
    """`normalize` (one of NORMALIZATIONS, or a sequence of them, one per kernel) as a list of
    one per kernel; else ValueError."""
    if isinstance(normalize, str):
        return [choice("normalize", normalize, NORMALIZATIONS)] * num_kernels
    normalize = list(normalize)
    if len(normalize) != num_kernels:
        raise ValueError(f"normalize: one per kernel ({num_kernels}) or one for all, got {len(normalize)}: "
                         f"{normalize!r}")
    return [choice("normalize", n, NORMALIZATIONS) for n in normalize]


def class_indices(name, classes, num_classes):
    """`classes` (ints, numpy or 0-dim tensor integers) as a list of ints in [0, num_classes);
    else ValueError naming `name`."""
    indices = []
    for c in classes:
        try:
            index = None if isinstance(c, bool) else operator.index(c)
        except TypeError:
            index = None
        if index is None or not 0 <= index < num_classes:
            raise ValueError(f"{name}: expected class indices in [0, {num_classes}), got {c!r}")
        indices.append(index)
    return indices


def image_dtype(image, layout):
    """TypeError unless `image` has a dtype the CRF reads (IMAGE_DTYPES); `layout` names the
    expected shape in the message, e.g. "[N, 3, H, W]"."""
    if image.dtype not in IMAGE_DTYPES:
        hint = " (a 16-bit image? scale it to 0..255 first: image.float() / 257)" if image.dtype == torch.uint16 else ""
        raise TypeError(f"image {layout} must be real RGB in 0..255 (uint8, a signed integer or "
                        f"float16/bfloat16/32/64), got {image.dtype}{hint}")


def warn_colours_in_0_to_1(stacklevel):
    """The UserWarning for an image whose colours all lie within 0..1 (and not all near 0)."""
    warnings.warn("the image's colours all lie within 0..1, but the CRF takes RGB in 0..255 (sigma_rgb is in "
                  "those units): an image in 0..1 (e.g. from ToTensor()) makes every colour alike and the "
                  "bilateral kernel merely spatial. Multiply it by 255 (or, for CRFRNNLayer, declare "
                  "image_mean/image_std).", stacklevel=stacklevel + 1)


def mean_field_args(unary, lattices, pairwise, num_iterations):
    """ValueError/TypeError unless unary is Tensor[N, P, C] of every lattice's (N, P), with one
    C x C matrix per lattice and an int T in 0..MAX_ITERATIONS (see iteration_count). (The fused
    ops check only N * P: a unary of another batch layout would mix images silently.)"""
    iteration_count(num_iterations)
    if not isinstance(unary, torch.Tensor) or unary.dim() != 3:
        got = tuple(unary.shape) if isinstance(unary, torch.Tensor) else type(unary).__name__
        raise ValueError(f"unary must be Tensor[N, P, C], got {got}")
    if not unary.is_floating_point():
        raise TypeError(f"unary must be a floating-point tensor, got {unary.dtype}")
    n, p, c = unary.shape
    if len(lattices) != len(pairwise):
        raise ValueError(f"one C x C matrix per lattice: got {len(lattices)} lattices and {len(pairwise)} matrices")
    if not lattices:
        raise ValueError("mean_field needs at least one lattice (a kernel): without one the iterations "
                         "are the unary's softmax")
    for i, (lat, mat) in enumerate(zip(lattices, pairwise)):
        if not callable(getattr(lat, "filter", None)):
            raise TypeError(f"lattice {i} must be a crfrnn.Lattice (or have a filter method), got {type(lat).__name__}")
        if getattr(lat, "per_pixel", False):
            raise ValueError(f"lattice {i} was built on per-pixel features [N, d, H, W]: mean_field takes lattices "
                             "of per-point features [N, P, d] (features.flatten(2).transpose(1, 2))")
        built_on = (getattr(lat, "batch_size", n), getattr(lat, "num_points", p))  # any object with filter()
        if built_on != (n, p):
            raise ValueError(f"unary is Tensor[N, P, C] with (N, P) = {(n, p)}, but lattice {i} was built on "
                             f"(N, P) = {built_on}")
        if tuple(mat.shape) != (c, c):
            raise ValueError(f"pairwise matrix {i} must be [C, C] = [{c}, {c}], got {tuple(mat.shape)}")


def _layout(unary_dim, points):
    """The name of a unary's layout in messages: [N, C, H, W] for an image, [N, C, *S] otherwise."""
    if points:
        return "[N, C, P]"
    return {3: "[N, C, L]", 4: "[N, C, H, W]", 5: "[N, C, D, H, W]"}.get(unary_dim, "[N, C, *S]")


def dense_layout(name, tensor):
    """TypeError for a sparse (or other non-strided) tensor, which the CRF does not read."""
    if tensor is not None and tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {tensor.layout}: convert it with "
                        ".to_dense() first")


def crf_inputs(unary, image, positions, num_classes, kernels):
    """Shape/dtype/device checks of a dense CRF's inputs, and the lattice size they need.

    Grid: unary Tensor[N, C, *S] (S of rank 1, 2 or 3), image Tensor[N, G, *S]. Points: unary
    Tensor[N, C, P], image Tensor[N, G, P], positions Tensor[N, D, P]. The image (the guide) may be
    None when no kernel is over it. Returns (number of position axes, guide channels or None).
    """
    from .kernels import check_sizes
    if not isinstance(unary, torch.Tensor):
        raise TypeError(f"unary must be a torch.Tensor of logits [N, C, *S], got {type(unary).__name__}")
    for name, t in (("image", image), ("positions", positions)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("unary", unary), ("image", image), ("positions", positions)):
        dense_layout(name, t)
    if not unary.is_floating_point():
        raise TypeError(f"unary must be floating point (logits), got {unary.dtype}")
    points = positions is not None
    layout = _layout(unary.dim(), points)
    if (points and unary.dim() != 3) or not 3 <= unary.dim() <= 5:
        raise ValueError(f"unary must be Tensor{layout} (a grid: [N, C, L], [N, C, H, W] or [N, C, D, H, W]; "
                         f"points: [N, C, P] with positions [N, D, P]), got shape {tuple(unary.shape)}")
    if num_classes is not None and unary.shape[1] != num_classes:
        raise ValueError(f"unary has {unary.shape[1]} channels but the layer was built for "
                         f"num_classes={num_classes} (unary shape {tuple(unary.shape)})")
    n, spatial = unary.shape[0], tuple(unary.shape[2:])
    if points:
        real = positions.dtype not in (torch.bool, torch.complex64, torch.complex128) and not positions.is_complex()
        if not real or positions.dim() != 3 or positions.shape[0] != n or positions.shape[2] != spatial[0] \
                or positions.shape[1] < 1:
            raise ValueError(f"positions must be a real Tensor[N, D, P] with unary [N, C, P] = {tuple(unary.shape)}'s "
                             f"N and P, got {positions.dtype} shape {tuple(positions.shape)}")
        if positions.device != unary.device:
            raise ValueError(f"positions are on {positions.device} but unary is on {unary.device}")
    num_axes = positions.shape[1] if points else len(spatial)
    guide_layout = "[N, G, P]" if points else layout.replace("C", "G")
    if image is not None:
        if image.dim() != unary.dim() or image.shape[0] != n or tuple(image.shape[2:]) != spatial:
            raise ValueError(f"image {tuple(image.shape)} and unary {tuple(unary.shape)} must share N, H and W: "
                             f"image Tensor{guide_layout} for unary Tensor{layout} (upsample the unary to the image "
                             "size first)")
        if image.device != unary.device:
            raise ValueError(f"image is on {image.device} but unary is on {unary.device}")
        image_dtype(image, "[N, 3, H, W]" if image.dim() == 4 and image.shape[1] == 3 else guide_layout)
        if image.shape[1] < 1:
            raise ValueError(f"image must have at least one channel, got shape {tuple(image.shape)}")
    check_sizes(kernels, num_axes, None if image is None else image.shape[1], f"unary {tuple(unary.shape)}")
    dims = {k.name: (num_axes if k.positions is not None else 0) + (image.shape[1] if k.guide is not None else 0)
            for k in kernels}
    for name, d in dims.items():
        if d > MAX_FEATURE_DIM:
            raise ValueError(f"kernel {name!r} would have {d} features (its positions and guide channels), more "
                             f"than a lattice takes ({MAX_FEATURE_DIM}): reduce the guide's channels first")
    # Before anything of the input's size is allocated: the largest lattice bounds the points.
    check_lattice_size(math.prod(unary.shape[:1] + unary.shape[2:]), max(dims.values()), f"unary {tuple(unary.shape)}")
    return num_axes, None if image is None else image.shape[1]


def layer_fits(device, normalised, unary, image):
    """ValueError/TypeError unless a layer whose parameters are on `device`, and which declared a
    normalised RGB image (`normalised`: image_mean/image_std given) or not, can take these inputs."""
    if device != unary.device:
        raise ValueError(f"the layer's parameters are on {device} but unary is on {unary.device}: move the layer "
                         f"with .to({str(unary.device)!r})")
    if normalised and image is not None:
        if image.shape[1] != 3:
            raise ValueError(f"image_mean/image_std declare a normalised RGB image, but the guide has {image.shape[1]} "
                             "channels: pass other guides as they are")
        if not image.is_floating_point():
            raise TypeError(f"image_mean/image_std were given, so image must be a normalised float tensor, got "
                            f"{image.dtype} (pass RGB 0..255 to a layer built without them)")


def check_parameters(params, pairwise=None):
    """ValueError naming the parameter (`params`: {name: Tensor}) that holds NaN/Inf values, else,
    given the `pairwise` matrices mu W_m, when one of them overflows; nothing when all is finite.
    (CRFRNNLayer's diagnosis of a failed call: see check_layer_values.)"""
    for name, p in params.items():
        count = int((~torch.isfinite(p.detach())).sum())
        if count:
            raise ValueError(f"CRFRNNLayer.{name} has {count} NaN/Inf values (of {p.numel()}): the "
                             "layer's parameters must be finite (a diverged training run or a damaged "
                             "checkpoint?)")
    if pairwise is not None and not all(bool(torch.isfinite(m.detach()).all()) for m in pairwise):
        largest = max(float(p.detach().abs().max()) for p in params.values())
        raise ValueError(f"the pairwise matrices compatibility @ weight overflow {pairwise[0].dtype} "
                         f"(largest |parameter| {largest:g}): the CRF parameters are too large")


def check_layer_values(params, unary, image, rgb, pairwise, out, normalised):
    """ValueError, most specific cause first, for: NaN/Inf in a parameter (`params`: {name:
    Tensor}) or in the unary, an RGB image outside 0..255 (unless `normalised`: the layer declared
    image_mean/image_std), pairwise matrices mu W_m or an output that overflow (finite but huge
    parameters or logits). A UserWarning for colours (`rgb`: the RGB image in 0..255 units,
    normalisation undone; None for another guide, or none) that look like another convention's:
    all in 0..1 (an image from
    ToTensor() given as 0..255), or far outside 0..255 once the declared normalisation is undone
    (an image not normalised that way). Called by CRFRNNLayer.forward (the warnings point at its
    caller's line).

    One device sync for all of them, after the work (errors are rare: a failing call wastes its
    work, a passing one waits once). The unary and the output are checked through their sums, a
    twentieth of the cost of an elementwise isfinite: a NaN/Inf anywhere makes the sum
    non-finite, and an overflowing sum of finite values is told apart afterwards. Under
    torch.compile the checks are exact and asynchronous (torch._assert_async: no graph break, no
    sync; the message then gives no counts).
    """
    unary, out = unary.detach(), out.detach()
    params = {name: p.detach() for name, p in params.items()}
    compiling = torch.compiler.is_compiling()

    def maybe_not_finite(t):  # exact when compiling; else may be a false alarm from overflow
        return ~torch.isfinite(t).all() if compiling else ~torch.isfinite(t.sum())

    checks = {f"parameter {name}": (~torch.isfinite(p).all(), f"CRFRNNLayer.{name} has NaN/Inf values")
              for name, p in params.items()}
    checks["unary"] = (maybe_not_finite(unary), "unary contains NaN/Inf values; the CRF needs finite logits")
    if rgb is not None and (normalised or image.dtype != torch.uint8):
        low, high = torch.aminmax(rgb.detach())
        if not normalised:
            checks["image"] = ((low < 0) | (high > 255), "image is outside 0..255 but no normalisation "
                               "was declared: pass RGB in 0..255, or build the layer with image_mean/image_std")
            checks["colours in 0..1"] = ((low >= 0) & (high > DARKEST_0_TO_1_MAX) & (high <= 1), None)
        else:  # de-normalised colours far outside 0..255: an image normalised otherwise, or not at all
            checks["colour range"] = ((low < -COLOUR_SLACK) | (high > 255 + COLOUR_SLACK), None)
    checks["pairwise"] = (~torch.isfinite(torch.stack([m.detach() for m in pairwise])).all(),
                          "the pairwise matrices compatibility @ weight overflow: the CRF parameters "
                          "are too large")
    checks["output"] = (maybe_not_finite(out), "the CRF output has NaN/Inf values: its parameters or "
                        "logits are too large for the arithmetic")
    flags = torch.stack([flag for flag, _ in checks.values()])
    if compiling:  # the errors only: warnings need the values
        for flag, (_, message) in zip(flags.unbind(), checks.values()):
            if message is not None:
                torch._assert_async(~flag, message)
        return
    raised = dict(zip(checks, flags.tolist()))  # the sync
    # (The messages are the same every call, so that Python's default filter shows each once;
    # stacklevel: at the line that called the layer, through forward and nn.Module.__call__.)
    if raised.pop("colours in 0..1", False):
        warn_colours_in_0_to_1(stacklevel=5)
    if raised.pop("colour range", False):
        warnings.warn(f"the image, with the declared image_mean/image_std undone, has colours more than "
                      f"{COLOUR_SLACK:g} outside 0..255: was it normalised as declared, "
                      "(rgb / 255 - image_mean) / image_std?", stacklevel=5)
    if not any(raised.values()):
        return
    # Something may be wrong: find what, exactly (slow is fine here).
    check_parameters(params)
    count = int((~torch.isfinite(unary)).sum()) if raised["unary"] else 0
    if count:
        raise ValueError(f"unary contains {count} NaN/Inf values (shape {tuple(unary.shape)}); "
                         "the CRF needs finite logits")
    if raised.get("image"):
        raise ValueError(f"image has values in [{low.item():g}, {high.item():g}] but no normalisation "
                         "was declared: pass RGB in 0..255, or build the layer with image_mean/image_std")
    if raised["pairwise"]:
        check_parameters(params, pairwise)
    largest = max(float(p.abs().max()) for p in params.values())
    count = int((~torch.isfinite(out)).sum()) if raised["output"] else 0
    if count:
        raise ValueError(f"the CRF output has {count} NaN/Inf values though the unary, image and "
                         f"parameters are finite: the parameters (largest |value| {largest:g}) or the "
                         f"logits (largest |value| {float(unary.abs().max()):g}) are too large for "
                         f"{out.dtype} arithmetic")
