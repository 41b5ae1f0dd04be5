"""Benchmark of DeepLab-LargeFOV and DeepLab-LargeFOV + CRF-RNN: images/s, and the CRF's share.

For each input size and batch size: inference (eval mode, no grad) and one training step
(forward, loss, backward, SGD step), for the DCNN alone and with the CRF layer (DeepLab's kernel
parameters: 10 mean-field iterations in inference, 5 in training, CRF-RNN's convention, or the
counts given by --crf-iterations). The runs of one (size, batch, mode) group are interleaved
(DCNN, DCNN+CRF, DCNN, ...) so that a shared, busy machine slows them alike. The peer is the paper's anchor (Chen et
al. 2015, stated, not measured here): DeepLab-LargeFOV runs at 8 images/s in test and 3 images/s
in training at 306x306 on a 2014 GPU (the DCNN alone; its CRF ran on the CPU, about 0.5 s/image).

Losses: DCNN alone, the paper's: cross-entropy on the stride-8 scores against labels subsampled
by 8; with the CRF, CRF-RNN's: cross-entropy on the refined full-size logits. The weights are
random (no ImageNet file is needed: the time does not depend on the values). The input is a real
VOC image when ../shared/data is there (else a synthetic one), ImageNet-normalised.

    python bench/model.py                                   # CPU: batch 1, 306 and 321, ~1-2 min
    python bench/model.py --device cuda --batch 1 10 --repeats 10 --json gpu.json
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

# common first: it puts the repository on sys.path (for models and train)
from common import (add_device_option, add_json_option, chosen_device, environment, load_rgb, print_table, run_main,
                    synchronize, write_json)
import crfrnn
import models

#: The paper's speeds for DeepLab-LargeFOV at 306x306 (images/s, the DCNN on a 2014 GPU).
PAPER_IMAGES_PER_S = {"infer": 8.0, "train": 3.0}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_option(p)
    add_json_option(p)
    p.add_argument("--sizes", type=int, nargs="+", default=[306, 321],
                   help="square input sizes (default: 306 321)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch sizes (default: 1 on cpu, 1 10 on cuda)")
    p.add_argument("--modes", nargs="+", choices=["infer", "train"], default=["infer", "train"],
                   help="what to time (default: both)")
    p.add_argument("--crf-iterations", type=int, nargs="*", default=None,
                   help="mean-field iterations of the CRF rows, for both modes (default: 10 for "
                        "inference, 5 for training; give none for the DCNN only)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions, median reported (default: 1 on cpu, 10 on cuda)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--width", type=float, default=1.0,
                   help="channel width of the net (default 1.0 = the paper's; <1 for a quick look)")
    p.add_argument("--num-classes", type=int, default=21, help="classes (default: 21, VOC)")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the DCNN (the CRF computes in float32 regardless)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def make_inputs(size, batch, num_classes, device):
    rgb, source = load_rgb(size=(size, size))                              # [1, 3, H, W] 0..255
    mean = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    x = ((rgb / 255 - mean) / std).repeat(batch, 1, 1, 1).to(device)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (batch, size, size), generator=gen).to(device)
    return x, labels, source


def run_once(joint, x, labels, mode, optimizer, amp):
    """One inference or one training step of `joint` (a DeepLabCRF; use_crf says which)."""
    autocast = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp)
    if mode == "infer":
        with torch.no_grad(), autocast:
            out = joint(x)
            return (out["crf"] if out["crf"] is not None else out["unary"]).argmax(1)
    with autocast:
        out = joint(x)
    if out["crf"] is not None:
        loss = F.cross_entropy(out["crf"].float(), labels, ignore_index=255)
    else:   # the paper's loss: stride-8 scores against the labels subsampled by 8
        coarse = out["coarse"].float()
        loss = F.cross_entropy(coarse, labels[:, ::8, ::8][:, :coarse.shape[2], :coarse.shape[3]],
                               ignore_index=255)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def time_group(fns, device, repeats, warmup):
    """Median ms of each fn in `fns`, the runs interleaved (a, b, a, b, ...) after warm-up."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    synchronize(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            synchronize(device)
            t.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def main(args):
    device = chosen_device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batch or ([1] if device.type == "cpu" else [1, 10])
    repeats = args.repeats or (1 if device.type == "cpu" else 10)
    torch.manual_seed(0)
    net = models.deeplab("largefov", num_classes=args.num_classes, width=args.width).to(device)
    crf = crfrnn.CRFRNNLayer.deeplab_largefov(args.num_classes, image_mean=models.IMAGENET_MEAN,
                                              image_std=models.IMAGENET_STD).to(device)
    joint = models.DeepLabCRF(net, crf)
    # lr small so that a few steps on random labels keep the scores finite; the cost is the same
    optimizer = torch.optim.SGD(joint.parameters(), lr=1e-5, momentum=0.9, weight_decay=5e-4)
    default_counts = {"infer": [10], "train": [5]}

    groups = [(s, b, m) for s in args.sizes for b in batches for m in args.modes]
    rows, source = [], None
    for size, batch, mode in tqdm(groups, desc="timing", file=sys.stderr):
        counts = [None] + list(args.crf_iterations if args.crf_iterations is not None
                               else default_counts[mode])
        x, labels, source = make_inputs(size, batch, args.num_classes, device)
        joint.train(mode == "train")

        def runner(iters):
            def fn():
                joint.use_crf = iters is not None
                if iters is not None:
                    crf.num_iterations = crf.num_eval_iterations = iters
                return run_once(joint, x, labels, mode, optimizer, args.amp)
            return fn

        peaks = []
        if device.type == "cuda":      # peak memory of one run of each configuration
            for iters in counts:
                torch.cuda.reset_peak_memory_stats(device)
                runner(iters)()
                peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
        times = time_group([runner(i) for i in counts], device, repeats, args.warmup)
        dcnn_ms = times[0]
        for k, (iters, ms) in enumerate(zip(counts, times)):
            ips = batch * 1e3 / ms
            anchor = size == 306 and iters is None
            row = {"mode": mode, "size": f"{size}x{size}", "batch": batch,
                   "model": "DCNN" if iters is None else f"DCNN+CRF({iters} it)",
                   "ms/batch": ms, "images/s": ips,
                   "CRF share": "" if iters is None else f"{100 * (ms - dcnn_ms) / ms:.0f}%",
                   "paper img/s": PAPER_IMAGES_PER_S[mode] if anchor else "",
                   "ours/paper": ips / PAPER_IMAGES_PER_S[mode] if anchor else ""}
            if peaks:
                row["peak MB"] = peaks[k]
            rows.append(row)

    columns = ["mode", "size", "batch", "model", "ms/batch", "images/s", "CRF share", "paper img/s",
               "ours/paper"] + (["peak MB"] if device.type == "cuda" else [])
    env = environment(device)
    env["crf_backend"] = "native" if crfrnn.has_native_kernel(device) else "reference"
    print_table(f"DeepLab-LargeFOV (width {args.width:g}) on {device} ({env.get('gpu', 'CPU')}, "
                f"{torch.get_num_threads()} threads), CRF backend {env['crf_backend']}, "
                f"median of {repeats}, input: {source}", rows, columns)
    print("paper: 8 img/s test, 3 img/s train at 306x306 on a 2014 GPU (DCNN only), stated in "
          "Chen et al. 2015; CRF share = (t_with_crf - t_dcnn) / t_with_crf")
    write_json(args.json, {"benchmark": "model", "environment": env, "args": vars(args),
                           "repeats": repeats, "input": source, "rows": rows,
                           "paper_images_per_s_306": PAPER_IMAGES_PER_S})
    return rows


if __name__ == "__main__":
    run_main(main, get_args_parser())
