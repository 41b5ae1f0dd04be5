"""Accuracy of the CRF layer vs densecrf on the 46 shared VOC images (coarse-unary protocol).

For each image of ../shared/data/VOCdevkit/VOC2012 (val.txt order), DCNN-like unary logits are
made from the ground truth (bench/voc_protocol.py, seeded by the image's index); then the unary's
argmax, our layer (at its densecrf-equivalent start) and pydensecrf2's DenseCRF2D are scored:
mIoU over the 21 classes, and pixel accuracy within --band px of a label boundary (void
excluded), plus how often our labels agree with densecrf's. Reference figures for densecrf with
DeepLab's parameters (measured by this script; README, Results): 77.7 -> 79.9 mIoU, boundary band 71.7% -> 76.1%.

    python bench/crf_accuracy.py                       # all 46, DeepLab-LargeFOV parameters
    python bench/crf_accuracy.py --limit 5 --scale 2   # quick look
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# common first: it puts the repository on sys.path (for models and train)
from common import (CRF_PARAMS, VOC_ROOT, add_device_option, add_json_option, chosen_device, environment, print_table,
                    run_main, write_json)
import crfrnn
import densecrf_peer
from train.metrics import ConfusionMatrix, boundary_distance
import voc_protocol as vp


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_option(p)
    add_json_option(p)
    p.add_argument("--root", default=str(VOC_ROOT), help="VOC2012 folder (default: ../shared/data/...)")
    p.add_argument("--params", choices=sorted(CRF_PARAMS), default="deeplab",
                   help="kernel parameters (default: deeplab, w1 4, 121, 5, w2 3, 3)")
    p.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    p.add_argument("--normalize", default="symmetric", choices=["symmetric", "after"],
                   help="kernel normalisation, ours and densecrf's (default: symmetric)")
    p.add_argument("--band", type=int, default=8, help="boundary band width in px (default: 8)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--scale", type=int, default=1, help="shrink images by this integer factor")
    p.add_argument("--skip-densecrf", action="store_true", help="do not run pydensecrf2")
    return p


def main(args):
    device = chosen_device(args)
    root = Path(args.root)
    if not (root / "ImageSets" / "Segmentation" / "val.txt").is_file():
        raise SystemExit(f"no VOC val set at {root} (expected ImageSets/Segmentation/val.txt)")
    params = CRF_PARAMS[args.params]
    run_dense = not args.skip_densecrf and densecrf_peer.available()
    ids = vp.image_ids(root)[: args.limit]
    crf = crfrnn.CRFRNNLayer(vp.NUM_CLASSES, num_eval_iterations=args.iterations,
                             normalize=args.normalize, **params).to(device).eval()
    methods = ["unary", "ours"] + (["densecrf"] if run_dense else [])
    conf = {m: ConfusionMatrix(vp.NUM_CLASSES) for m in methods}
    band = {m: ConfusionMatrix(vp.NUM_CLASSES) for m in methods}
    seconds = {m: 0.0 for m in methods}
    agree = []
    for index, image_id in enumerate(tqdm(ids, desc="images")):
        image, label = vp.downscale_pair(*vp.load_pair(root, image_id), args.scale)
        logits = vp.coarse_logits(label, index).numpy()
        preds = {"unary": logits.argmax(0)}
        start = time.perf_counter()
        with torch.no_grad():
            out = crf(torch.from_numpy(logits)[None].to(device),
                      torch.from_numpy(image.copy()).permute(2, 0, 1)[None].to(device))
            preds["ours"] = out[0].argmax(0).cpu().numpy()
        seconds["ours"] += time.perf_counter() - start
        if run_dense:
            start = time.perf_counter()
            qd = densecrf_peer.densecrf_probs(image, logits, args.iterations, normalize=args.normalize,
                                              **params)
            seconds["densecrf"] += time.perf_counter() - start
            preds["densecrf"] = qd.argmax(0)
            agree.append(float((preds["ours"] == preds["densecrf"]).mean()))
        far = boundary_distance(label) > args.band
        for m in methods:
            conf[m].update(preds[m], label)
            band[m].update(preds[m], np.where(far, vp.VOID, label))   # the pixels near a boundary

    rows = [{"method": m, "mIoU %": 100 * conf[m].miou(), "pixel acc %": 100 * conf[m].pixel_accuracy(),
             f"band {args.band}px acc %": 100 * band[m].pixel_accuracy(),
             "s/image": seconds[m] / len(ids) if m != "unary" else ""} for m in methods]
    print(f"\n{len(ids)} images from {root}, scale 1/{args.scale}, params {args.params} {params}, "
          f"{args.iterations} iterations, normalize {args.normalize}; {environment(device)}")
    print_table("Coarse-unary protocol: unary vs CRFs", rows,
                ["method", "mIoU %", "pixel acc %", f"band {args.band}px acc %", "s/image"])
    if agree:
        print(f"ours vs densecrf label agreement: mean {100 * np.mean(agree):.3f}%, "
              f"worst image {100 * np.min(agree):.3f}%")
    write_json(args.json, {"environment": environment(device), "images": len(ids), "scale": args.scale,
                           "params": {"name": args.params, **params}, "iterations": args.iterations,
                           "normalize": args.normalize, "rows": rows,
                           "agreement": {"mean": float(np.mean(agree)), "min": float(np.min(agree))}
                           if agree else None})


if __name__ == "__main__":
    run_main(main, get_args_parser())
