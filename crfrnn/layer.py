"""`CRFRNNLayer`: a fully connected CRF as a trainable layer (CRF-as-RNN), the module over the
functional core in `crfrnn.inference`.

    crf = CRFRNNLayer(num_classes=21)                 # CRF-RNN's kernel parameters
    refined_logits = crf(unary_logits, image)         # image RGB in 0..255
"""
import math
import numbers

import torch
import torch.nn as nn

from . import checks, sharing
from .bandwidths import FixedBandwidths
from .lattice import FEATURE_GRADIENTS, NORMALIZATIONS
from .inference import CRFRNN_PARAMS, DEEPLAB_LARGEFOV_PARAMS, build_crf_lattices, mean_field

__all__ = ["CRFRNNLayer"]


class CRFRNNLayer(nn.Module):
    """Fully connected CRF (bilateral + spatial Gaussian kernels), mean field unrolled as an RNN.

    Args:
        num_classes (int): C.
        num_iterations (int): mean-field iterations in training mode (CRF-RNN: 5).
        num_eval_iterations (int or None): iterations in eval mode (CRF-RNN: 10); None = same as
            `num_iterations`.
        bilateral ((sigma_xy, sigma_rgb, weight)): appearance kernel; default CRF-RNN's
            (160, 3, 5). sigma_rgb refers to colours in 0..255.
        spatial ((sigma_xy, weight)): smoothness kernel; default (3, 3).
        image_mean, image_std (sequence of 3 floats or None): when given, `image` is taken as
            normalised from 0..1 RGB, (rgb/255 - mean)/std (torchvision's convention), and the
            layer undoes it. When None, `image` is RGB in 0..255 (uint8 or float).
        normalize (str): kernel normalisation, "symmetric" (densecrf's default; n K(n Q) with
            n = 1/sqrt(K 1)) or "after" (K Q / K 1, CRF-RNN's), or "none".
        checkpoint (bool): save only the inputs for the backward and run the forward again there.
        backend (str): lattice backend, "auto" | "reference" | "native".
        learn_bandwidths (bool): make the three bandwidths (sigma_xy and sigma_rgb of the
            bilateral kernel, sigma_xy of the spatial one) parameters, through their logarithms.
        compatibility (str): sharing of the compatibility matrix, one of
            crfrnn.COMPATIBILITY_SHARING: "potts" (fixed 1 - I), "symmetric" or "full" (default,
            CRF-RNN's).
        kernel_weights (str): sharing of each kernel's weight matrix, one of
            crfrnn.KERNEL_WEIGHT_SHARING: "scalar", "diagonal" or "full" (default, CRF-RNN's).
        bandwidth_grad (str): how learned bandwidths are differentiated: "gaussian" (default;
            the Gaussian's derivative formula evaluated with the lattice) or "lattice" (the
            lattice's own gradient; cheaper, but its colour-bandwidth derivative can have the
            wrong sign on real images: bench/bandwidth_gradient.py). See `Lattice`.
        fused, keep_marginals (bool): see `mean_field` (False: the step-by-step loop, the
            fused ops' oracle; keep the marginals for the backward on the CPU). How to run, not
            what to compute: `config()` leaves keep_marginals out (a setting of the process).

    Learnable parameters (initial values from `bilateral`/`spatial`): ``bilateral_weight`` and
    ``spatial_weight`` (W_m: Tensor[] for "scalar", Tensor[C] for "diagonal", Tensor[C, C] for
    "full", starting at w_m I), ``compatibility`` (mu, Potts start 1 - I: Tensor[C, C] for
    "full", its upper triangle Tensor[C (C + 1) / 2] for "symmetric", absent for "potts"), and
    with `learn_bandwidths` ``bilateral_log_sigma`` (Tensor[2]: log sigma_xy, log sigma_rgb)
    and ``spatial_log_sigma`` (Tensor[1]). `kernel_weight_matrices()` and
    `compatibility_matrix()` give the C x C matrices whatever the sharing. At the start the
    layer's softmax equals densecrf's mean-field marginals for the same unary (logits = minus
    densecrf's unary energy), image and parameters. No gradient flows into the image.

    The state dict holds everything that defines the computation: the parameters, and as
    buffers the bandwidths (when not learned), ``iterations`` (training, evaluation) and
    ``normalization``. Loading one carries them into the layer; one of another sharing or class
    count fails with a message that says so (a Potts one has no ``compatibility`` entry: a
    missing key, kept at the layer's own value with ``strict=False``).

    Speed: all iterations run in one fused op, and the backward in another, where `mean_field`
    says they apply; the layer keeps the last spatial lattice (see `_lattices`). Learned
    bandwidths cost about 2d + 1 filters more per kernel and iteration in backward ("gaussian";
    d = 5 and 2), about two with "lattice".

    Shapes:
        unary (Tensor[N, C, H, W]): logits (e.g. a DCNN's scores upsampled to the image).
        image (Tensor[N, 3, H, W]): RGB, see image_mean/image_std.
        returns (Tensor[N, C, H, W]): refined logits, float32 (float64 for a float64 unary;
        half-precision unaries and autocast regions are computed in float32).

    Example:
        >>> crf = CRFRNNLayer(21)
        >>> logits = crf(torch.randn(2, 21, 64, 48), torch.rand(2, 3, 64, 48) * 255)
        >>> logits.shape
        torch.Size([2, 21, 64, 48])
    """

    def __init__(self, num_classes, num_iterations=5, num_eval_iterations=10,
                 bilateral=CRFRNN_PARAMS["bilateral"], spatial=CRFRNN_PARAMS["spatial"],
                 image_mean=None, image_std=None, normalize="symmetric", checkpoint=False,
                 backend="auto", learn_bandwidths=False, compatibility="full", kernel_weights="full",
                 bandwidth_grad="gaussian", fused=True, keep_marginals=False):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = int(num_classes)  # numpy integers too
        self.backend = checks.choice("backend", backend, ("auto", "reference", "native"))
        self.compatibility_sharing = checks.choice("compatibility", compatibility, sharing.COMPATIBILITY_SHARING)
        self.kernel_weight_sharing = checks.choice("kernel_weights", kernel_weights, sharing.KERNEL_WEIGHT_SHARING)
        self.bandwidth_grad = checks.choice("bandwidth_grad", bandwidth_grad, FEATURE_GRADIENTS)
        bilateral, spatial = checks.kernel_parameters(bilateral, spatial)
        self.checkpoint, self.fused, self.keep_marginals = bool(checkpoint), bool(fused), bool(keep_marginals)
        self.learn_bandwidths = bool(learn_bandwidths)
        self._initial_weights = (bilateral[2], spatial[1])

        # What defines the computation travels in the state dict: iteration counts and the
        # normalisation as buffers (mirrored by plain attributes, see the properties), the
        # bandwidths as parameters or buffers (their logs: positive by construction).
        self.register_buffer("iterations", torch.zeros(2, dtype=torch.int64))
        self.register_buffer("normalization", torch.zeros((), dtype=torch.int64))
        self.num_iterations = num_iterations
        self.num_eval_iterations = num_iterations if num_eval_iterations is None else num_eval_iterations
        self.normalize = normalize
        for name, value in (("bilateral_log_sigma", bilateral[:2]), ("spatial_log_sigma", spatial[:1])):
            log_sigma = torch.tensor(value).log()
            if self.learn_bandwidths:
                setattr(self, name, nn.Parameter(log_sigma))
            else:
                self.register_buffer(name, log_sigma)
        self._bandwidths = FixedBandwidths((bilateral[:2], spatial[:1]))  # read when fixed: no sync per call
        self._bandwidths.follow(self._bandwidth_buffers())

        for name, weight in (("bilateral_weight", bilateral[2]), ("spatial_weight", spatial[1])):
            setattr(self, name, nn.Parameter(sharing.initial_kernel_weight(kernel_weights, weight, self.num_classes)))
        start = sharing.initial_compatibility(compatibility, self.num_classes)
        self.compatibility = None if start is None else nn.Parameter(start)

        if (image_mean is None) != (image_std is None):
            raise ValueError("give both image_mean and image_std (for normalised 0..1 images) or "
                             "neither (images in 0..255)")
        if image_mean is None:
            self.image_mean = self.image_std = None
        else:
            mean, std = checks.image_normalisation(image_mean, image_std)
            self.register_buffer("image_mean", mean.view(1, 3, 1, 1), persistent=False)
            self.register_buffer("image_std", std.view(1, 3, 1, 1), persistent=False)
        self._last_spatial = None  # (key, Lattice): the last spatial lattice, reused while the key holds

    @classmethod
    def deeplab_largefov(cls, num_classes=21, **kwargs):
        """DeepLab-LargeFOV's CRF: w1 4, sigma_alpha 121, sigma_beta 5, w2 3, sigma_gamma 3,
        10 iterations (training and evaluation unless overridden)."""
        kwargs = {"num_iterations": 10, "num_eval_iterations": 10, **kwargs}
        return cls(num_classes, **DEEPLAB_LARGEFOV_PARAMS, **kwargs)

    @classmethod
    def crfasrnn(cls, num_classes=21, **kwargs):
        """CRF-RNN's: w1 5, sigma_alpha 160, sigma_beta 3, w2 3, sigma_gamma 3; 5 iterations in
        training, 10 in evaluation."""
        kwargs = {"num_iterations": 5, "num_eval_iterations": 10, **kwargs}
        return cls(num_classes, **CRFRNN_PARAMS, **kwargs)

    # -- what the state dict carries, as plain attributes ----------------------------------------
    @property
    def num_iterations(self):
        """Mean-field iterations in training mode (kept in the ``iterations`` buffer)."""
        return self._iterations[0]

    @num_iterations.setter
    def num_iterations(self, value):
        self._set_iterations(value, 0)

    @property
    def num_eval_iterations(self):
        """Mean-field iterations in eval mode (kept in the ``iterations`` buffer)."""
        return self._iterations[1]

    @num_eval_iterations.setter
    def num_eval_iterations(self, value):
        self._set_iterations(value, 1)

    def _set_iterations(self, value, slot):
        counts = list(getattr(self, "_iterations", (0, 0)))
        counts[slot] = checks.iteration_count(value, ("num_iterations", "num_eval_iterations")[slot])
        self._iterations = tuple(counts)
        with torch.no_grad():
            self.iterations.fill_(0).add_(torch.tensor(counts, dtype=torch.int64))

    @property
    def normalize(self):
        """Kernel normalisation (kept in the ``normalization`` buffer as its index in NORMALIZATIONS)."""
        return self._normalize

    @normalize.setter
    def normalize(self, value):
        self._normalize = checks.choice("normalize", value, NORMALIZATIONS)
        with torch.no_grad():
            self.normalization.fill_(NORMALIZATIONS.index(value))

    def _bandwidth_buffers(self):
        return (self.bilateral_log_sigma, self.spatial_log_sigma)

    def sigmas(self):
        """Current bandwidths as floats: ((bilateral sigma_xy, sigma_rgb), (spatial sigma_xy,))."""
        if not self.learn_bandwidths:
            # (no Python-side state inside a traced graph)
            if not torch.compiler.is_compiling() and self._bandwidths.follow(self._bandwidth_buffers()):
                self.clear_lattice_cache()
            return self._bandwidths.sigmas
        # math.exp, as FixedBandwidths uses: torch's exp may differ from it in the last bit on
        # some CPUs, and a fixed layer loaded from this one must report the same floats.
        return tuple(tuple(math.exp(v) for v in logs.detach().double().cpu().tolist())
                     for logs in self._bandwidth_buffers())

    @property
    def bilateral(self):
        """(sigma_xy, sigma_rgb, initial weight w1): the current bandwidths, as floats."""
        return (*self.sigmas()[0], self._initial_weights[0])

    @property
    def spatial(self):
        """(sigma_xy, initial weight w2): the current bandwidth, as a float."""
        return (*self.sigmas()[1], self._initial_weights[1])

    @torch.no_grad()
    def scale_spatial_bandwidths(self, factor):
        """Multiply the spatial bandwidths (sigma_xy of both kernels) by `factor`: for images
        `factor` times larger (or smaller, factor < 1) than the ones the bandwidths were set or
        learned for. The colour bandwidth and the weights do not depend on the resolution.

        Example: a layer learned on images shrunk by 2, used at full size:
        ``crf.scale_spatial_bandwidths(2.0)``.
        """
        factor = checks.positive("factor", factor)
        if self.learn_bandwidths:
            self.bilateral_log_sigma[0] += math.log(factor)
            self.spatial_log_sigma[0] += math.log(factor)
        else:  # the floats stay exact (121 * 0.5 is 60.5, not exp(log(121) + log(0.5)))
            (bxy, brgb), (sxy,) = self.sigmas()
            self._bandwidths.set(((bxy * factor, brgb), (sxy * factor,)), self._bandwidth_buffers())
        self.clear_lattice_cache()
        return self

    def freeze_classes(self, classes):
        """Keep the matrix entries that involve any of `classes` (ints in [0, C)) at their
        present values while the rest learns: their gradients are zeroed (a hook on the
        compatibility and kernel-weight parameters; shared values such as "scalar" weights,
        which belong to every class, still learn). For classes the training data never shows:
        with no evidence about them, learning could only move them by their interactions with
        other classes, which over-fits (they keep their start instead). An optimiser with
        weight decay still moves the frozen entries. Calling it again replaces the classes;
        ``freeze_classes([])`` frees them all. The hooks belong to this layer: a copy
        (``copy.deepcopy``, pickling) learns every class. Returns self.
        """
        frozen = torch.zeros(self.num_classes, dtype=torch.bool)
        frozen[checks.class_indices("freeze_classes", classes, self.num_classes)] = True
        for handle in getattr(self, "_freeze_hooks", []):
            handle.remove()
        self._freeze_hooks = []
        learns = (~frozen)[:, None] & (~frozen)[None, :]  # entry (a, b): neither class frozen
        for name, _, kind, _ in self._matrix_parameters():
            mask = sharing.sharing_entries(learns, kind)
            if mask is not None and not bool(mask.all()):
                hook = getattr(self, name).register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype))
                self._freeze_hooks.append(hook)
        return self

    def _matrix_parameters(self):
        """(name, constructor option, its value, the option's choices) of each parameter that
        holds C x C matrix entries."""
        return (("bilateral_weight", "kernel_weights", self.kernel_weight_sharing, sharing.KERNEL_WEIGHT_SHARING),
                ("spatial_weight", "kernel_weights", self.kernel_weight_sharing, sharing.KERNEL_WEIGHT_SHARING),
                ("compatibility", "compatibility", self.compatibility_sharing, sharing.COMPATIBILITY_SHARING))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints written before the bandwidths, iterations and normalisation were in the
        # state dict: the layer keeps its own (the ones it was built with from the checkpoint's
        # config).
        for name in ("bilateral_log_sigma", "spatial_log_sigma", "iterations", "normalization"):
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        problem = sharing.mismatch(state_dict, prefix, self._matrix_parameters(), self.num_classes)
        stored = state_dict[prefix + "iterations"]
        if not problem and isinstance(stored, torch.Tensor) and (stored.is_floating_point() or stored.is_complex()):
            problem = (f"{prefix}iterations holds {stored.dtype} values {stored.tolist()}: expected integer "
                       "counts (a damaged file?)")
        if problem:
            error_msgs.append(problem)
            return

        def load():
            super(CRFRNNLayer, self)._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                           missing_keys, unexpected_keys, error_msgs)
        if self.learn_bandwidths:
            load()
        else:  # other bandwidths than this layer's: take the state dict's
            self._bandwidths.load(self._bandwidth_buffers(), load)
        counts = [int(v) for v in self.iterations.tolist()]
        norm = int(self.normalization)
        if not all(0 <= n <= checks.MAX_ITERATIONS for n in counts) or not 0 <= norm < len(NORMALIZATIONS):
            error_msgs.append(f"{prefix}iterations {counts} / normalization {norm}: expected counts in "
                              f"0..{checks.MAX_ITERATIONS} and an index into {NORMALIZATIONS}")
            return
        self._iterations = tuple(counts)
        self._normalize = NORMALIZATIONS[norm]
        self.clear_lattice_cache()

    def config(self):
        """Constructor arguments (plain Python values) that rebuild this layer:
        ``CRFRNNLayer(**crf.config())``; the learned parameters are in ``state_dict()``."""
        def plain(t):
            return None if t is None else [float(v) for v in t.flatten().tolist()]
        return {"num_classes": self.num_classes, "num_iterations": self.num_iterations,
                "num_eval_iterations": self.num_eval_iterations, "bilateral": list(self.bilateral),
                "spatial": list(self.spatial), "image_mean": plain(self.image_mean),
                "image_std": plain(self.image_std), "normalize": self.normalize,
                "checkpoint": self.checkpoint, "backend": self.backend,
                "learn_bandwidths": self.learn_bandwidths, "compatibility": self.compatibility_sharing,
                "kernel_weights": self.kernel_weight_sharing, "bandwidth_grad": self.bandwidth_grad,
                "fused": self.fused}

    def extra_repr(self):
        (bxy, brgb), (sxy,) = self.sigmas()
        s = (f"num_classes={self.num_classes}, num_iterations={self.num_iterations}, "
             f"num_eval_iterations={self.num_eval_iterations}, sigmas: bilateral=({bxy:.4g}, {brgb:.4g}), "
             f"spatial={sxy:.4g}, normalize={self.normalize!r}, compatibility={self.compatibility_sharing!r}, "
             f"kernel_weights={self.kernel_weight_sharing!r}")
        if self.learn_bandwidths:
            s += f", learn_bandwidths=True, bandwidth_grad={self.bandwidth_grad!r}"
        if self.image_mean is not None:
            s += f", image_mean={self.image_mean.flatten().tolist()}, image_std={self.image_std.flatten().tolist()}"
        return s + (", checkpoint=True" if self.checkpoint else "") + ("" if self.fused else ", fused=False")

    def __getstate__(self):
        # Pickling (torch.save of a whole model, copy.deepcopy) leaves the kept spatial lattice
        # out: it is a cache of about 50 bytes per pixel that the next forward rebuilds.
        state = super().__getstate__()  # a copy of __dict__
        state["_last_spatial"] = None
        state.pop("_freeze_hooks", None)  # the copy's parameters carry no hooks
        return state

    def __setstate__(self, state):
        # Layers pickled before these settings existed ran fused, recomputing the marginals, and
        # kept their fixed bandwidths' floats in `_fixed_sigmas`.
        state = {"fused": True, "keep_marginals": False, **state}
        if "_bandwidths" not in state:
            logs = [state["_buffers"].get(name, state["_parameters"].get(name))
                    for name in ("bilateral_log_sigma", "spatial_log_sigma")]
            fallback = [[math.exp(v) for v in log.double().tolist()] for log in logs]
            state["_bandwidths"] = FixedBandwidths(state.pop("_fixed_sigmas", fallback))
            state.pop("_bandwidths_seen", None)
        super().__setstate__(state)

    # -- the C x C matrices ----------------------------------------------------------------------
    def kernel_weight_matrices(self, dtype=torch.float32):
        """[W_bilateral, W_spatial]: each kernel's C x C weight matrix, whatever the sharing."""
        return [sharing.kernel_weight_matrix(w.to(dtype), self.kernel_weight_sharing, self.num_classes)
                for w in (self.bilateral_weight, self.spatial_weight)]

    def compatibility_matrix(self, dtype=torch.float32):
        """mu: the C x C compatibility matrix, whatever the sharing."""
        param = None if self.compatibility is None else self.compatibility.to(dtype)
        return sharing.compatibility_matrix(param, self.compatibility_sharing, self.num_classes, dtype,
                                            self.bilateral_weight.device)

    def pairwise_matrices(self, dtype=torch.float32):
        """[mu W_bilateral, mu W_spatial]: the C x C matrices applied to each kernel's message."""
        mu = self.compatibility_matrix(dtype)
        return [mu @ w for w in self.kernel_weight_matrices(dtype)]

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, unary, image, num_iterations=None):
        """Refine `unary` (Tensor[N, C, H, W] logits) with the CRF on `image` (Tensor[N, 3, H, W]).

        num_iterations (int or None) overrides the mode's iteration count for this call.
        Returns Tensor[N, C, H, W] logits. Raises ValueError for NaN/Inf in the unary or the
        parameters, an image outside 0..255 (when no image_mean/image_std were given), and a
        non-finite output (parameters or logits too large for the arithmetic); see
        `crfrnn.checks.check_layer_values`. Meta tensors give a meta result of the right shape
        and dtype.
        """
        checks.unary_and_image(unary, image, self.num_classes)
        if self.bilateral_weight.device != unary.device:
            raise ValueError(f"the layer's parameters are on {self.bilateral_weight.device} but unary is on "
                             f"{unary.device}: move the layer with .to({str(unary.device)!r})")
        if self.image_mean is not None and not image.is_floating_point():
            raise TypeError(f"image_mean/image_std were given, so image must be a normalised float tensor, "
                            f"got {image.dtype} (pass RGB 0..255 to a layer built without them)")
        if num_iterations is None:
            num_iterations = self.num_iterations if self.training else self.num_eval_iterations
        num_iterations = checks.iteration_count(num_iterations)
        dtype = torch.float64 if unary.dtype == torch.float64 else torch.float32
        n, c, h, w = unary.shape
        if unary.numel() == 0:
            return unary.to(dtype).clone()
        if unary.device.type == "meta":  # shapes only (model summaries, FLOP counters)
            return torch.empty((n, c, h, w), dtype=dtype, device="meta")
        with torch.autocast(device_type=unary.device.type, enabled=False):
            rgb = self.rgb255(image.detach())  # no gradient into the image
            lattices = self._lattices(rgb)
            pairwise = self.pairwise_matrices(dtype)
            # [N, P, C], a view of the channels-first memory: the fused op reads and writes that
            # layout directly (the loop makes it contiguous).
            u = unary.to(dtype).flatten(2).transpose(1, 2)
            logits = mean_field(u, lattices, pairwise, num_iterations, self.normalize, self.checkpoint,
                                fused=self.fused, keep_marginals=self.keep_marginals)
            out = logits.transpose(1, 2).reshape(n, c, h, w)
        checks.check_layer_values(dict(self.named_parameters()), unary, image, rgb, pairwise, out,
                                  normalised=self.image_mean is not None)
        return out

    def rgb255(self, image):
        """Tensor[N, 3, H, W] as float RGB in 0..255 (undoing the declared normalisation)."""
        dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        image = image.to(dtype)
        if self.image_mean is not None:
            image = (image * self.image_std.to(dtype) + self.image_mean.to(dtype)) * 255.0
        return image

    def _lattices(self, rgb):
        """(bilateral, spatial) lattices of `rgb` (Tensor[N, 3, H, W], float, 0..255); a
        ValueError naming the bandwidths when the features are ones the lattice rejects.

        The spatial lattice depends on the image shape only, so the last one (with its
        normalisation) is kept and reused while N, H, W, dtype, device, sigma_xy and backend
        stay the same: at a fixed training crop or image size every forward after the first
        skips its build. It holds about 50 bytes per pixel; `clear_lattice_cache()` frees it.
        With learned bandwidths and grad mode on, both lattices are built differentiable in
        them, every call.
        """
        try:
            if self.learn_bandwidths and torch.is_grad_enabled():
                bil = self.bilateral_log_sigma.to(rgb.dtype).exp()
                spa = self.spatial_log_sigma.to(rgb.dtype).exp()
                return build_crf_lattices(rgb, (bil[0], bil[1]), (spa[0],), self.backend,
                                          feature_grad=self.bandwidth_grad)
            bilateral, spatial = self.sigmas()
            key = (tuple(rgb.shape), rgb.dtype, rgb.device, float(spatial[0]), self.backend)
            compiling = torch.compiler.is_compiling()  # no Python-side state inside a traced graph
            last = None if compiling else getattr(self, "_last_spatial", None)  # (absent on old pickles)
            reuse = last[1] if last is not None and last[0] == key else None
            lattices = build_crf_lattices(rgb, bilateral, spatial, self.backend, spatial_lattice=reuse)
            if not compiling:
                self._last_spatial = (key, lattices[1])
            return lattices
        except ValueError as exc:  # NaN/Inf or huge values: features the lattice rejects
            for name in ("bilateral_log_sigma", "spatial_log_sigma"):  # a diverged bandwidth, not the image
                if not bool(torch.isfinite(getattr(self, name)).all()):
                    raise ValueError(f"CRFRNNLayer.{name} has NaN/Inf values: the layer's bandwidths must "
                                     "be finite (a diverged training run or a damaged checkpoint?)") from exc
            (bxy, brgb), (sxy,) = self.sigmas()
            raise ValueError(f"image gives bilateral features (colours / sigma_rgb) the lattice rejects: {exc} "
                             f"(bandwidths: bilateral sigma_xy, sigma_rgb = {bxy:.4g}, {brgb:.4g}; spatial "
                             f"{sxy:.4g})") from exc

    def clear_lattice_cache(self):
        """Forget the kept spatial lattice (see `_lattices`); the next forward builds it again."""
        self._last_spatial = None
