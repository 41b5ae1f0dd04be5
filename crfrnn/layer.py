"""`CRFRNNLayer`: a fully connected CRF as a trainable layer (CRF-as-RNN), the module over the
functional core in `crfrnn.inference`.

    crf = CRFRNNLayer(num_classes=21)                 # CRF-RNN's kernel parameters
    refined_logits = crf(unary_logits, image)         # image RGB in 0..255
    crf = CRFRNNLayer(2, kernels=[GaussianKernel(5.0, positions=(1.0, 3.0, 3.0), guide=20.0)])
    refined = crf(unary, scan)                        # a volume: [N, C, D, H, W], scan [N, G, D, H, W]
    refined = crf(unary, colours, positions=xyz)      # points: [N, C, P], [N, G, P], [N, D, P]
"""
import math
import numbers

import torch
import torch.nn as nn

from . import checks, persistence, sharing
from .bandwidths import FixedBandwidths
from .inference import CRFRNN_PARAMS, DEEPLAB_LARGEFOV_PARAMS, DEFAULT_PRUNE, kernel_lattices, mean_field
from .kernels import as_kernels, classic_kernels, describe_bandwidths
from .lattice import FEATURE_GRADIENTS, NORMALIZATIONS

__all__ = ["CRFRNNLayer"]


class CRFRNNLayer(nn.Module):
    """Fully connected CRF (Gaussian kernels over positions and a guide), mean field unrolled as
    an RNN, on images, volumes, signals and point sets.

    Args:
        num_classes (int): C.
        num_iterations (int): mean-field iterations in training mode (CRF-RNN: 5).
        num_eval_iterations (int or None): iterations in eval mode (CRF-RNN: 10); None = same as
            `num_iterations`.
        bilateral ((sigma_xy, sigma_rgb, weight)): appearance kernel; default CRF-RNN's
            (160, 3, 5). sigma_rgb refers to colours in 0..255.
        spatial ((sigma_xy, weight)): smoothness kernel; default (3, 3).
        kernels (sequence of GaussianKernel or None): any Gaussian kernels instead of the
            (bilateral, spatial) pair, each over the positions, the guide or both, with its own
            bandwidths (one for every axis or channel, or one each) and weight; see
            `crfrnn.GaussianKernel`. The pair is ``[GaussianKernel(w1, positions=sxy,
            guide=srgb), GaussianKernel(w2, positions=sxy)]``, named "bilateral" and "spatial".
        image_mean, image_std (sequence of 3 floats or None): when given, an RGB `image` is taken
            as normalised from 0..1 RGB, (rgb/255 - mean)/std (torchvision's convention), and the
            layer undoes it. When None, an RGB image (3 channels on a 2-D grid) is in 0..255
            (uint8 or float). Other guides (other channel counts; volumes, signals, point sets)
            are used as they are: their bandwidths are in their own units.
        normalize (str): kernel normalisation, "symmetric" (densecrf's default; n K(n Q) with
            n = 1/sqrt(K 1)) or "after" (K Q / K 1, CRF-RNN's), or "none".
        checkpoint (bool): save only the inputs for the backward and run the forward again there.
        backend (str): lattice backend, "auto" | "reference" | "native".
        learn_bandwidths (bool): make every kernel's bandwidths parameters, through their logs.
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
            fused ops' oracle; False: recompute the marginals in the backward instead of keeping
            them, less memory for more time). How to run, not what to compute: `config()` leaves
            keep_marginals out (a setting of the process).
        prune, eval_prune (float): sender pruning's epsilon in training and in eval mode (see
            `mean_field`): in each iteration a class whose Q stays below it at every point of an
            image sends no message there (every class still receives). eval_prune defaults to
            crfrnn.DEFAULT_PRUNE, measured to leave the labels as they are (bench/classes.py);
            training defaults to the exact iterations (0). Gradients are the computed
            function's: a class absent from the unary still gets its gradient through the unary
            and as a receiver.

    Learnable parameters (initial values from the kernels): per kernel ``{name}_weight`` (W_m:
    Tensor[] for "scalar", Tensor[C] for "diagonal", Tensor[C, C] for "full", starting at w_m I;
    ``bilateral_weight`` and ``spatial_weight`` for the pair), ``compatibility`` (mu, Potts start
    1 - I: Tensor[C, C] for "full", its upper triangle Tensor[C (C + 1) / 2] for "symmetric",
    absent for "potts"), and with `learn_bandwidths` per kernel ``{name}_log_sigma`` (the logs of
    its bandwidths, the positions' first: Tensor[2] log sigma_xy, log sigma_rgb for
    ``bilateral_log_sigma``). `kernel_weight_matrices()` and
    `compatibility_matrix()` give the C x C matrices whatever the sharing. At the start the
    layer's softmax equals densecrf's mean-field marginals for the same unary (logits = minus
    densecrf's unary energy), image and parameters. No gradient flows into the image or the
    positions (they are detached).

    The state dict holds everything that defines the computation: the parameters, and as
    buffers the bandwidths (when not learned), ``iterations`` (training, evaluation) and
    ``normalization``. Loading one carries them into the layer; one of another sharing or class
    count fails with a message that says so (a Potts one has no ``compatibility`` entry: a
    missing key, kept at the layer's own value with ``strict=False``).

    Speed: all iterations run in one fused op, and the backward in another, where `mean_field`
    says they apply; lattices of positions alone are kept between calls (see `_lattices`).
    Learned bandwidths cost about 2d + 1 filters more per kernel and iteration in backward
    ("gaussian"; d = 5 and 2 for the pair), about two with "lattice".

    Shapes: see `forward` (a grid [N, C, *S] of rank 1, 2 or 3, or points [N, C, P]); the result
    is float32 (float64 for a float64 unary; half precision is computed in float32).

    Example:
        >>> crf = CRFRNNLayer(21)
        >>> logits = crf(torch.randn(2, 21, 64, 48), torch.rand(2, 3, 64, 48) * 255)
        >>> logits.shape
        torch.Size([2, 21, 64, 48])
    """

    def __init__(self, num_classes, num_iterations=5, num_eval_iterations=10, bilateral=None, spatial=None,
                 image_mean=None, image_std=None, normalize="symmetric", checkpoint=False,
                 backend="auto", learn_bandwidths=False, compatibility="full", kernel_weights="full",
                 bandwidth_grad="gaussian", fused=True, keep_marginals=True, kernels=None, prune=0.0,
                 eval_prune=DEFAULT_PRUNE):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = int(num_classes)  # numpy integers too
        self.backend = checks.choice("backend", backend, ("auto", "reference", "native"))
        self.compatibility_sharing = checks.choice("compatibility", compatibility, sharing.COMPATIBILITY_SHARING)
        self.kernel_weight_sharing = checks.choice("kernel_weights", kernel_weights, sharing.KERNEL_WEIGHT_SHARING)
        self.bandwidth_grad = checks.choice("bandwidth_grad", bandwidth_grad, FEATURE_GRADIENTS)
        if kernels is None:
            kernels = classic_kernels(CRFRNN_PARAMS["bilateral"] if bilateral is None else bilateral,
                                      CRFRNN_PARAMS["spatial"] if spatial is None else spatial)
        elif bilateral is not None or spatial is not None:
            raise ValueError("give the kernels either as kernels= or as bilateral=/spatial=, not both")
        self.kernels = tuple(as_kernels(kernels))  # as built: names, initial weights and bandwidths
        self.checkpoint, self.fused, self.keep_marginals = bool(checkpoint), bool(fused), bool(keep_marginals)
        self.learn_bandwidths = bool(learn_bandwidths)
        self.prune = checks.prune_threshold(prune, "prune")
        self.eval_prune = checks.prune_threshold(eval_prune, "eval_prune")

        # What defines the computation travels in the state dict: iteration counts and the
        # normalisation as buffers (mirrored by plain attributes, see the properties), the
        # bandwidths as parameters or buffers (their logs: positive by construction).
        self.register_buffer("iterations", torch.zeros(2, dtype=torch.int64))
        self.register_buffer("normalization", torch.zeros((), dtype=torch.int64))
        self.num_iterations = num_iterations
        self.num_eval_iterations = num_iterations if num_eval_iterations is None else num_eval_iterations
        self.normalize = normalize
        for kernel in self.kernels:
            log_sigma = torch.tensor(kernel.sigmas).log()
            if self.learn_bandwidths:
                setattr(self, f"{kernel.name}_log_sigma", nn.Parameter(log_sigma))
            else:
                self.register_buffer(f"{kernel.name}_log_sigma", log_sigma)
        self._bandwidths = FixedBandwidths([k.sigmas for k in self.kernels])  # read when fixed: no sync per call
        self._bandwidths.follow(self._bandwidth_buffers())

        for kernel in self.kernels:
            weight = sharing.initial_kernel_weight(kernel_weights, kernel.weight, self.num_classes)
            if abs(kernel.weight) > torch.finfo(weight.dtype).max:
                raise ValueError(f"kernel {kernel.name!r}'s weight {kernel.weight:g} overflows {weight.dtype}, the "
                                 "dtype of the layer's parameters")
            setattr(self, f"{kernel.name}_weight", nn.Parameter(weight))
        start = sharing.initial_compatibility(compatibility, self.num_classes)
        self.compatibility = None if start is None else nn.Parameter(start)

        mean, std = checks.image_normalisation(image_mean, image_std)
        if mean is None:
            self.image_mean = self.image_std = None
        else:
            self.register_buffer("image_mean", mean.view(1, 3, 1, 1), persistent=False)
            self.register_buffer("image_std", std.view(1, 3, 1, 1), persistent=False)
        self._kept = {}  # kernel name -> (key, Lattice): lattices of the shape alone, reused while the key holds

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
        return [getattr(self, f"{kernel.name}_log_sigma") for kernel in self.kernels]

    def sigmas(self):
        """Current bandwidths as floats, a tuple per kernel in the order of `kernel.sigmas`: for the
        pair ((bilateral sigma_xy, sigma_rgb), (spatial sigma_xy,))."""
        if not self.learn_bandwidths:
            # (no Python-side state inside a traced graph)
            if not torch.compiler.is_compiling() and self._bandwidths.follow(self._bandwidth_buffers()):
                self.clear_lattice_cache()
            return self._bandwidths.sigmas
        # math.exp, as FixedBandwidths uses: torch's exp may differ from it in the last bit on
        # some CPUs, and a fixed layer loaded from this one must report the same floats.
        return tuple(tuple(math.exp(v) for v in logs.detach().double().cpu().tolist())
                     for logs in self._bandwidth_buffers())

    def kernel_bandwidths(self):
        """The kernels with their current bandwidths (and initial weights): [GaussianKernel]."""
        return [kernel.with_sigmas(sigmas) for kernel, sigmas in zip(self.kernels, self.sigmas())]

    def _kernel_tuple(self, name):
        for kernel, sigmas in zip(self.kernels, self.sigmas()):
            if kernel.name == name:
                return (*sigmas, kernel.weight)
        raise AttributeError(f"this layer has no kernel named {name!r}: its kernels are "
                             f"{[k.name for k in self.kernels]} (see kernel_bandwidths())")

    @property
    def bilateral(self):
        """(sigma_xy, sigma_rgb, initial weight w1) of the kernel named "bilateral", as floats."""
        return self._kernel_tuple("bilateral")

    @property
    def spatial(self):
        """(sigma_xy, initial weight w2) of the kernel named "spatial", as floats."""
        return self._kernel_tuple("spatial")

    @torch.no_grad()
    def scale_spatial_bandwidths(self, factor):
        """Multiply every position bandwidth (sigma_xy of both kernels of the pair) by `factor`:
        for inputs `factor` times larger (or smaller, factor < 1) than the ones the bandwidths
        were set or learned for. The guide's bandwidths and the weights do not depend on the
        resolution.

        Example: a layer learned on images shrunk by 2, used at full size:
        ``crf.scale_spatial_bandwidths(2.0)``.
        """
        factor = checks.positive("factor", factor)
        counts = [len(kernel.positions or ()) for kernel in self.kernels]
        if self.learn_bandwidths:
            for log_sigma, count in zip(self._bandwidth_buffers(), counts):
                log_sigma[:count] += math.log(factor)
        else:  # the floats stay exact (121 * 0.5 is 60.5, not exp(log(121) + log(0.5)))
            sigmas = [tuple(s * factor if i < count else s for i, s in enumerate(group))
                      for group, count in zip(self.sigmas(), counts)]
            self._bandwidths.set(sigmas, self._bandwidth_buffers())
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
        return (*((f"{k.name}_weight", "kernel_weights", self.kernel_weight_sharing, sharing.KERNEL_WEIGHT_SHARING)
                  for k in self.kernels),
                ("compatibility", "compatibility", self.compatibility_sharing, sharing.COMPATIBILITY_SHARING))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints written before the bandwidths, iterations and normalisation were in the
        # state dict: the layer keeps its own (the ones it was built with from the checkpoint's config).
        for name in (*(f"{k.name}_log_sigma" for k in self.kernels), "iterations", "normalization"):
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        problem = persistence.state_dict_problem(state_dict, prefix, self._matrix_parameters(), self.num_classes)
        if problem:
            error_msgs.append(problem)
            return

        def load():
            super(CRFRNNLayer, self)._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                           missing_keys, unexpected_keys, error_msgs)
        if self.learn_bandwidths:
            load()
        else:  # other bandwidths than this layer's: take the state dict's, keep the exact floats of the same
            self._bandwidths.load(self._bandwidth_buffers(), load)
        settings = persistence.loaded_settings(self.iterations, self.normalization, prefix)
        if isinstance(settings, str):
            error_msgs.append(settings)
            return
        self._iterations, self._normalize = settings
        self.clear_lattice_cache()

    def config(self):
        """Constructor arguments (plain Python values) that rebuild this layer:
        ``CRFRNNLayer(**crf.config())``; the learned parameters are in ``state_dict()``."""
        def plain(t):
            return None if t is None else [float(v) for v in t.flatten().tolist()]
        if self._is_classic_pair():
            kernels = {"bilateral": list(self.bilateral), "spatial": list(self.spatial)}
        else:
            kernels = {"kernels": [kernel.config() for kernel in self.kernel_bandwidths()]}
        return {"num_classes": self.num_classes, "num_iterations": self.num_iterations,
                "num_eval_iterations": self.num_eval_iterations, **kernels, "image_mean": plain(self.image_mean),
                "image_std": plain(self.image_std), "normalize": self.normalize,
                "checkpoint": self.checkpoint, "backend": self.backend,
                "learn_bandwidths": self.learn_bandwidths, "compatibility": self.compatibility_sharing,
                "kernel_weights": self.kernel_weight_sharing, "bandwidth_grad": self.bandwidth_grad,
                "fused": self.fused, "prune": self.prune, "eval_prune": self.eval_prune}

    def _is_classic_pair(self):
        """Whether the kernels are the (bilateral, spatial) pair that bilateral=/spatial= make."""
        return [(k.name, len(k.positions or ()), len(k.guide or ())) for k in self.kernels] == \
            [("bilateral", 1, 1), ("spatial", 1, 0)]

    def extra_repr(self):
        s = (f"num_classes={self.num_classes}, num_iterations={self.num_iterations}, "
             f"num_eval_iterations={self.num_eval_iterations}, "
             f"sigmas: {describe_bandwidths(self.kernels, self.sigmas(), '=')}, "
             f"normalize={self.normalize!r}, compatibility={self.compatibility_sharing!r}, "
             f"kernel_weights={self.kernel_weight_sharing!r}")
        if self.learn_bandwidths:
            s += f", learn_bandwidths=True, bandwidth_grad={self.bandwidth_grad!r}"
        if self.image_mean is not None:
            s += f", image_mean={self.image_mean.flatten().tolist()}, image_std={self.image_std.flatten().tolist()}"
        if self.prune or self.eval_prune != DEFAULT_PRUNE:
            s += f", prune={self.prune:g}, eval_prune={self.eval_prune:g}"
        return s + (", checkpoint=True" if self.checkpoint else "") + ("" if self.fused else ", fused=False")

    def __getstate__(self):
        # Pickling (torch.save of a whole model, copy.deepcopy) leaves the kept spatial lattice
        # out: it is a cache of about 50 bytes per pixel that the next forward rebuilds.
        state = super().__getstate__()  # a copy of __dict__
        state["_kept"] = {}
        state.pop("_freeze_hooks", None)  # the copy's parameters carry no hooks
        return state

    def __setstate__(self, state):
        super().__setstate__(persistence.upgrade_pickled_state(state))

    # -- the C x C matrices ----------------------------------------------------------------------
    def kernel_weight_matrices(self, dtype=torch.float32):
        """[W_m]: each kernel's C x C weight matrix, whatever the sharing ([W_bilateral, W_spatial]
        for the pair)."""
        return [sharing.kernel_weight_matrix(getattr(self, f"{k.name}_weight").to(dtype), self.kernel_weight_sharing,
                                             self.num_classes) for k in self.kernels]

    def compatibility_matrix(self, dtype=torch.float32):
        """mu: the C x C compatibility matrix, whatever the sharing."""
        param = None if self.compatibility is None else self.compatibility.to(dtype)
        return sharing.compatibility_matrix(param, self.compatibility_sharing, self.num_classes, dtype,
                                            self.iterations.device)

    def pairwise_matrices(self, dtype=torch.float32):
        """[mu W_m]: the C x C matrices applied to each kernel's message."""
        mu = self.compatibility_matrix(dtype)
        return [mu @ w for w in self.kernel_weight_matrices(dtype)]

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, unary, image=None, num_iterations=None, positions=None):
        """Refine `unary` with the CRF on `image` (the guide) and, for a point set, `positions`.

        Args:
            unary (Tensor[N, C, *S] or Tensor[N, C, P]): logits on a grid (S of rank 1, 2 or 3,
                read from the unary's shape) or, with `positions`, on a point set.
            image (Tensor[N, G, *S] or Tensor[N, G, P], or None): the guide, G >= 1 channels (RGB
                for G = 3: 0..255, or normalised as declared by image_mean/image_std); None when
                no kernel is over the guide.
            num_iterations (int or None): overrides the mode's iteration count for this call.
            positions (Tensor[N, D, P] or None): a point set's positions (point clouds,
                superpixels, mesh vertices); absent: the unary is a grid, whose positions are
                its indices.
        Returns the refined logits, of the unary's shape. Raises ValueError for NaN/Inf in the
        unary or the parameters, an RGB image outside 0..255 (when no image_mean/image_std were
        given), and a non-finite output (parameters or logits too large for the arithmetic); see
        `crfrnn.checks.check_layer_values`. Meta tensors give a meta result of the right shape
        and dtype.
        """
        _, channels = checks.crf_inputs(unary, image, positions, self.num_classes, self.kernels)
        checks.layer_fits(self.iterations.device, self.image_mean is not None, unary, image)
        # RGB conventions (0..255, the colour warnings) for a 3-channel image on a 2-D grid, or
        # as image_mean/image_std declare; other guides (volumes, signals, point sets) are in their
        # own units, and a guide no kernel reads is not checked.
        rgb_image = channels == 3 and any(k.guide is not None for k in self.kernels) and (
            self.image_mean is not None or (positions is None and unary.dim() == 4))
        if num_iterations is None:
            num_iterations = self.num_iterations if self.training else self.num_eval_iterations
        num_iterations = checks.iteration_count(num_iterations)
        dtype = torch.float64 if unary.dtype == torch.float64 else torch.float32
        if unary.numel() == 0:
            return unary.to(dtype).clone()
        if unary.device.type == "meta":  # shapes only (model summaries, FLOP counters)
            return torch.empty(unary.shape, dtype=dtype, device="meta")
        with torch.autocast(device_type=unary.device.type, enabled=False):
            guide = None if image is None else self.rgb255(image.detach())  # no gradient into the guide
            lattices = self._lattices(guide, None if positions is None else positions.detach(),
                                      (unary.shape[0], *unary.shape[2:]))
            pairwise = self.pairwise_matrices(dtype)
            # [N, P, C], a view of the channels-first memory: the fused op reads and writes that
            # layout directly (the loop makes it contiguous).
            u = unary.to(dtype).flatten(2).transpose(1, 2)
            try:
                logits = mean_field(u, lattices, pairwise, num_iterations, self.normalize, self.checkpoint,
                                    fused=self.fused, keep_marginals=self.keep_marginals,
                                    prune=self.prune if self.training else self.eval_prune)
            except ValueError:  # (pruning refuses NaN/Inf matrices: name the parameter behind them)
                checks.check_parameters(dict(self.named_parameters()), pairwise)
                raise
            out = logits.transpose(1, 2).reshape(unary.shape)
        checks.check_layer_values(dict(self.named_parameters()), unary, image, guide if rgb_image else None,
                                  pairwise, out, normalised=self.image_mean is not None)
        return out

    def rgb255(self, image):
        """The guide Tensor[N, G, ...] as float (float64 for float64), with the declared RGB
        normalisation undone: RGB in 0..255."""
        dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        image = image.to(dtype)
        if self.image_mean is not None:
            view = (1, 3) + (1,) * (image.dim() - 2)
            image = (image * self.image_std.to(dtype).view(view) + self.image_mean.to(dtype).view(view)) * 255.0
        return image

    def _lattices(self, guide, positions=None, shape=None):
        """One lattice per kernel (`crfrnn.inference.kernel_lattices`), of the guide (float, in its
        units: RGB 0..255) and the positions (a point set's, or None: a grid of `shape` (N, *S), by
        default the guide's); a ValueError naming the bandwidths when the features are ones the
        lattice rejects. Lattices of positions alone on a grid are kept between calls (in
        `kept_lattices()`; `clear_lattice_cache()` frees them), except in a traced graph; with
        learned bandwidths and grad mode on, every lattice is built differentiable in them."""
        reference = next(t for t in (guide, positions, self.iterations) if t is not None)
        dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
        learned = self.learn_bandwidths and torch.is_grad_enabled()
        sigmas = ([list(log.to(dtype).exp().unbind()) for log in self._bandwidth_buffers()] if learned
                  else self.sigmas())
        kept = None if learned or torch.compiler.is_compiling() else self._kept
        try:
            return kernel_lattices(self.kernels, sigmas, shape or (guide.shape[0], *guide.shape[2:]), positions,
                                   guide, self.backend, dtype, reference.device,
                                   self.bandwidth_grad if learned else "lattice", kept)
        except ValueError as exc:  # NaN/Inf or huge values: features the lattice rejects
            for name in (f"{k.name}_log_sigma" for k in self.kernels):  # a diverged bandwidth, not the guide
                if not bool(torch.isfinite(getattr(self, name)).all()):
                    raise ValueError(f"CRFRNNLayer.{name} has NaN/Inf values: the layer's bandwidths must "
                                     "be finite (a diverged training run or a damaged checkpoint?)") from exc
            for name, t in (("positions contain", positions), ("image contains", guide)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name} {int((~torch.isfinite(t)).sum())} NaN/Inf values: "
                                     f"the CRF needs finite ones ({exc})") from exc
            bandwidths = describe_bandwidths(self.kernels, self.sigmas(), " = ")
            raise ValueError(f"{'image and positions give' if positions is not None else 'image gives'} {exc} "
                             f"(bandwidths: {bandwidths})") from exc

    def kept_lattices(self):
        """{kernel name: Lattice}: the lattices kept between calls (see `_lattices`)."""
        return {name: lattice for name, (_, lattice) in self._kept.items()}

    def clear_lattice_cache(self):
        """Forget the kept lattices (see `_lattices`); the next forward builds them again."""
        self._kept = {}
