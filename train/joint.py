"""End-to-end training of DeepLab + CRF-RNN (the DCNN and the CRF as one network).

    python train/joint.py                       # synthetic data, a few minutes on 2 CPU cores
    python train/joint.py --dataset voc --data-root DATA --init runs/dcnn/model.pt
    torchrun --nproc_per_node=2 train/joint.py ...   # DistributedDataParallel

What it does:
1. (without --init) a short stage-1 run trains the DCNN alone (DeepLab's recipe and loss), so
   that joint training starts from a sensible unary; with --init it starts from a checkpoint
   of train/dcnn.py (a DCNN) or of train/crf.py / this script (DCNN + CRF);
2. evaluates the DCNN alone and DCNN + CRF (the CRF at its initial parameters: DeepLab's
   post-processing) — "before";
3. trains both jointly through the CRF (CRF-RNN's recipe: loss on the CRF's full-resolution
   output, 5 mean-field iterations in training, 10 at evaluation);
4. evaluates again — "after" — and prints the table, writing metrics.json, examples.png,
   bands.png (accuracy near boundaries vs band width), metrics.csv and model.pt to --out-dir.

--resume OUT/checkpoint.pt continues a killed run exactly (either stage).
"""
if __package__ in (None, ""):  # run as a file: put the repository root first on sys.path
    import _repo_path  # noqa: F401  (train/_repo_path.py)

import argparse
from pathlib import Path

import torch

import models
from train import distributed as dist_utils
from train import engine, options, runner
from train.checkpoint import load_training_state

# The synthetic default: ~5 minutes on 2 CPU cores in all.
SCRIPT_DEFAULTS = {
    "synthetic": dict(iters=300, lr=1e-4),
    "voc": dict(),
}
PRETRAIN_DEFAULTS = {"synthetic": 1500, "voc": 0}
# The CRF's C x C matrices are O(1-10): under Adam's per-step moves of ~lr they need a larger lr.
CRF_LR_MULT_DEFAULTS = {"synthetic": 10.0, "voc": 1.0}


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(
        description="Train DeepLab + CRF-RNN end to end and report what the CRF adds "
                    "(mIoU and boundary accuracy, DCNN alone vs with the CRF, before vs after joint "
                    "training). Options left unset take per-dataset defaults: the papers' recipe for "
                    "--dataset voc, a small fast setting for the synthetic default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, add_help=add_help)
    options.add_data_args(p)
    options.add_model_args(p)
    options.add_crf_args(p)
    options.add_optim_args(p)
    g = p.add_argument_group("stages")
    g.add_argument("--init", default=None, metavar="CKPT",
                   help="start from this checkpoint: a DCNN (train/dcnn.py) or DCNN+CRF (train/crf.py, "
                        "this script); skips the DCNN stage")
    g.add_argument("--pretrain-iters", type=int, default=None,
                   help="DCNN-alone iterations before joint training when there is no --init "
                        "(synthetic 1500, VOC 0: pass --init runs/dcnn/model.pt there)")
    g.add_argument("--pretrain-lr", type=float, default=None,
                   help="base lr of the DCNN stage (synthetic 1e-3; VOC: --lr)")
    g.add_argument("--unary-loss-weight", type=float, default=0.0,
                   help="also add this times the DCNN's own stride-8 loss to the joint loss (CRF-RNN: 0)")
    g.add_argument("--freeze-crf", action="store_true",
                   help="train only the DCNN through the fixed CRF (gradients still flow through it)")
    options.add_run_args(p, "runs/joint")
    g = p.add_argument_group("report")
    g.add_argument("--examples", type=int, default=6, help="rows in examples.png")
    return p


def main(args):
    info, out, timer, train_set, val_set, names, val_loader, logger = runner.start_training(
        args, SCRIPT_DEFAULTS)
    if args.pretrain_iters is None:
        args.pretrain_iters = PRETRAIN_DEFAULTS[args.dataset]
    if args.pretrain_lr is None:
        args.pretrain_lr = 1e-3 if args.dataset == "synthetic" else args.lr
    if args.crf_lr_mult is None:
        args.crf_lr_mult = CRF_LR_MULT_DEFAULTS[args.dataset]
    ckpt = out / "checkpoint.pt"

    resumed = runner.open_resume(args)

    # ---- the DCNN (and maybe a CRF) to start from
    if args.init:
        net, crf = runner.load_model(args.init)
        if net.config["num_classes"] != args.num_classes:
            raise ValueError(f"--init {args.init} has {net.config['num_classes']} classes, the data "
                             f"{args.num_classes}")
        runner.log(f"initialised from {args.init}" + (" (with its CRF)" if crf is not None else ""))
    else:
        net, crf = options.build_net(args), None
    net.to(info.device)

    # ---- stage 1: the DCNN alone
    if not args.init and args.pretrain_iters > 0 and (resumed is None or resumed["stage"] == "dcnn"):
        state = load_training_state(args.resume, net) if resumed is not None else None
        runner.log(f"stage 1: DCNN alone, {args.pretrain_iters} iterations")
        runner.train_dcnn(args, info, net, train_set, val_loader, logger, args.pretrain_iters, ckpt,
                          resume_state=state, lr=args.pretrain_lr)
        if info.is_main:
            models.save_checkpoint(out / "dcnn.pt", net)
        resumed = None
        dist_utils.barrier()

    # ---- DCNN + CRF
    if crf is None:
        crf = options.build_crf(args)
    joint = models.DeepLabCRF(net, crf).to(info.device)
    if args.freeze_crf:
        joint.freeze_crf()
    start = 0
    if resumed is not None and resumed["stage"] == "joint":
        state = load_training_state(args.resume, joint)
        before = state["extra"].get("before")
        before_examples = _examples_from_plain(state["extra"].get("before_examples"))
        start = int(state["iteration"])
    else:
        state = None
        before, before_examples = engine.evaluate(joint, val_loader, args.num_classes, info.device,
                                                  bands=args.bands, class_names=names, amp=args.amp,
                                                  num_examples=args.examples,
                                                  progress=not args.no_progress, desc="eval before")
        runner.log(runner.format_table([("DCNN", before["dcnn"]), ("DCNN + CRF", before["crf"])]))

    # ---- stage 2: joint training
    model = dist_utils.wrap_ddp(joint, info)
    opt = engine.build_optimizer(joint, name=args.optimizer, lr=args.lr, momentum=args.momentum,
                                 weight_decay=args.weight_decay,
                                 classifier_lr_mult=args.classifier_lr_mult,
                                 crf_lr_mult=args.crf_lr_mult, crf_weight_decay=args.crf_weight_decay)
    scaler = runner.make_scaler(args, info)
    if state is not None:
        runner._restore_optim(state, opt, scaler)
        logger.truncate("joint", start)
    cfg = runner.loop_config(args, "joint", args.iters, ckpt, stop_at=args.stop_at)
    w = args.unary_loss_weight
    runner.log(f"stage 2: joint DCNN + CRF-RNN, {args.iters} iterations")
    summary = engine.train_loop(
        model, train_set, lambda m, x, y: engine.joint_loss(m, x, y, unary_weight=w), opt, cfg, info,
        start_iter=start, scaler=scaler, logger=logger, args=args,
        eval_fn=runner.periodic_eval(args, joint, val_loader, info),
        ckpt_extra={"before": before, "before_examples": _examples_to_plain(before_examples)})
    if summary["stopped"]:
        runner.log(f"stopped after joint iteration {args.stop_at}; continue with --resume {ckpt}")
        return None

    after, after_examples = engine.evaluate(joint, val_loader, args.num_classes, info.device,
                                            bands=args.bands, class_names=names, amp=args.amp,
                                            num_examples=args.examples, progress=not args.no_progress,
                                            desc="eval after")
    rows = [("DCNN alone, before joint training", before["dcnn"]),
            ("DCNN + CRF, before joint training", before["crf"]),
            ("DCNN alone, after joint training", after["dcnn"]),
            ("DCNN + CRF, after joint training", after["crf"])]
    if info.is_main:
        models.save_checkpoint(out / "model.pt", joint)
        runner.write_json(out / "metrics.json", {
            "before": before, "after": after, "train": summary, "seconds": timer(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "crf": _crf_params(joint.crf)})
        runner.band_plot(out / "bands.png", {n: r for n, r in rows})
        runner.examples_png(out / "examples.png", {
            "DCNN before": (before_examples, "dcnn"), "+CRF before": (before_examples, "crf"),
            "DCNN after": (after_examples, "dcnn"), "+CRF after": (after_examples, "crf")})
        print(f"\nPASCAL-style evaluation on {len(val_set)} {args.dataset} validation images "
              f"(void ignored); {timer():.0f} s in all")
        print(runner.format_table(rows))
        print(f"wrote {out / 'metrics.json'}, {out / 'examples.png'}, {out / 'bands.png'}, "
              f"{out / 'model.pt'}")
    return {"before": before, "after": after}


def _crf_params(crf) -> dict:
    """The CRF's learnt kernel weights (diagonal means) and compatibility, for the report."""
    out = {"bilateral": list(crf.bilateral), "spatial": list(crf.spatial)}
    for name in ("bilateral_weight", "spatial_weight", "compatibility"):
        t = getattr(crf, name, None)
        if isinstance(t, torch.Tensor):
            out[name] = t.detach().cpu().tolist()
    return out


def _examples_to_plain(examples):
    return [{k: (torch.from_numpy(v) if hasattr(v, "shape") else v) for k, v in ex.items()}
            for ex in (examples or [])]


def _examples_from_plain(examples):
    return [{k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in ex.items()}
            for ex in (examples or [])]


if __name__ == "__main__":
    runner.run_main(main, get_args_parser())
