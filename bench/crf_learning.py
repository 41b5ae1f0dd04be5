"""Learning the CRF on real images: hand-set, grid-searched and learned CRFs on unseen images.

The CRF is fitted on one VOC-layout folder (--train-root) and tested on another (--test-root),
with the coarse-unary protocol's unaries (bench/voc_protocol.py): DCNN-like score maps made from
the ground truth, so that only the CRF is judged. Test images use the protocol's seed (their
index in the test folder's val.txt); each training epoch draws a new unary for every training
image (seed index + 1000 * epoch), so the learned CRF cannot memorise one noise pattern.

Results on the test folder (full resolution, --test-iterations mean-field iterations):

- unary:            the coarse unary's argmax;
- handset:          DeepLab-LargeFOV's CRF (w1 4, sigma_alpha 121, sigma_beta 5, w2 3, sigma_gamma 3);
- grid:             DeepLab's grid search on the training folder: w2 = sigma_gamma = 3, every
                    (w1, sigma_alpha, sigma_beta) of --grid-w1 x --grid-sxy x --grid-srgb, the
                    best training mIoU kept (the grid is printed);
- learned_matrices: CRF-RNN: the C x C kernel weights and compatibility learned by gradient from
                    the hand-set start with CRF-RNN's loss (cross-entropy), bandwidths fixed;
- learned_full:     ours: the grid's best refined by gradient: the three bandwidths and one
                    weight per class and kernel learned (--compatibility potts, --kernel-weights
                    diagonal, --start grid) by the Lovász-softmax loss (--loss), the entries of
                    classes absent from the training labels kept at their start
                    (CRFRNNLayer.freeze_classes; --learn-unseen-classes to learn them too).

Why these defaults (measured on a 23/23 split of the 46 shared images, both ways; README):
cross-entropy does not follow the mIoU the CRFs are judged by: here a stronger, sharper CRF has
the better mIoU and the worse cross-entropy (confident mistakes cost it dearly), so learning with
it moved the bandwidths away from the grid's choice; the Lovász-softmax loss, the IoU's convex
surrogate, ranks the grid's points as their mIoU does. Class-pair parameters over-fit the few
training images: full matrices wiped out classes absent from them (-30 to -80 IoU), a symmetric
compatibility gave the best mIoU but still cost rare classes 3-6 IoU against the hand-set CRF;
a Potts compatibility with per-class kernel weights, started from the grid's best and with the
unseen classes frozen, kept every class within 2 IoU of the hand-set CRF and still beat the grid.
--also runs other sharings side by side (same unaries, same order).

Fitting (grid and gradient) runs on the training folder shrunk by --train-scale, with the spatial
bandwidths scaled by it; the fitted layers are brought back to full resolution with
``CRFRNNLayer.scale_spatial_bandwidths(1 / train_scale)`` and tested there. Each result has the
mIoU, the pixel accuracy, the accuracy within --band px of a label boundary (void excluded) and
the per-class IoU (null for a class absent from the test folder's labels and predictions).

    python bench/crf_learning.py --train-root A/VOC2012 --test-root B/VOC2012 --json out.json

JSON: {"results": {name: {"miou", "pixel_acc", "band_acc", "per_class_iou"}}, "seconds",
"phase_seconds": {"grid", "learning", "test"}, ...}
(percentages).
"""
import argparse
import itertools
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# common first: it puts the repository on sys.path (for models and train)
from common import add_json_option, environment, print_table, run_main, write_json
import crfrnn
import voc_protocol as vp
from train.engine import CRF_LOSSES, search_grid
from train.metrics import ConfusionMatrix, boundary_distance

HANDSET = {"bilateral": (121.0, 5.0, 4.0), "spatial": (3.0, 3.0)}
RESULTS = ("unary", "handset", "grid", "learned_matrices", "learned_full")
CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-root", required=True,
                   help="VOC2012-layout folder to fit the CRFs on (ImageSets/Segmentation/val.txt, "
                        "JPEGImages, SegmentationClass)")
    p.add_argument("--test-root", required=True, help="VOC2012-layout folder to test on")
    p.add_argument("--test-limit", type=int, default=None, help="only the first N test images")
    p.add_argument("--train-limit", type=int, default=None, help="only the first N training images")
    add_json_option(p)
    p.add_argument("--train-scale", type=float, default=0.5,
                   help="fit at this fraction of the resolution, bandwidths scaled (default: 0.5)")
    p.add_argument("--epochs", type=int, default=4, help="passes over the training images (default: 4)")
    p.add_argument("--accumulate", type=int, default=1,
                   help="images per optimiser step (gradients averaged; default: 1)")
    p.add_argument("--lr", type=float, default=0.03, help="Adam learning rate, decayed linearly to 0 "
                                                           "(default: 0.03)")
    p.add_argument("--loss", choices=tuple(CRF_LOSSES), default="lovasz",
                   help="learned_full's training loss (and the --also variants'): lovasz (the "
                        "Lovász-softmax surrogate of the IoU the CRFs are judged by; default) or ce "
                        "(cross-entropy; learned_matrices always uses it, as CRF-RNN)")
    p.add_argument("--train-iterations", type=int, default=5,
                   help="mean-field iterations while learning (CRF-RNN: 5; default: 5)")
    p.add_argument("--test-iterations", type=int, default=10,
                   help="mean-field iterations of every CRF at test (DeepLab, CRF-RNN: 10; default: 10)")
    p.add_argument("--compatibility", default="potts", choices=crfrnn.COMPATIBILITY_SHARING,
                   help="learned_full's compatibility sharing (default: potts; 'symmetric' and 'full' "
                        "learn class pairs, which over-fitted rare classes)")
    p.add_argument("--kernel-weights", default="diagonal", choices=crfrnn.KERNEL_WEIGHT_SHARING,
                   help="learned_full's kernel-weight sharing (default: diagonal, one weight per class)")
    p.add_argument("--bandwidth-grad", default=None, choices=crfrnn.FEATURE_GRADIENTS,
                   help="learned_full's bandwidth gradient (default: CRFRNNLayer's)")
    p.add_argument("--also", nargs="+", default=[], metavar="C:W[:B]",
                   help="more learned variants, side by side with learned_full (reported as "
                        "learned[C:W[:B]], and under 'variants' in the JSON): compatibility C and "
                        "kernel-weight sharing W, bandwidths B learned with that bandwidth_grad "
                        "(default: the layer's) or 'fixed'; e.g. --also potts:scalar full:full:fixed")
    p.add_argument("--start", choices=("handset", "grid"), default="grid",
                   help="where learned_full and the --also variants start: the grid search's best "
                        "(default), or DeepLab's hand-set CRF (learned_matrices always starts hand-set, "
                        "as CRF-RNN)")
    p.add_argument("--learn-unseen-classes", action="store_true",
                   help="let the matrix entries of classes absent from the training labels learn too "
                        "(default: they keep their start, CRFRNNLayer.freeze_classes)")
    p.add_argument("--grid-w1", type=float, nargs="+", default=[3.0, 6.0, 10.0], help="grid: w1 values")
    p.add_argument("--grid-sxy", type=float, nargs="+", default=[50.0, 80.0, 121.0],
                   help="grid: sigma_alpha values (px at full resolution)")
    p.add_argument("--grid-srgb", type=float, nargs="+", default=[3.0, 5.0, 10.0], help="grid: sigma_beta values")
    p.add_argument("--band", type=int, default=8, help="boundary band width in px (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training order (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ---------------------------------------------------------------------------------------------
# Data

def check_root(root):
    root = Path(root)
    for sub in ("ImageSets/Segmentation/val.txt", "JPEGImages", "SegmentationClass"):
        if not (root / sub).exists():
            raise ValueError(f"{root} is not a VOC2012-layout folder: {sub} is missing")
    return root


def shrink(image, label, logits, scale):
    """(image uint8 [h, w, 3], label [h, w], logits Tensor[C, h, w]) at `scale` of the size: area
    average for the image and the logits, nearest for the label."""
    if scale == 1:
        return image, label, logits
    h, w = (max(1, round(s * scale)) for s in label.shape)
    img = F.interpolate(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float(), size=(h, w), mode="area")
    img = img[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    lab = F.interpolate(torch.from_numpy(label.copy())[None, None].float(), size=(h, w), mode="nearest")
    return img, lab[0, 0].to(torch.uint8).numpy(), F.interpolate(logits[None], size=(h, w), mode="area")[0]


def as_inputs(image, logits):
    """(unary Tensor[1, C, H, W], image Tensor[1, 3, H, W] float 0..255)."""
    return logits[None].contiguous(), torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()


class TrainingSet:
    """The training folder at the fitting resolution; unaries drawn per (image, epoch)."""

    def __init__(self, root, limit, scale):
        self.root, self.scale = root, scale
        self.ids = vp.image_ids(root)[:limit]
        self.pairs = [vp.load_pair(root, image_id) for image_id in self.ids]
        #: the classes some training label shows (void excluded)
        self.seen_classes = sorted({int(c) for _, label in self.pairs for c in np.unique(label)
                                    if c < vp.NUM_CLASSES})

    def sample(self, index, epoch):
        """(unary, image, label Tensor[1, h, w] int64 with void = 255) of image `index`, with the
        unary of seed index + 1000 * epoch (epoch 0: the protocol's)."""
        image, label = self.pairs[index]
        logits = vp.coarse_logits(label, index + 1000 * epoch)
        img, lab, logits = shrink(image, label, logits, self.scale)
        unary, img_t = as_inputs(img, logits)
        return unary, img_t, torch.from_numpy(lab.astype(np.int64))[None]


# ---------------------------------------------------------------------------------------------
# Scores

class Scores:
    """Confusion matrices of one method on the test folder (all pixels, and the boundary band)."""

    def __init__(self):
        self.all, self.band = ConfusionMatrix(vp.NUM_CLASSES), ConfusionMatrix(vp.NUM_CLASSES)

    def add(self, pred, label, near_boundary):
        self.all.update(pred, label)
        self.band.update(pred, np.where(near_boundary, label, vp.VOID))

    def summary(self):
        per_class = [None if np.isnan(v) else float(100 * v) for v in self.all.iou().tolist()]
        return {"miou": 100 * self.all.miou(), "pixel_acc": 100 * self.all.pixel_accuracy(),
                "band_acc": 100 * self.band.pixel_accuracy(), "per_class_iou": per_class}


# ---------------------------------------------------------------------------------------------
# Fitting

def make_layer(params, scale, iterations, **kwargs):
    """A CRFRNNLayer with `params` ({"bilateral": (sxy, srgb, w1), "spatial": (sxy, w2)}) at
    full resolution, its spatial bandwidths scaled to a `scale` times smaller image."""
    crf = crfrnn.CRFRNNLayer(vp.NUM_CLASSES, num_iterations=iterations, num_eval_iterations=iterations,
                             bilateral=params["bilateral"], spatial=params["spatial"], **kwargs)
    return crf.scale_spatial_bandwidths(scale)


def grid_search(train, args):
    """DeepLab's search on the training folder (train/'s grid search): (best params at full
    resolution, table rows)."""
    samples = [train.sample(index, 0) for index in range(len(train.ids))]

    def make_crf(w1, sxy, srgb):
        return make_layer({"bilateral": (sxy, srgb, w1), "spatial": (3.0, 3.0)}, args.train_scale,
                          args.test_iterations).eval()
    best, points = search_grid(samples, make_crf, itertools.product(args.grid_w1, args.grid_sxy, args.grid_srgb),
                               vp.NUM_CLASSES, progress=not args.no_progress)
    rows = [{"w1": p["w1"], "sigma_alpha": p["sxy"], "sigma_beta": p["srgb"], "train mIoU %": 100 * p["miou"]}
            for p in points]
    return {"bilateral": (best["sxy"], best["srgb"], best["w1"]), "spatial": (3.0, 3.0)}, rows


def learn(train, args, layers, losses_of):
    """Learn each of `layers` ({name: CRFRNNLayer at the fitting resolution}) by gradient on the
    training folder, each with its loss (losses_of[name], a key of train.engine.CRF_LOSSES), side
    by side on the same unaries in the same order. Returns them at full resolution in eval mode,
    and each one's mean training loss in the last epoch."""
    opts, scheds = {}, {}
    steps = args.epochs * -(-len(train.ids) // args.accumulate)
    for name, crf in layers.items():
        crf.num_iterations, crf.num_eval_iterations = args.train_iterations, args.test_iterations
        crf.train()
        opts[name] = torch.optim.Adam([p for p in crf.parameters() if p.requires_grad], lr=args.lr)
        scheds[name] = torch.optim.lr_scheduler.LambdaLR(opts[name], lambda step: 1.0 - step / steps)
    order = random.Random(args.seed)
    losses = {}
    with tqdm(total=args.epochs * len(train.ids), desc="learning " + " and ".join(layers),
              disable=args.no_progress) as bar:
        for epoch in range(args.epochs):
            indices = list(range(len(train.ids)))
            order.shuffle(indices)
            losses = {name: [] for name in layers}
            for start in range(0, len(indices), args.accumulate):
                chunk = indices[start:start + args.accumulate]
                for opt in opts.values():
                    opt.zero_grad()
                for index in chunk:
                    unary, image, label = train.sample(index, epoch)
                    for name, crf in layers.items():
                        loss = CRF_LOSSES[losses_of[name]](crf(unary, image), label)
                        (loss / len(chunk)).backward()
                        losses[name].append(loss.item())
                    bar.update(1)
                for name in layers:
                    opts[name].step()
                    scheds[name].step()
                bar.set_postfix({name: f"{np.mean(v):.4f}" for name, v in losses.items()})
    return ({name: crf.scale_spatial_bandwidths(1.0 / args.train_scale).eval() for name, crf in layers.items()},
            {name: float(np.mean(v)) for name, v in losses.items()})


def describe(crf):
    """The learned layer's bandwidths and matrices, summarised (plain floats)."""
    (bxy, brgb), (sxy,) = crf.sigmas()
    w_bil, w_spa = (w.detach() for w in crf.kernel_weight_matrices())
    mu = crf.compatibility_matrix().detach()
    off = ~torch.eye(crf.num_classes, dtype=torch.bool)
    return {"sigma_alpha": bxy, "sigma_beta": brgb, "sigma_gamma": sxy,
            "w1 (mean diagonal)": float(w_bil.diag().mean()), "w2 (mean diagonal)": float(w_spa.diag().mean()),
            "compatibility (mean off-diagonal)": float(mu[off].mean()),
            "compatibility (mean diagonal)": float(mu.diag().mean())}


# ---------------------------------------------------------------------------------------------

def main(args):
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_root, test_root = check_root(args.train_root), check_root(args.test_root)
    if not 0 < args.train_scale <= 1:
        raise ValueError(f"--train-scale must be in (0, 1], got {args.train_scale}")
    train = TrainingSet(train_root, args.train_limit, args.train_scale)
    test_ids = vp.image_ids(test_root)[: args.test_limit]
    print(f"fitting on {len(train.ids)} images of {train_root} at scale {args.train_scale:g}; "
          f"testing on {len(test_ids)} images of {test_root} at full resolution")

    phase_seconds = {}
    phase_start = time.perf_counter()
    grid_params, grid_rows = grid_search(train, args)
    phase_seconds["grid"] = time.perf_counter() - phase_start
    to_learn = {"learned_matrices": make_layer(HANDSET, args.train_scale, args.train_iterations)}
    losses_of = {"learned_matrices": "ce"}  # CRF-RNN's
    variants = {"learned_full": {k: v for k, v in (("compatibility", args.compatibility),
                                                   ("kernel_weights", args.kernel_weights),
                                                   ("bandwidth_grad", args.bandwidth_grad)) if v is not None}}
    variants.update(parse_variant(spec) for spec in args.also)
    start_params = grid_params if args.start == "grid" else HANDSET
    unseen = [c for c in range(vp.NUM_CLASSES) if c not in train.seen_classes]
    print("classes absent from the training labels: " + (", ".join(CLASS_NAMES[c] for c in unseen) or "none")
          + ("" if args.learn_unseen_classes or not unseen else " (their entries keep the start)"))
    for name, options in variants.items():
        options = {"learn_bandwidths": True, **options}
        to_learn[name] = make_layer(start_params, args.train_scale, args.train_iterations, **options)
        if not args.learn_unseen_classes:
            to_learn[name].freeze_classes(unseen)
        losses_of[name] = args.loss
    phase_start = time.perf_counter()
    learned, losses = learn(train, args, to_learn, losses_of)
    phase_seconds["learning"] = time.perf_counter() - phase_start
    crfs = {"handset": make_layer(HANDSET, 1.0, args.test_iterations).eval(),
            "grid": make_layer(grid_params, 1.0, args.test_iterations).eval(), **learned}

    scores = {name: Scores() for name in ("unary", *crfs)}
    phase_start = time.perf_counter()
    with torch.no_grad():
        for index, image_id in enumerate(tqdm(test_ids, desc="test", disable=args.no_progress)):
            image, label = vp.load_pair(test_root, image_id)
            unary, img = as_inputs(image, vp.coarse_logits(label, index))
            band = boundary_distance(label) <= args.band
            scores["unary"].add(unary[0].argmax(0).numpy(), label, band)
            for name, crf in crfs.items():
                scores[name].add(crf(unary, img)[0].argmax(0).numpy(), label, band)
    phase_seconds["test"] = time.perf_counter() - phase_start
    results = {name: s.summary() for name, s in scores.items()}
    seconds = time.perf_counter() - start
    report(args, results, grid_params, grid_rows, learned, losses, len(test_ids), seconds, phase_seconds)
    write_json(args.json, {"results": {name: results[name] for name in RESULTS},
                           "variants": {name: results[name] for name in results if name not in RESULTS},
                           "seconds": seconds, "phase_seconds": phase_seconds, "environment": environment("cpu"),
                           "train_root": str(train_root), "test_root": str(test_root),
                           "train_images": len(train.ids), "test_images": len(test_ids), "grid": grid_rows,
                           "unseen_classes": [CLASS_NAMES[c] for c in unseen],
                           "learned": {name: {**describe(crf), "final train loss": losses[name]}
                                       for name, crf in learned.items()},
                           "options": vars(args)})
    return results


def parse_variant(spec):
    """"COMPATIBILITY:KERNEL_WEIGHTS[:BANDWIDTHS]" -> (result name, CRFRNNLayer options);
    BANDWIDTHS is a bandwidth_grad, or "fixed" for matrices only with that sharing."""
    parts = spec.split(":")
    if not 2 <= len(parts) <= 3 or parts[0] not in crfrnn.COMPATIBILITY_SHARING \
            or parts[1] not in crfrnn.KERNEL_WEIGHT_SHARING \
            or (len(parts) == 3 and parts[2] not in (*crfrnn.FEATURE_GRADIENTS, "fixed")):
        raise ValueError(f"--also {spec!r}: expected COMPATIBILITY:KERNEL_WEIGHTS[:BANDWIDTHS] with "
                         f"{crfrnn.COMPATIBILITY_SHARING}, {crfrnn.KERNEL_WEIGHT_SHARING} and "
                         f"{(*crfrnn.FEATURE_GRADIENTS, 'fixed')}")
    options = {"compatibility": parts[0], "kernel_weights": parts[1]}
    if len(parts) == 3:
        options.update({"learn_bandwidths": False} if parts[2] == "fixed" else {"bandwidth_grad": parts[2]})
    return f"learned[{spec}]", options


def report(args, results, grid_params, grid_rows, learned, losses, num_test, seconds, phase_seconds):
    """Print the grid, the learned parameters, the results and the per-class IoU."""
    grid_rows = sorted(grid_rows, key=lambda r: -r["train mIoU %"])
    print_table(f"Grid search on the training folder (w2 = sigma_gamma = 3, {args.test_iterations} iterations, "
                f"scale {args.train_scale:g})", grid_rows, ["w1", "sigma_alpha", "sigma_beta", "train mIoU %"])
    (sxy, srgb, w1) = grid_params["bilateral"]
    print(f"\ngrid: w1 {w1:g}, sigma_alpha {sxy:g}, sigma_beta {srgb:g}")
    for name, crf in learned.items():
        info = {**describe(crf), "final train loss": losses[name]}
        sharing = (f"[compatibility {crf.compatibility_sharing}, kernel_weights {crf.kernel_weight_sharing}, "
                   f"bandwidths {crf.bandwidth_grad if crf.learn_bandwidths else 'fixed'}]")
        print(f"{name} {sharing}: " + ", ".join(f"{k} {v:.4g}" for k, v in info.items()))
    handset = results["handset"]
    def worst_class(name):
        gaps = [(results[name]["per_class_iou"][c] - handset["per_class_iou"][c], CLASS_NAMES[c])
                for c in range(vp.NUM_CLASSES)
                if handset["per_class_iou"][c] is not None and results[name]["per_class_iou"][c] is not None]
        gap, cname = min(gaps)
        return f"{cname} {gap:+.2f}"
    rows = [{"method": name, "mIoU %": r["miou"], "pixel acc %": r["pixel_acc"],
             f"band {args.band}px acc %": r["band_acc"], "vs handset": r["miou"] - handset["miou"],
             "vs grid": r["miou"] - results["grid"]["miou"],
             "worst class vs handset": worst_class(name) if name != "unary" else ""}
            for name, r in results.items()]
    print_table(f"Test folder: {num_test} images, full resolution, {args.test_iterations} iterations", rows,
                ["method", "mIoU %", "pixel acc %", f"band {args.band}px acc %", "vs handset", "vs grid",
                 "worst class vs handset"])
    class_rows = [{"class": cname, **{name: r["per_class_iou"][c] if r["per_class_iou"][c] is not None else "-"
                                      for name, r in results.items()}}
                  for c, cname in enumerate(CLASS_NAMES)]
    print_table("Per-class IoU % on the test folder", class_rows, ["class", *results])
    print(f"\n{seconds:.0f} s in all (" + ", ".join(f"{k} {v:.0f} s" for k, v in phase_seconds.items()) + ")")


if __name__ == "__main__":
    run_main(main, get_args_parser())
