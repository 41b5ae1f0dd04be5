"""Benchmark of the permutohedral lattice: build and filter time, vertex counts, memory.

For the 5-D bilateral (sigma_xy 80, sigma_rgb 13) and 2-D spatial (sigma 3) features of a real
VOC image at 500x375 with C = 21 channels: lattice build, one filter forward, forward+backward,
for the native backend (C++ on the CPU, CUDA on the GPU) beside the pure-PyTorch reference on the
same device (and, with --device cuda, the C++ backend on the CPU), with ratios. The exact O(P^2)
Gaussian filter is timed on a crop, with the lattice's relative error against it.

    python bench/lattice.py                      # CPU
    python bench/lattice.py --device cuda --json gpu.json     # batch 1 and 8
"""
import argparse
import resource

import torch

# common first: it puts the repository on sys.path (for models and train)
from common import (add_device_option, add_json_option, chosen_device, environment, load_rgb, print_table, run_main,
                    time_it, write_json)
import crfrnn


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_option(p)
    add_json_option(p)
    p.add_argument("--channels", type=int, default=21, help="channels C of the filtered values")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch sizes to time (default: 1 on the CPU, 1 and 8 on CUDA)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--crop", type=int, default=64, help="side of the crop for the exact filter")
    p.add_argument("--skip-reference", action="store_true", help="do not time the (slow) reference")
    return p


FEATURES = {
    "bilateral d=5 (sxy 80, srgb 13)": lambda img: crfrnn.bilateral_features(img, 80.0, 13.0),
    "spatial d=2 (sxy 3)": lambda img: crfrnn.spatial_features(img, 3.0),
}


def lattice_bytes(lat):
    tensors = (lat.vertex_index, lat.weights, lat.neighbors, lat.splat_offsets, lat.splat_entries)
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(name, feats, values, backend, device, repeats):
    """Time build, filter and filter+backward of one backend; returns a result row."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lat = crfrnn.Lattice(feats, backend=backend)
    build = time_it(lambda: crfrnn.Lattice(feats, backend=backend), device, repeats)
    forward = time_it(lambda: lat.filter(values), device, repeats)
    grad_values = values.clone().requires_grad_()
    backward = time_it(lambda: lat.filter(grad_values).sum().backward(), device, repeats)
    row = {"features": name, "backend": f"{backend} ({torch.device(device).type})",
           "N": values.shape[0], "vertices": lat.num_vertices,
           "vertices/px": lat.num_vertices / (values.shape[0] * values.shape[2] * values.shape[3]),
           "build ms": build, "filter ms": forward, "fwd+bwd ms": backward,
           "lattice MB": lattice_bytes(lat) / 2**20}
    if torch.device(device).type == "cuda":
        row["peak MB"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["peak MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process max RSS
    return row


def main(args):
    device = chosen_device(args)
    if args.batch is None:
        args.batch = [1, 8] if device.type == "cuda" else [1]
    image, source = load_rgb()
    print(f"image: {source}, {image.shape[3]}x{image.shape[2]}, C = {args.channels}, {environment(device)}")
    rows, ratios, exact_rows = [], [], []
    for batch in args.batch:
        img = image.repeat(batch, 1, 1, 1).to(device)
        values = torch.rand(batch, args.channels, *img.shape[2:], generator=torch.Generator().manual_seed(0)).to(device)
        for name, make in FEATURES.items():
            feats = make(img)
            native = measure(name, feats, values, "native", device, args.repeats)
            rows.append(native)
            peers = []
            if not args.skip_reference:
                peers.append(measure(name, feats, values, "reference", device, max(1, args.repeats // 2)))
            if device.type == "cuda" and crfrnn.has_native_kernel("cpu"):
                peers.append(measure(name, feats.cpu(), values.cpu(), "native", "cpu", max(1, args.repeats // 2)))
            for peer in peers:
                rows.append(peer)
                ratios.append({"features": name, "N": batch, "peer": peer["backend"],
                               "build x": peer["build ms"] / native["build ms"],
                               "filter x": peer["filter ms"] / native["filter ms"],
                               "fwd+bwd x": peer["fwd+bwd ms"] / native["fwd+bwd ms"]})

    # Exact O(P^2) filter on a crop: time and the lattice's error (normalised and raw).
    crop = image[:, :, :args.crop, :args.crop].to(device)
    vals = torch.rand(1, args.channels, args.crop, args.crop, generator=torch.Generator().manual_seed(1)).to(device)
    for name, make in FEATURES.items():
        feats = make(crop)
        lat = crfrnn.Lattice(feats, backend="native")
        row = {"features": name, "crop": f"{args.crop}x{args.crop}",
               "exact ms": time_it(lambda: crfrnn.exact_gaussian_filter(feats, vals), device, 2),
               "lattice ms": time_it(lambda: crfrnn.Lattice(feats, backend="native").filter(vals), device, args.repeats)}
        for norm in ("none", "after", "symmetric"):
            exact = crfrnn.exact_gaussian_filter(feats, vals, norm).double()
            err = (lat.filter(vals, norm).double() - exact).norm() / exact.norm()
            row[f"rel err {norm}"] = float(err)
        row["exact/lattice x"] = row["exact ms"] / row["lattice ms"]
        exact_rows.append(row)

    print_table("Lattice build and filter (median ms)", rows,
                ["features", "backend", "N", "vertices", "vertices/px", "build ms", "filter ms",
                 "fwd+bwd ms", "lattice MB", "peak MB"])
    print_table("Peer time / native time (higher = native faster)", ratios,
                ["features", "N", "peer", "build x", "filter x", "fwd+bwd x"])
    print_table("Exact O(P^2) filter on a crop (build+filter for the lattice)", exact_rows,
                ["features", "crop", "exact ms", "lattice ms", "exact/lattice x", "rel err none",
                 "rel err after", "rel err symmetric"])
    write_json(args.json, {"environment": environment(device), "image": source, "rows": rows,
                           "ratios": ratios, "exact": exact_rows})


if __name__ == "__main__":
    run_main(main, get_args_parser())
