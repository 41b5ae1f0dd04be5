"""How good is a bandwidth gradient through the lattice? Estimators against the exact derivative.

On small real crops (VOC images of ../shared/data shrunk --factor times, about 62x46 px at the
default 8), with the coarse-unary protocol's Q (bench/voc_protocol.py: logits at full size,
area-averaged to the crop, softmax), the loss

    L(sigma) = sum_i Q_i . Kn(Q)_i,   Kn = symmetric normalisation n K(n Q), n = 1/sqrt(K 1),

is differentiated with respect to the log-bandwidths of a bilateral kernel (sigma_xy, sigma_rgb;
DeepLab's 121/factor px and 5) and of a spatial kernel (sigma_xy = 3 px) by:

- exact:    autograd through the exact O(P^2) Gaussian filter (float64): the reference;
- lattice:  the lattice's own gradient (Lattice(feature_grad="lattice")): through the
            barycentric weights, simplices fixed, float64;
- shifted:  the same, averaged over --shifts lattices of randomly translated features;
- central:  central differences of the lattice loss over +-3% of sigma, each side a new lattice;
- gaussian: the Gaussian's derivative formula evaluated with the lattice
            (Lattice(feature_grad="gaussian")), float64 and float32 (what the layer runs in).

It prints, per image, each estimator's derivatives; then per estimator and bandwidth the sign
agreement with the exact derivative, the median relative error |est - exact| / |exact|, the
per-point cosine of the feature gradient with the exact one, and the time of one loss+backward
relative to a loss+backward without feature gradient, on a crop of --timing-factor.

    python bench/bandwidth_gradient.py                 # 12 images, factor 8
    python bench/bandwidth_gradient.py --images 46 --json grad.json
"""
import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# common first: it puts the repository on sys.path (for models and train)
from common import VOC_ROOT, add_json_option, environment, print_table, run_main, write_json
import crfrnn
import voc_protocol as vp

ESTIMATORS = ("lattice", "shifted", "central", "gaussian", "gaussian32")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(VOC_ROOT), help="VOC2012 folder (default: ../shared/data/...)")
    p.add_argument("--images", type=int, default=12, help="first N images of val.txt (default: 12)")
    p.add_argument("--factor", type=int, default=8, help="shrink the images by this factor (default: 8)")
    p.add_argument("--shifts", type=int, default=8, help="lattices averaged by 'shifted' (default: 8)")
    p.add_argument("--step", type=float, default=0.03, help="relative step of 'central' (default: 0.03)")
    p.add_argument("--timing-factor", type=int, default=2,
                   help="shrink factor of the image the costs are timed on (default: 2)")
    add_json_option(p)
    return p


def load_crop(root, ids, index, factor):
    """(image Tensor[1, 3, h, w] float64 0..255, Q Tensor[1, h*w, C] float64) of one image."""
    image, label = vp.load_pair(root, ids[index])
    logits = vp.coarse_logits(label, index)
    img, lab = vp.downscale_pair(image, label, factor)
    q = torch.softmax(F.interpolate(logits[None], size=lab.shape, mode="area")[0], 0)
    return torch.from_numpy(img.copy()).permute(2, 0, 1)[None].double(), q.flatten(1).t()[None].double()


def kernel_features(image, log_sigmas):
    """Per-point features Tensor[1, P, d]: spatial (one log-sigma) or bilateral (two)."""
    if len(log_sigmas) == 1:
        feats = crfrnn.spatial_features(image, log_sigmas[0].exp())
    else:
        feats = crfrnn.bilateral_features(image, log_sigmas[0].exp(), log_sigmas[1].exp())
    return feats.flatten(2).transpose(1, 2)


def exact_loss(features, q):
    """sum Q . n K(n Q) with the exact Gaussian K (float64, O(P^2) memory)."""
    f = features[0]
    sq = (f * f).sum(1)
    kernel = torch.exp(-0.5 * (sq[:, None] + sq[None, :] - 2 * f @ f.t()).clamp_min(0))
    n = kernel.sum(1, keepdim=True).rsqrt()
    return (q[0] * n * (kernel @ (n * q[0]))).sum()


def lattice_loss(features, q, feature_grad="lattice"):
    lat = crfrnn.Lattice(features, feature_grad=feature_grad)
    return (q * lat.filter(q, normalize="symmetric")).sum()


def derivatives(loss_fn, image, q, sigmas, shift=None, dtype=torch.float64):
    """(dL/dlog sigma for each sigma, dL/dfeatures Tensor[P, d]) of loss_fn(features, q)."""
    log_sigmas = [torch.tensor(math.log(s), dtype=torch.float64, requires_grad=True) for s in sigmas]
    feats = kernel_features(image, log_sigmas)
    if shift is not None:
        feats = feats + shift
    feats = feats.to(dtype)
    leaf = feats.detach().requires_grad_()
    loss = loss_fn(leaf, q.to(dtype))
    grad_features, = torch.autograd.grad(loss, leaf)
    grads = torch.autograd.grad(feats, log_sigmas, grad_features)
    return np.array([g.item() for g in grads]), grad_features[0].double()


def central_differences(image, q, sigmas, step):
    out = []
    for k in range(len(sigmas)):
        sides = []
        for sign in (1, -1):
            logs = [torch.tensor(math.log(s), dtype=torch.float64) for s in sigmas]
            logs[k] = logs[k] + sign * step
            with torch.no_grad():
                sides.append(lattice_loss(kernel_features(image, logs), q).item())
        out.append((sides[0] - sides[1]) / (2 * step))
    return np.array(out)


def shifted_average(image, q, sigmas, shifts, seed):
    gen = torch.Generator().manual_seed(seed)
    d = 2 + (3 if len(sigmas) == 2 else 0)
    total, total_features = 0.0, 0.0
    for _ in range(shifts):
        # Translations over several lattice cells (the cell is about (d+1) sqrt(2/3) wide in
        # feature units along a direction): the average is over the lattice's offset.
        shift = torch.rand(d, generator=gen, dtype=torch.float64) * 2 * (d + 1)
        g, gf = derivatives(lattice_loss, image, q, sigmas, shift=shift)
        total, total_features = total + g, total_features + gf
    return total / shifts, total_features / shifts


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-300))


def estimate_all(image, q, sigmas, args, seed):
    """{name: (dL/dlog sigma ndarray, per-point cosine with the exact feature gradient or None)}."""
    exact, exact_features = derivatives(exact_loss, image, q, sigmas)
    results = {"exact": (exact, 1.0)}
    g, gf = derivatives(lattice_loss, image, q, sigmas)
    results["lattice"] = (g, cosine(gf, exact_features))
    g, gf = shifted_average(image, q, sigmas, args.shifts, seed)
    results["shifted"] = (g, cosine(gf, exact_features))
    results["central"] = (central_differences(image, q, sigmas, args.step), None)
    gaussian = lambda f, v: lattice_loss(f, v, "gaussian")  # noqa: E731
    g, gf = derivatives(gaussian, image, q, sigmas)
    results["gaussian"] = (g, cosine(gf, exact_features))
    g, gf = derivatives(gaussian, image, q, sigmas, dtype=torch.float32)
    results["gaussian32"] = (g, cosine(gf, exact_features))
    return results


def time_costs(root, ids, factor, sigmas, repeats=5):
    """Median seconds of loss+backward with features held constant, and relative costs of the
    feature gradients, on one image shrunk by `factor` (float32)."""
    image, q = load_crop(root, ids, 0, factor)
    image, q = image.float(), q.float().requires_grad_()
    def run(feature_grad):
        log_sigmas = [torch.tensor(math.log(s), requires_grad=feature_grad is not None) for s in sigmas]
        feats = kernel_features(image, log_sigmas)
        loss = lattice_loss(feats, q, feature_grad or "lattice")
        loss.backward()
    times = {}
    for name in (None, "lattice", "gaussian"):
        run(name)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(name)
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples)
    return {"values only s": times[None], "lattice x": times["lattice"] / times[None],
            "gaussian x": times["gaussian"] / times[None], "pixels": int(q.shape[1])}


def main(args):
    root = Path(args.root)
    if not (root / "ImageSets" / "Segmentation" / "val.txt").is_file():
        raise ValueError(f"no VOC val set at {root} (expected ImageSets/Segmentation/val.txt)")
    ids = vp.image_ids(root)[: args.images]
    kernels = {"bilateral": (121.0 / args.factor, 5.0), "spatial": (3.0,)}
    names = {"bilateral": ["sxy", "srgb"], "spatial": ["sxy"]}
    per_image = []
    for index in tqdm(range(len(ids)), desc="images"):
        image, q = load_crop(root, ids, index, args.factor)
        for kernel, sigmas in kernels.items():
            res = estimate_all(image, q, sigmas, args, seed=index)
            for k, bandwidth in enumerate(names[kernel]):
                row = {"image": ids[index], "size": f"{image.shape[3]}x{image.shape[2]}",
                       "bandwidth": f"{kernel} {bandwidth}"}
                row.update({name: float(val[0][k]) for name, val in res.items()})
                row["cosines"] = {name: val[1] for name, val in res.items() if val[1] is not None}
                per_image.append(row)

    columns = ["image", "size", "bandwidth", "exact"] + list(ESTIMATORS)
    print(f"\ndL/dlog sigma, L = sum Q . Kn(Q) (symmetric), images shrunk {args.factor}x, "
          f"bilateral sigma_xy {121 / args.factor:.3g} px, sigma_rgb 5; spatial sigma_xy 3 px")
    print_table("Per image", per_image, columns)

    summary = []
    for bandwidth in dict.fromkeys(r["bandwidth"] for r in per_image):
        rows = [r for r in per_image if r["bandwidth"] == bandwidth]
        exact = np.array([r["exact"] for r in rows])
        for name in ESTIMATORS:
            est = np.array([r[name] for r in rows])
            cos = [r["cosines"][name] for r in rows if name in r["cosines"]]
            summary.append({"bandwidth": bandwidth, "estimator": name,
                            "sign agrees": f"{int((np.sign(est) == np.sign(exact)).sum())}/{len(rows)}",
                            "median rel. error": float(np.median(np.abs(est - exact) / np.abs(exact))),
                            "max rel. error": float(np.max(np.abs(est - exact) / np.abs(exact))),
                            "point cosine (median)": float(np.median(cos)) if cos else ""})
    print_table("Summary against the exact derivative", summary,
                ["bandwidth", "estimator", "sign agrees", "median rel. error", "max rel. error",
                 "point cosine (median)"])

    costs = []
    for kernel, sigmas in kernels.items():
        scaled = tuple(s * args.factor / args.timing_factor if i == 0 else s for i, s in enumerate(sigmas))
        if kernel == "spatial":
            scaled = sigmas
        costs.append({"kernel": kernel, **time_costs(root, ids, args.timing_factor, scaled)})
    print_table(f"Cost of a loss+backward with the feature gradient, relative to values only "
                f"(float32, image 0 shrunk {args.timing_factor}x, median of 5)", costs,
                ["kernel", "pixels", "values only s", "lattice x", "gaussian x"])
    write_json(args.json, {"environment": environment("cpu"), "factor": args.factor,
                           "per_image": per_image, "summary": summary, "costs": costs})


if __name__ == "__main__":
    run_main(main, get_args_parser())
