"""End-to-end training of DeepLab + CRF-RNN, the main job: without --init a DCNN stage first
(DeepLab's recipe), then the DCNN alone and with the CRF at its initial parameters are evaluated
("before"), both are trained jointly through the CRF (CRF-RNN's recipe: the loss on the CRF's
full-resolution output), evaluated again ("after"), and the table printed. Recipes: train/README.md.
"""
if __package__ in (None, ""):  # run as a file: put the repository root first on sys.path
    import _repo_path  # noqa: F401  (train/_repo_path.py)

import functools
import torch

import models
from train import engine, options, reports
from train.checkpoint import load_model
from train.process import log, run_main


def get_args_parser(add_help=True):
    p = options.parser(
        "Train DeepLab + CRF-RNN end to end and report what the CRF adds (mIoU and boundary "
        "accuracy, DCNN alone vs with the CRF, before vs after joint training). Defaults depend on "
        "--dataset: the papers' recipe for voc, a small fast setting for synthetic.", add_help)
    options.add_data_args(p)
    options.add_model_args(p)
    options.add_crf_args(p)
    options.add_optim_args(p)
    g = p.add_argument_group("stages")
    g.add_argument("--init", default=None, metavar="CKPT",
                   help="start from this checkpoint: a DCNN (train/dcnn.py) or DCNN+CRF (train/crf.py, "
                        "this script); skips the DCNN stage")
    options.add_pretrain_args(g)
    g.add_argument("--unary-loss-weight", type=float, default=0.0,
                   help="also add this times the DCNN's own stride-8 loss to the joint loss (CRF-RNN: 0)")
    g.add_argument("--freeze-crf", action="store_true",
                   help="train only the DCNN through the fixed CRF (gradients still flow through it)")
    options.add_run_args(p, "runs/joint")
    g = p.add_argument_group("report")
    g.add_argument("--examples", type=int, default=6, help="rows in examples.png")
    return options.set_presets(p, "joint")


def main(args):
    options.finalize(args)
    crf = engine.build_crf(args)              # (bad CRF options end the run here, before any work)
    pretrains = not args.init and args.pretrain_iters > 0
    run = engine.TrainingRun(args, ["dcnn.pt"] * pretrains + ["model.pt", "metrics.json", "examples.png", "bands.png"])
    info, out, resumed = run.info, run.out, run.resumed

    # ---- the DCNN (and maybe a CRF) to start from; stage 1: the DCNN alone
    if args.init:
        net, init_crf, _ = load_model(args.init, args.num_classes)
        crf = init_crf or crf
        log(f"initialised from {args.init}" + (" (with its CRF)" if init_crf is not None else ""))
    else:
        net = engine.build_net(args)
    net.to(info.device)
    if pretrains:
        resumed = run.pretrain_dcnn(net)

    # ---- DCNN + CRF, "before"
    joint = models.DeepLabCRF(net, crf).to(info.device)
    if args.freeze_crf:
        joint.freeze_crf()
    if resumed is not None:   # the "before" evaluation is kept in the checkpoint (its pictures as tensors)
        before, before_examples = resumed["extra"]["before"], resumed["extra"]["before_examples"]
    else:
        before, before_examples = run.evaluate(joint, args.examples, "eval before")
        log(reports.format_table([("DCNN", before["dcnn"]), ("DCNN + CRF", before["crf"])]))

    # ---- stage 2: joint training
    log(f"stage 2: joint DCNN + CRF-RNN, {args.iters} iterations")
    loss = functools.partial(engine.joint_loss, unary_weight=args.unary_loss_weight, loss=args.crf_loss)
    summary = run.train(joint, loss, "joint", args.iters, args.lr, resume=resumed is not None, stop_at=args.stop_at,
                        extra={"before": before, "before_examples": before_examples})
    if summary["stopped"]:
        return None

    after, after_examples = run.evaluate(joint, args.examples, "eval after")
    rows = [("DCNN alone, before joint training", before["dcnn"]),
            ("DCNN + CRF, before joint training", before["crf"]),
            ("DCNN alone, after joint training", after["dcnn"]),
            ("DCNN + CRF, after joint training", after["crf"])]
    if info.is_main:
        models.save_checkpoint(out.claim("model.pt"), joint, data=run.data)
        reports.write_json(out.claim("metrics.json"), {"before": before, "after": after, "train": summary,
                                                       "seconds": run.seconds(), "args": vars(args),
                                                       "crf": _crf_params(joint.crf)})
        reports.band_plot(out.claim("bands.png"), dict(rows))
        reports.examples_png(out.claim("examples.png"), {
            "DCNN before": (before_examples, "dcnn"), "+CRF before": (before_examples, "crf"),
            "DCNN after": (after_examples, "dcnn"), "+CRF after": (after_examples, "crf")}, run.class_names)
        print(f"\nPASCAL-style evaluation on {len(run.val_set)} {args.dataset} validation images "
              f"(void ignored); {run.seconds():.0f} s in all")
        print(reports.format_table(rows))
        print(f"wrote {out.listing()}")
    return {"before": before, "after": after}


def _crf_params(crf) -> dict:
    """The CRF's bandwidths, kernel weights and compatibility, for the report."""
    out = {"bilateral": list(crf.bilateral), "spatial": list(crf.spatial)}
    for name in ("bilateral_weight", "spatial_weight", "compatibility"):
        t = getattr(crf, name, None)
        if isinstance(t, torch.Tensor):
            out[name] = t.detach().cpu().tolist()
    return out


if __name__ == "__main__":
    run_main(main, get_args_parser())
