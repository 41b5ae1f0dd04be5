"""Stage 1: train the DCNN alone (DeepLab's recipe and loss: cross-entropy of the stride-8 scores
against the labels subsampled by 8), then evaluate it. Recipes: train/README.md.
"""
if __package__ in (None, ""):  # run as a file: put the repository root first on sys.path
    import _repo_path  # noqa: F401  (train/_repo_path.py)

import models
from train import engine, options, reports
from train.checkpoint import load_model
from train.process import run_main


def get_args_parser(add_help=True):
    p = options.parser("Stage 1: train DeepLab (atrous VGG-16) alone. Defaults depend on --dataset: "
                       "the paper's recipe for voc, a small fast setting for synthetic.", add_help)
    options.add_data_args(p)
    options.add_model_args(p)
    options.add_optim_args(p)
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from the DCNN of this model checkpoint (fine-tuning; none: a fresh net)")
    options.add_run_args(p, "runs/dcnn")
    return options.set_presets(p, "dcnn")


def main(args):
    options.finalize(args)
    run = engine.TrainingRun(args, ["model.pt", "metrics.json", "examples.png"])
    net = load_model(args.init, args.num_classes).net if args.init else engine.build_net(args)
    net.to(run.info.device)
    summary = run.train_dcnn(net, args.iters, args.lr, resume=run.resumed is not None, stop_at=args.stop_at)
    if summary["stopped"]:
        return None
    res, examples = run.evaluate(net, num_examples=6)
    if run.info.is_main:
        models.save_checkpoint(run.out.claim("model.pt"), net, data=run.data)
        reports.write_json(run.out.claim("metrics.json"), {"dcnn": res["dcnn"], "train": summary,
                                                           "seconds": run.seconds()})
        reports.examples_png(run.out.claim("examples.png"), {"DCNN": (examples, "dcnn")}, run.class_names)
        print(reports.format_table([("DCNN", res["dcnn"])]))
        print(f"wrote {run.out.listing()}")
    return res


if __name__ == "__main__":
    run_main(main, get_args_parser())
