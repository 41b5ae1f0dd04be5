"""Segment image files with a trained checkpoint: label PNGs (VOC palette, pixel value = class)
and overlay PNGs, with or without the CRF.

    python train/segment.py photo.jpg more/ --checkpoint runs/joint/model.pt --out-dir seg
    python train/segment.py                 # no inputs: segments a few synthetic demo images

For each input NAME.EXT it writes OUT/NAME.png (palette label map; with --no-crf, the DCNN's) and
OUT/NAME_overlay.png (the colours blended over the image); with --both, also OUT/NAME_dcnn.png.
"""
if __package__ in (None, ""):  # run as a file: put the repository root first on sys.path
    import _repo_path  # noqa: F401  (train/_repo_path.py)

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import models
from train import distributed as dist_utils
from train import engine, options
from train.checkpoint import load_model
from train.data import SyntheticShapes
from train.data.transforms import Normalize, to_tensors
from train.process import run_main
from train.visualize import label_image, overlay, save_image_atomic

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def get_args_parser(add_help=True):
    p = options.parser("Segment images with a DeepLab / DeepLab+CRF checkpoint: writes label PNGs "
                       "(VOC palette) and overlays.", add_help)
    p.add_argument("inputs", nargs="*",
                   help="image files and/or folders (searched for images, not recursively); none: "
                        "--demo synthetic images are written to OUT/inputs and segmented")
    p.add_argument("--checkpoint", default="runs/joint/model.pt",
                   help="a model checkpoint (model.pt, dcnn.pt or checkpoint.pt of any train/ script)")
    p.add_argument("--out-dir", default="runs/segment", help="where the PNGs go")
    p.add_argument("--no-crf", action="store_true", help="the DCNN's labels, without the CRF")
    p.add_argument("--both", action="store_true", help="also write the DCNN's labels as NAME_dcnn.png")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the label colours")
    p.add_argument("--demo", type=int, default=4, help="synthetic images to segment when no input is given")
    p.add_argument("--image-size", type=int, default=64, help="size of the synthetic demo images")
    p.add_argument("--crf-preset", default="synthetic", choices=tuple(options.CRF_PRESETS),
                   help="CRF parameters when the checkpoint has no CRF")
    p.add_argument("--crf-eval-iters", type=int, default=10, help="mean-field iterations")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def list_inputs(inputs) -> list:
    """Image paths from files and folders; ``FileNotFoundError``/``ValueError`` when none."""
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS and q.is_file())
            if not found:
                raise ValueError(f"folder {p} holds no images ({', '.join(IMAGE_EXTS)})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    return paths


def write_demo_inputs(folder: Path, n: int, size: int) -> list:
    ds = SyntheticShapes(n, size=size, split="test", seed=0)
    out = []
    for i in range(n):
        path = folder / f"demo_{i}.png"
        save_image_atomic(Image.fromarray(ds[i][0]), path)
        out.append(path)
    return out


def main(args):
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint} not found (train one first, e.g. "
                                "python train/joint.py, or pass --checkpoint)")
    info = dist_utils.init_distributed(args.device)
    out = Path(args.out_dir)
    paths = list_inputs(args.inputs) if args.inputs else write_demo_inputs(out / "inputs", args.demo,
                                                                            args.image_size)
    net, crf = load_model(args.checkpoint)
    if crf is None and not args.no_crf:
        preset = options.CRF_PRESETS[args.crf_preset]
        crf = options.crf_layer(net.config["num_classes"], preset["bilateral"], preset["spatial"],
                                args.crf_eval_iters, args.crf_eval_iters)
    if crf is not None:
        crf.num_eval_iterations = args.crf_eval_iters
    model = models.DeepLabCRF(net, crf).to(info.device).eval()
    norm = Normalize()
    written = []
    for path in tqdm(paths, desc="segment", disable=args.no_progress, dynamic_ncols=True):
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise ValueError(f"{path}: not a readable image ({e})") from e
        x, _ = norm(*to_tensors(rgb, np.zeros(rgb.shape[:2], np.int64)))
        with torch.no_grad():
            res = engine.forward_eval(model, x[None].to(info.device), use_crf=not args.no_crf)
        dcnn = res["unary"][0].argmax(0).cpu().numpy()
        lab = dcnn if res["crf"] is None else res["crf"][0].argmax(0).cpu().numpy()
        stem = out / path.stem
        if stem.with_suffix(".png").resolve() == path.resolve():
            raise ValueError(f"writing {stem.with_suffix('.png')} would overwrite the input: choose "
                             "another --out-dir")
        save_image_atomic(label_image(lab), stem.with_suffix(".png"))
        save_image_atomic(Image.fromarray(overlay(rgb, lab, args.alpha)), Path(f"{stem}_overlay.png"))
        written.append(stem.with_suffix(".png"))
        if args.both:
            save_image_atomic(label_image(dcnn), Path(f"{stem}_dcnn.png"))
    print(f"wrote {len(written)} label PNGs and overlays to {out}")
    return written


if __name__ == "__main__":
    run_main(main, get_args_parser())
