"""Evaluate a checkpoint with and without the CRF: mIoU (void ignored), per-class IoU, pixel
accuracy, and the accuracy within a band around object boundaries as a function of its width
(DeepLab's trimap figure).

    python train/evaluate.py                                   # runs/joint/model.pt on synthetic val
    python train/evaluate.py --checkpoint runs/dcnn/model.pt --dataset voc --data-root DATA
    torchrun --nproc_per_node=2 train/evaluate.py ...          # images split over processes

A checkpoint without a CRF (train/dcnn.py) is evaluated with a CRF built from --crf-preset /
--bilateral / --spatial (DeepLab's post-processing). Writes OUT/metrics.json, OUT/bands.png
(accuracy vs band width, DCNN and DCNN + CRF) and OUT/examples.png (a file there from an earlier
run is replaced only with --overwrite). A checkpoint whose model computes NaN or infinite
values (broken parameters) is an error, not a table of metrics.
"""
if __package__ in (None, ""):  # run as a file: put the repository root first on sys.path
    import _repo_path  # noqa: F401  (train/_repo_path.py)

import os

import models
from train import engine, options, reports
from train.checkpoint import describe_data, load_model
from train.data import DATASETS
from train.distributed import log
from train.process import open_output_dir, run_main, setup


def get_args_parser(add_help=True):
    p = options.parser("Evaluate a DeepLab / DeepLab+CRF checkpoint: mIoU, per-class IoU, pixel "
                       "accuracy and boundary-band (trimap) accuracy, with and without the CRF.", add_help)
    p.add_argument("--checkpoint", default="runs/joint/model.pt",
                   help="a model checkpoint (model.pt, dcnn.pt or checkpoint.pt of any train/ script)")
    p.add_argument("--no-crf", action="store_true", help="evaluate the DCNN alone")
    p.add_argument("--examples", type=int, default=6, help="rows in examples.png")
    options.add_data_args(p, training=False)
    options.add_crf_args(p, training=False)
    options.add_run_args(p, "runs/eval", training=False)
    # The number of classes is the checkpoint's unless given.
    return options.set_presets(p, {ds: dict(num_classes=None) for ds in DATASETS})


OUTPUTS = ["metrics.json", "bands.png", "examples.png"]


def main(args):
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint} not found (train one first, e.g. "
                                "python train/joint.py, or pass --checkpoint)")
    net, crf, trained_on = load_model(args.checkpoint, args.num_classes)
    args.num_classes = net.config["num_classes"]
    info = setup(args)
    out = open_output_dir(args, OUTPUTS)
    note_other_data(args, trained_on)
    _, val_set, names = options.make_sets(args, train=False)
    loader = engine.make_eval_loader(val_set, info, args.eval_batch_size, args.workers)
    if crf is None and not args.no_crf:
        crf = options.crf_layer(args.num_classes, args.bilateral, args.spatial, args.crf_eval_iters,
                                args.crf_eval_iters)
        log(f"the checkpoint has no CRF: adding one with bilateral {args.bilateral}, spatial {args.spatial}")
    if crf is not None:
        crf.num_eval_iterations = args.crf_eval_iters
    model = models.DeepLabCRF(net, crf).to(info.device)
    try:
        res, examples = engine.evaluate(model, loader, args.num_classes, info.device, use_crf=not args.no_crf,
                                        bands=args.bands, class_names=names, amp=args.amp,
                                        num_examples=args.examples, progress=not args.no_progress)
    except engine.NonFiniteOutputError as e:
        raise engine.NonFiniteOutputError(f"{args.checkpoint}: {e}") from e
    if info.is_main:
        rows = [("DCNN", res["dcnn"])] + ([("DCNN + CRF", res["crf"])] if "crf" in res else [])
        reports.write_json(out.claim("metrics.json"), {"checkpoint": str(args.checkpoint), "dataset": args.dataset,
                                                       "images": len(val_set), **res})
        reports.band_plot(out.claim("bands.png"), dict(rows))
        cols = {"DCNN": (examples, "dcnn")}
        if "crf" in res:
            cols["DCNN + CRF"] = (examples, "crf")
        reports.examples_png(out.claim("examples.png"), cols, names)
        print(f"{args.checkpoint} on {len(val_set)} {args.dataset} images:")
        print(reports.format_table(rows))
        print(per_class_table(rows))
        print(f"wrote {out.listing()}")
    return res


def note_other_data(args, trained_on):
    """Say so when the checkpoint was trained on other data than it is evaluated on."""
    if trained_on is None:
        return
    same = trained_on["dataset"] == args.dataset
    if same and args.dataset == "synthetic" and trained_on.get("image_size") != args.image_size:
        log(f"note: {args.checkpoint} was trained on {trained_on.get('image_size')}-px synthetic images; "
            f"evaluating on {args.image_size}-px ones (--image-size)")
    elif not same:
        log(f"note: {args.checkpoint} was trained on {describe_data(trained_on)}; evaluating on {args.dataset}")


def per_class_table(rows) -> str:
    """Per-class IoU % for each row (classes absent from the set show as '-')."""
    names = list(rows[0][1]["per_class_iou"].keys())
    w = max(len(n) for n in names)
    head = "class".ljust(w) + "".join(f"  {r[0]:>12}" for r in rows)
    lines = [head]
    for n in names:
        vals = [r[1]["per_class_iou"][n] for r in rows]
        lines.append(n.ljust(w) + "".join(f"  {'-' if v is None else f'{100 * v:.2f}':>12}" for v in vals))
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main, get_args_parser())
