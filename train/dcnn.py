"""Stage 1: train the DCNN alone (DeepLab's recipe), then evaluate it.

    python train/dcnn.py                                     # synthetic data, CPU, ~1-2 minutes
    python train/dcnn.py --dataset voc --data-root DATA --sbd-root SBD \
        --vgg-weights vgg16-397923af.pth                     # the paper: train_aug, 6000 iterations
    torchrun --nproc_per_node=4 train/dcnn.py --dataset voc ...

Loss: per-position cross-entropy of the stride-8 scores against the ground truth subsampled by 8
(void ignored; ``--dcnn-loss full`` compares the upsampled scores with the full labels). VOC defaults: SGD momentum 0.9, weight decay 5e-4, lr 1e-3 (×10 on fc8),
×0.1 every 2000 iterations, batch 20, 6000 iterations, 321×321 crops of randomly scaled,
flipped images. Writes OUT/model.pt (for train/crf.py, train/joint.py --init, evaluate.py,
segment.py), OUT/checkpoint.pt (for --resume), OUT/metrics.json, OUT/metrics.csv.
"""
if __package__ in (None, ""):  # run as a file: put the repository root first on sys.path
    import _repo_path  # noqa: F401  (train/_repo_path.py)

import argparse

import models
from train import engine, options, runner
from train.checkpoint import load_training_state

SCRIPT_DEFAULTS = {"synthetic": dict(), "voc": dict()}


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(
        description="Stage 1: train DeepLab (atrous VGG-16) alone. Options left unset take "
                    "per-dataset defaults: the paper's recipe for --dataset voc, a small fast "
                    "setting for the synthetic default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, add_help=add_help)
    options.add_data_args(p)
    options.add_model_args(p)
    options.add_optim_args(p)
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from the DCNN of this models checkpoint (fine-tuning)")
    options.add_run_args(p, "runs/dcnn")
    return p


def main(args):
    info, out, timer, train_set, val_set, names, val_loader, logger = runner.start_training(
        args, SCRIPT_DEFAULTS)
    if args.init:
        net, _ = runner.load_model(args.init)
    else:
        net = options.build_net(args)
    net.to(info.device)
    state = None
    if args.resume:
        state = load_training_state(args.resume, net)
        runner.check_resume_args(state.get("args", {}), args)
        runner.log(f"resuming {args.resume} at iteration {state['iteration']}")
    summary = runner.train_dcnn(args, info, net, train_set, val_loader, logger, args.iters,
                                out / "checkpoint.pt", resume_state=state, stop_at=args.stop_at)
    if summary["stopped"]:
        runner.log(f"stopped after iteration {args.stop_at}; continue with --resume {out / 'checkpoint.pt'}")
        return None
    res, examples = engine.evaluate(net, val_loader, args.num_classes, info.device, bands=args.bands,
                                    class_names=names, amp=args.amp, num_examples=6,
                                    progress=not args.no_progress)
    if info.is_main:
        models.save_checkpoint(out / "model.pt", net)
        runner.write_json(out / "metrics.json", {"dcnn": res["dcnn"], "train": summary,
                                                 "seconds": timer()})
        runner.examples_png(out / "examples.png", {"DCNN": (examples, "dcnn")})
        print(runner.format_table([("DCNN", res["dcnn"])]))
        print(f"wrote {out / 'model.pt'}, {out / 'metrics.json'}, {out / 'examples.png'}")
    return res


if __name__ == "__main__":
    runner.run_main(main, get_args_parser())
