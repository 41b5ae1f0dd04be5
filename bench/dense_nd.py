"""Dense CRFs beyond 2-D RGB, against densecrf: a 3-D volume with 1-4 modalities and a point cloud
(xyz + rgb), each with a known truth, through our layer and through pydensecrf2's generic
DenseCRF with the same features (and SimpleCRF's denseCRF3D where it is installed).

Every case times the whole CRF, lattice builds included (ours cold: nothing kept between calls;
densecrf builds its lattices in addPairwiseEnergy), median of --repeats, and reports the label
agreement with densecrf and the accuracy against the truth of the unary, ours and densecrf's.

    python bench/dense_nd.py                          # 64x128x128 volume, 1 and 4 modalities, C = 2 and 8; 100k points
    python bench/dense_nd.py --threads 2 --json nd.json
    python bench/dense_nd.py --device cuda            # ours on the GPU (densecrf stays on the CPU)

SimpleCRF (`pip install simplecrf`) builds only against numpy < 2: install it in a virtual
environment of its own with this project to include it; without it its column says so.
"""
import argparse
import statistics
import time

import numpy as np
import torch

# common first: it puts the repository on sys.path (for models and train)
from common import (add_device_option, add_json_option, chosen_device, environment, print_table, run_main, synchronize,
                    write_json)
import crfrnn
import densecrf_peer
from crfrnn import GaussianKernel


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_option(p)
    add_json_option(p)
    p.add_argument("--volume", type=int, nargs=3, default=[64, 128, 128], metavar=("D", "H", "W"),
                   help="volume size (default: 64 128 128)")
    p.add_argument("--modalities", type=int, nargs="+", default=[1, 4], help="guide channels (default: 1 4)")
    p.add_argument("--classes", type=int, nargs="+", default=[2, 8], help="class counts (default: 2 8)")
    p.add_argument("--points", type=int, default=100_000, help="points in the cloud (default: 100000; 0: none)")
    p.add_argument("--iterations", type=int, default=5, help="mean-field iterations (default: 5)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, median reported (default: 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: 0, torch's choice)")
    return p


# ---------------------------------------------------------------------------------------------
# Inputs with a known truth

def coarse_logits(truth, num_classes, rng, cell):
    """Logits like a coarse network's: the one-hot truth averaged over cells of `cell` points
    along each axis, shifted by one cell, log(0.8 p + 0.2 / C), plus noise. float32 [C, *S]."""
    onehot = torch.from_numpy(np.moveaxis(np.eye(num_classes, dtype=np.float32)[truth], -1, 0))[None]
    shifted = torch.roll(onehot, shifts=min(cell, truth.shape[-1]) // 2, dims=-1)
    pool = [torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d, torch.nn.functional.avg_pool3d]
    cell = [max(1, min(cell, s)) for s in truth.shape]  # small inputs: at most the input's size
    coarse = pool[truth.ndim - 1](shifted, cell, ceil_mode=True)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[truth.ndim]
    p = torch.nn.functional.interpolate(coarse, size=truth.shape, mode=mode, align_corners=False)[0]
    logits = torch.log(0.8 * p + 0.2 / num_classes).numpy()
    return (logits + rng.normal(0, 0.5, logits.shape)).astype(np.float32)


def volume_case(shape, modalities, num_classes, seed=0):
    """(truth int[D, H, W], guide float32[G, D, H, W], logits float32[C, D, H, W], kernels): nested
    ellipsoids of num_classes - 1 tissue classes in a background, each with its own intensity per
    modality (0..400, like CT or MR units), smooth bias and noise; voxels twice as thick as wide."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    truth = np.zeros(shape, np.int64)
    for k in range(1, num_classes):
        centre = rng.uniform(-0.4, 0.4, 3)
        radius = rng.uniform(0.2, 0.6, 3)
        truth[((((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0)) < 1] = k
    levels = rng.uniform(50, 350, (modalities, num_classes))
    bias = 20 * grid[2][None] + 10 * grid[0][None]
    guide = np.stack([levels[m][truth] for m in range(modalities)]) + bias + rng.normal(0, 15, (modalities, *shape))
    kernels = [GaussianKernel(5.0, positions=(2.0, 4.0, 4.0), guide=40.0), GaussianKernel(3.0, positions=(1.0, 2.0, 2.0))]
    return truth, guide.astype(np.float32), coarse_logits(truth, num_classes, rng, 8), kernels


def cloud_case(num_points, num_classes, seed=0):
    """(truth int[P], colours float32[3, P], logits float32[C, P], positions float32[3, P],
    kernels): a room of num_points points (metres): a floor, a wall and num_classes - 2 boxes, each
    class its own colour, the positions with sensor noise."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, num_classes, num_points)
    xyz = rng.uniform(0, 1, (3, num_points)) * np.array([[8.0], [6.0], [3.0]])
    xyz[2, truth == 0] = 0.0                                    # the floor
    xyz[0, truth == 1] = 0.0                                    # a wall
    centres = rng.uniform([1, 1, 0.5], [7, 5, 2.5], (num_classes, 3))
    for k in range(2, num_classes):                           # boxes of about 1 m
        xyz[:, truth == k] = centres[k][:, None] + rng.uniform(-0.5, 0.5, (3, int((truth == k).sum())))
    xyz += rng.normal(0, 0.01, xyz.shape)
    colours = rng.uniform(20, 235, (3, num_classes))[:, truth] + rng.normal(0, 10, (3, num_points))
    onehot = np.eye(num_classes, dtype=np.float32)[truth].T
    logits = np.log(0.6 * onehot + 0.4 / num_classes) + rng.normal(0, 0.9, onehot.shape)
    kernels = [GaussianKernel(4.0, positions=0.3, guide=20.0), GaussianKernel(2.0, positions=0.1)]
    return truth, colours.clip(0, 255).astype(np.float32), logits.astype(np.float32), xyz.astype(np.float32), kernels


# ---------------------------------------------------------------------------------------------
# The three implementations, on the same features

def run_ours(logits, guide, kernels, iterations, device, positions=None):
    crf = crfrnn.CRFRNNLayer(logits.shape[0], num_eval_iterations=iterations, kernels=kernels).eval().to(device)
    unary = torch.from_numpy(logits)[None].to(device)
    image = torch.from_numpy(guide)[None].to(device)
    pos = None if positions is None else torch.from_numpy(positions)[None].to(device)

    def call():
        crf.clear_lattice_cache()          # cold: every lattice built in the call
        with torch.no_grad():
            return torch.softmax(crf(unary, image, positions=pos), 1)[0].reshape(logits.shape[0], -1)
    return call


def run_densecrf(logits, kernels, iterations, **inputs):
    import pydensecrf.densecrf as dcrf
    feats = [densecrf_peer.kernel_features(k, **inputs) for k in kernels]   # outside the timed call
    energy = np.ascontiguousarray(-logits.reshape(logits.shape[0], -1), dtype=np.float32)

    def call():
        crf = dcrf.DenseCRF(energy.shape[1], energy.shape[0])
        crf.setUnaryEnergy(energy)
        for kernel, f in zip(kernels, feats):
            crf.addPairwiseEnergy(f, compat=kernel.weight)
        return np.array(crf.inference(iterations))
    return call


def run_simplecrf(logits, guide, kernels, iterations):
    """SimpleCRF's denseCRF3D (a volume, its own fixed bilateral + spatial pair), or None."""
    try:
        import denseCRF3D
    except ImportError:
        return None
    bil, spa = kernels
    image = np.ascontiguousarray(np.moveaxis(guide, 0, -1).clip(0, 255).astype(np.uint8))
    probs = np.ascontiguousarray(np.moveaxis(torch.softmax(torch.from_numpy(logits), 0).numpy(), 0, -1))
    param = {"MaxIterations": float(iterations), "PosW": spa.weight, "PosRStd": spa.positions[-1],
             "PosCStd": spa.positions[-1], "PosZStd": spa.positions[0], "BilateralW": bil.weight,
             "BilateralRStd": bil.positions[-1], "BilateralCStd": bil.positions[-1],
             "BilateralZStd": bil.positions[0], "ModalityNum": guide.shape[0], "BilateralModsStds": bil.guide * 4}
    return lambda: denseCRF3D.densecrf3d(image, probs, param)


def timed(call, device, repeats):
    """(median ms, the last result)."""
    call()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = call()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def compare(name, truth, logits, ours_call, dcrf_call, device, repeats, simple_call=None):
    """One row of the table (printed as it comes: a long run shows its progress). densecrf runs
    on the CPU whatever --device is: with ours on a GPU it is timed once."""
    ours_ms, q = timed(ours_call, device, repeats)
    dcrf_ms, qd = timed(dcrf_call, "cpu", repeats if device.type == "cpu" else 1)
    labels, labels_d = q.argmax(0).cpu().numpy(), qd.argmax(0)
    flat_truth = truth.ravel()
    row = {"case": name, "points": truth.size, "ours ms": ours_ms, "densecrf ms": dcrf_ms,
           "densecrf / ours": dcrf_ms / ours_ms, "labels = densecrf %": 100 * (labels == labels_d).mean(),
           "max |dQ|": float(np.abs(q.cpu().numpy() - qd).max()),
           "acc unary %": 100 * (logits.reshape(logits.shape[0], -1).argmax(0) == flat_truth).mean(),
           "acc ours %": 100 * (labels == flat_truth).mean(), "acc densecrf %": 100 * (labels_d == flat_truth).mean()}
    if simple_call is None:
        row["SimpleCRF ms"] = "not installed"
    else:
        row["SimpleCRF ms"], labels_s = timed(simple_call, "cpu", repeats)
        row["SimpleCRF / ours"] = row["SimpleCRF ms"] / ours_ms
    print(f"  ours {ours_ms:.0f} ms, densecrf {dcrf_ms:.0f} ms ({dcrf_ms / ours_ms:.2f}x), labels equal on "
          f"{row['labels = densecrf %']:.3f}%", flush=True)
    return row


def main(args):
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.iterations < 1 or args.repeats < 1 or min(args.volume) < 1 or args.points < 0:
        raise ValueError("--iterations, --repeats and the --volume sizes must be at least 1, --points at least 0")
    device = chosen_device(args)
    rows = []
    for modalities in args.modalities:
        for num_classes in args.classes:
            truth, guide, logits, kernels = volume_case(tuple(args.volume), modalities, num_classes)
            name = f"volume {'x'.join(map(str, args.volume))}, {modalities} modalit{'y' if modalities == 1 else 'ies'}, C = {num_classes}"
            print(f"{name} ...", flush=True)
            rows.append(compare(name, truth, logits, run_ours(logits, guide, kernels, args.iterations, device),
                                run_densecrf(logits, kernels, args.iterations, spatial=truth.shape, guide=guide),
                                device, args.repeats, run_simplecrf(logits, guide, kernels, args.iterations)))
    if args.points:
        for num_classes in args.classes:
            truth, colours, logits, xyz, kernels = cloud_case(args.points, num_classes)
            name = f"point cloud {args.points}, xyz + rgb, C = {num_classes}"
            print(f"{name} ...", flush=True)
            rows.append(compare(name, truth, logits,
                                run_ours(logits, colours, kernels, args.iterations, device, positions=xyz),
                                run_densecrf(logits, kernels, args.iterations, guide=colours, positions=xyz),
                                device, args.repeats))
    columns = ["case", "ours ms", "densecrf ms", "densecrf / ours", "SimpleCRF ms", "labels = densecrf %",
               "max |dQ|", "acc unary %", "acc ours %", "acc densecrf %"]
    print_table(f"{args.iterations} mean-field iterations, {torch.get_num_threads()} threads, ours on {device}",
                rows, columns)
    write_json(args.json, {"environment": environment(device), "iterations": args.iterations, "rows": rows})


if __name__ == "__main__":
    run_main(main, get_args_parser())
