"""Evaluate a checkpoint with and without the CRF: mIoU (void ignored), per-class IoU, pixel
accuracy, and the accuracy within a band around object boundaries against its width (DeepLab's
trimap figure). A checkpoint whose model computes NaN or infinite values is an error, not a table.
"""
if __package__ in (None, ""):  # run as a file: put the repository root first on sys.path
    import _repo_path  # noqa: F401  (train/_repo_path.py)

from train import engine, options, reports
from train.checkpoint import describe_data
from train.process import log, open_output_dir, run_main, setup


def get_args_parser(add_help=True):
    p = options.parser("Evaluate a DeepLab / DeepLab+CRF checkpoint: mIoU, per-class IoU, pixel "
                       "accuracy and boundary-band (trimap) accuracy, with and without the CRF.", add_help)
    p.add_argument("--examples", type=int, default=6, help="rows in examples.png")
    options.add_data_args(p, training=False)
    options.add_checkpoint_args(p)
    options.add_run_args(p, "runs/eval", training=False)
    return options.set_presets(p, "evaluate")


def main(args):
    options.finalize(args)
    model, trained_on = engine.load_for_inference(args, args.num_classes)
    args.num_classes = model.net.config["num_classes"]
    info = setup(args)
    out = open_output_dir(args, ["metrics.json", "bands.png", "examples.png"])
    note_other_data(args, trained_on)
    _, val_set, names = engine.make_sets(args, train=False)
    loader = engine.eval_loader(val_set, info, args.eval_batch_size, args.workers)
    try:
        res, examples = engine.evaluate(model.to(info.device), loader, info.device, args.num_classes, args.bands,
                                        amp=args.amp, progress=not args.no_progress, class_names=names,
                                        num_examples=args.examples, use_crf=not args.no_crf)
    except engine.NonFiniteOutputError as e:
        raise engine.NonFiniteOutputError(f"{args.checkpoint}: {e}") from e
    if info.is_main:
        rows = [("DCNN", res["dcnn"])] + ([("DCNN + CRF", res["crf"])] if "crf" in res else [])
        reports.write_json(out.claim("metrics.json"), {"checkpoint": str(args.checkpoint), "dataset": args.dataset,
                                                       "images": len(val_set), **res})
        reports.band_plot(out.claim("bands.png"), dict(rows))
        columns = {name: (examples, key) for name, key in (("DCNN", "dcnn"), ("DCNN + CRF", "crf")) if key in res}
        reports.examples_png(out.claim("examples.png"), columns, names)
        print(f"{args.checkpoint} on {len(val_set)} {args.dataset} images:")
        print(reports.format_table(rows))
        print(reports.per_class_table(rows))
        print(f"wrote {out.listing()}")
    return res


def note_other_data(args, trained_on):
    """Say so when the checkpoint was trained on other data than it is evaluated on."""
    if trained_on is None:
        return
    if trained_on["dataset"] != args.dataset:
        log(f"note: {args.checkpoint} was trained on {describe_data(trained_on)}; evaluating on {args.dataset}")
    elif args.dataset == "synthetic" and trained_on.get("image_size") != args.image_size:
        log(f"note: {args.checkpoint} was trained on {trained_on.get('image_size')}-px synthetic images; "
            f"evaluating on {args.image_size}-px ones (--image-size)")


if __name__ == "__main__":
    run_main(main, get_args_parser())
