"""Segment image files with a trained checkpoint: label PNGs (VOC palette, pixel value = class)
and overlays, with or without the CRF; without inputs, demo images of the synthetic set the
checkpoint was trained on. Output names and folders: train/README.md, "segment.py"."""
if __package__ in (None, ""):  # run as a file: put the repository root first on sys.path
    import _repo_path  # noqa: F401  (train/_repo_path.py)

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train import engine, options
from train.checkpoint import describe_data
from train.data import SyntheticShapes
from train.data.images import read_rgb
from train.data.transforms import Normalize, to_tensors
from train.process import open_output_dir, progress_bar, run_main, setup
from train.reports import label_image, overlay, save_image_atomic

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def get_args_parser(add_help=True):
    p = options.parser("Segment images with a DeepLab / DeepLab+CRF checkpoint: writes label PNGs "
                       "(VOC palette) to OUT/labels/NAME.png and overlays to OUT/overlays/NAME.png. NAME is "
                       "the input's name without its extension, with it when two inputs share a name "
                       "(cat.jpg, cat.png), and with its folders when they share the file name too. "
                       "Files already in OUT are never replaced without --overwrite, inputs never.", add_help)
    p.add_argument("inputs", nargs="*",
                   help="image files and/or folders (searched for images, not recursively); none: "
                        "--demo synthetic images are written to OUT/inputs and segmented")
    p.add_argument("--both", action="store_true", help="also write the DCNN's labels to OUT/labels_dcnn/")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the label colours")
    p.add_argument("--demo", type=int, default=4, help="synthetic images to segment when no input is given")
    p.add_argument("--image-size", type=int, default=None,
                   help="size of the synthetic demo images (none: the size the checkpoint was trained on)")
    options.add_checkpoint_args(p, preset_none=" (none: the preset of the data it was trained on)")
    options.add_output_args(p, "runs/segment", "the PNGs (in labels/, overlays/, ...)")
    return p


def list_inputs(inputs) -> list:
    """Image paths from files and folders, each file once; ``FileNotFoundError``/``ValueError``
    when one is missing or a folder holds no images."""
    paths, seen = [], set()
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(q for q in item.iterdir() if q.suffix.lower() in IMAGE_EXTS and q.is_file())
            if not found:
                raise ValueError(f"folder {item} holds no images ({', '.join(IMAGE_EXTS)})")
        elif item.is_file():
            found = [item]
        else:
            raise FileNotFoundError(f"input {item} does not exist")
        for q in found:
            if q.resolve() not in seen:
                seen.add(q.resolve())
                paths.append(q)
    return paths


def output_names(paths) -> list:
    """The output NAME of each input: its stem; with the extension where stems collide; with as
    many parent folders as it takes where file names collide too (compared case-insensitively).
    ``ValueError`` when two inputs differ only in letter case."""
    parts = [Path(os.path.abspath(p)).parts[1:] for p in paths]      # without the root

    def name(k, i):  # k = 0: the stem; k >= 1: the last k parts of the path
        return Path(parts[i][-1]).stem if k == 0 else "/".join(parts[i][-k:])

    depth = [0] * len(paths)
    while True:
        groups = {}
        for i in range(len(paths)):
            groups.setdefault(name(depth[i], i).casefold(), []).append(i)
        clashes = [group for group in groups.values() if len(group) > 1]
        if not clashes:
            return [name(depth[i], i) for i in range(len(paths))]
        for group in clashes:
            longer = [i for i in group if depth[i] < len(parts[i])]
            if not longer:
                raise ValueError(f"inputs {paths[group[0]]} and {paths[group[1]]} differ only in letter case: "
                                 "their outputs would clash; segment them in separate runs (separate --out-dir)")
            for i in longer:
                depth[i] += 1


def demo_images(trained_on, n: int, size: int | None, num_classes: int, checkpoint) -> list:
    """``[(file name in OUT, uint8[H, W, 3])]``: ``n`` test images of the synthetic set the
    checkpoint was trained on (its classes, image size and seed); ``ValueError`` for other data."""
    if trained_on is not None and trained_on["dataset"] != "synthetic":
        raise ValueError(f"no inputs given, and the demo segments synthetic shapes, but {checkpoint} was trained "
                         f"on {describe_data(trained_on)}: give image files or folders to segment")
    ds = SyntheticShapes(n, size=size or (trained_on or {}).get("image_size") or 64, num_classes=num_classes,
                         split="test", seed=(trained_on or {}).get("data_seed", 0))
    return [(f"inputs/demo_{i}.png", ds[i][0]) for i in range(n)]


def main(args):
    options.finalize(args)
    model, trained_on = engine.load_for_inference(args, None)
    demo = None if args.inputs else demo_images(trained_on, args.demo, args.image_size,
                                                model.net.config["num_classes"], args.checkpoint)
    paths = list_inputs(args.inputs) if demo is None else [Path(args.out_dir) / f for f, _ in demo]
    names = output_names(paths) if demo is None else [Path(f).stem for f, _ in demo]
    kinds = ["labels", "overlays"] + (["labels_dcnn"] if args.both else [])
    planned = {kind: [f"{kind}/{n}.png" for n in names] for kind in kinds}    # {kind: [file in OUT per input]}
    for path in paths if demo is None else ():  # every input readable before anything is written
        read_rgb(path)
    info = setup(args)
    out = open_output_dir(args, [f for f, _ in demo or []] + [f for files in planned.values() for f in files],
                          protect=paths if demo is None else ())
    if demo is None and trained_on is not None and trained_on["dataset"] == "synthetic":
        print(f"note: {args.checkpoint} was trained on {describe_data(trained_on)}: on other images expect "
              "mostly background")
    for file, image in demo or []:
        save_image_atomic(Image.fromarray(image), out.claim(file))
    model.to(info.device).eval()
    for k, path in enumerate(progress_bar(paths, desc="segment", enabled=not args.no_progress)):
        rgb = read_rgb(path)
        labels, dcnn_labels = segment(model, rgb, info.device, not args.no_crf, args.checkpoint)
        save_image_atomic(label_image(labels), out.claim(planned["labels"][k]))
        save_image_atomic(Image.fromarray(overlay(rgb, labels, args.alpha)), out.claim(planned["overlays"][k]))
        if args.both:
            save_image_atomic(label_image(dcnn_labels), out.claim(planned["labels_dcnn"][k]))
    counts = [f"{len(files)} {'overlays' if kind == 'overlays' else 'label maps'} in {out.path(kind)}"
              for kind, files in planned.items()]
    if demo:
        counts.append(f"{len(demo)} demo inputs in {out.path('inputs')}")
    print(f"wrote {', '.join(counts)}")
    return out.claimed


def segment(model, rgb: np.ndarray, device, use_crf: bool, checkpoint):
    """``(labels, DCNN labels)``, both ``int64[H, W]``, of ``rgb`` (``uint8[H, W, 3]``); the
    first is the CRF's when ``use_crf`` and the model has one."""
    x, _ = Normalize()(*to_tensors(rgb, np.zeros(rgb.shape[:2], np.int64)))
    with torch.no_grad():
        try:
            res = engine.forward_eval(model, x[None].to(device), use_crf=use_crf)
        except engine.NonFiniteOutputError as e:
            raise engine.NonFiniteOutputError(f"{checkpoint}: {e}") from e
    dcnn = res["unary"][0].argmax(0).cpu().numpy()
    return (dcnn if res["crf"] is None else res["crf"][0].argmax(0).cpu().numpy()), dcnn


if __name__ == "__main__":
    run_main(main, get_args_parser())
