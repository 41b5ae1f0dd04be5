"""Stage 2: the fully connected CRF on a frozen DCNN — learnt by gradient (CRF-RNN's layer,
DCNN fixed) or by DeepLab's grid search of w1, σα, σβ on a validation subset (``--search``).

    python train/crf.py                                  # synthetic: short DCNN stage, then the CRF
    python train/crf.py --dcnn runs/dcnn/model.pt --search
    python train/crf.py --dataset voc --data-root DATA --dcnn runs/dcnn/model.pt --search \
        --search-samples 100                             # DeepLab: w1 5..10, σα 50..100, σβ 3..10
    python train/crf.py --dcnn runs/dcnn/model.pt --search --refine --learn-bandwidths \
        --compatibility symmetric                        # the grid's best, then learnt from there

Gradient mode trains the CRF layer's kernel weights and compatibility matrix (C×C each, or
shared: ``--kernel-weights``, ``--compatibility``), and with ``--learn-bandwidths`` its three
bandwidths, through ``--crf-iters`` mean-field iterations with the loss (``--crf-loss``: CRF-RNN's
cross-entropy, or the Lovász-softmax IoU surrogate) on its full-resolution output; the DCNN
runs in eval mode with frozen weights. Search mode keeps the Potts model and, for each
(w1, σα, σβ) with w2 = σγ = 3 fixed, runs the CRF on the DCNN's unaries of the first
``--search-samples`` validation images (computed once) and keeps the best mIoU; with ``--refine``
gradient training then starts from that best (the search finds the basin, the gradient the
parameters a grid has no axis for: per-class weights and compatibilities, finer bandwidths).

Writes OUT/model.pt (DCNN + CRF, for evaluate.py, segment.py, joint.py --init), OUT/metrics.json
(DCNN alone, with the initial CRF, with the searched and/or learnt CRF; the search grid),
OUT/bands.png, OUT/examples.png, OUT/metrics.csv, OUT/checkpoint.pt (for --resume; not written by a
search without --refine or a DCNN stage) and, when it trains the DCNN first, OUT/dcnn.pt. A file there from an
earlier run is replaced only with --overwrite.
"""
if __package__ in (None, ""):  # run as a file: put the repository root first on sys.path
    import _repo_path  # noqa: F401  (train/_repo_path.py)

import argparse
import itertools

import torch

import models
from train import distributed as dist_utils
from train import engine, options, reports
from train.checkpoint import load_model
from train.distributed import log
from train.metrics import ConfusionMatrix
from train.process import run_main
from train.stages import pretrain_dcnn, start_training, train_stage

# This script's own defaults, over train/options.py's DATASET_PRESETS.
PRESETS = {
    # DeepLab's search ranges (paper, section 4.1): w1 in [5, 10], sigma_alpha in [50:10:100],
    # sigma_beta in [3:1:10]; w2 = sigma_gamma = 3.
    "voc": dict(iters=2000, lr=1e-3, batch_size=10, crf_lr_mult=1.0, search_w1=[5, 6, 7, 8, 9, 10],
                search_sxy=[50, 60, 70, 80, 90, 100], search_srgb=[3, 4, 5, 6, 7, 8, 9, 10],
                search_samples=100),
    # The same idea on the small synthetic images.
    "synthetic": dict(iters=60, lr=1e-2, crf_lr_mult=1.0, search_w1=[3, 5, 10], search_sxy=[10, 20, 40],
                      search_srgb=[6, 12, 24], search_samples=24),
}


def get_args_parser(add_help=True):
    p = options.parser("Stage 2: fit the fully connected CRF on a frozen DCNN, by gradient (CRF-RNN) "
                       "or by DeepLab's grid search (--search). Defaults depend on --dataset.", add_help)
    p.add_argument("--dcnn", default=None, metavar="CKPT",
                   help="the DCNN (train/dcnn.py's model.pt); none: a DCNN stage runs first "
                        "(--pretrain-iters)")
    options.add_pretrain_args(p)
    s = p.add_argument_group("grid search (--search)")
    s.add_argument("--search", action="store_true",
                   help="grid-search w1, σα, σβ instead of gradient training (or before it: --refine)")
    s.add_argument("--search-w1", type=float, nargs="+", help="bilateral weights to try")
    s.add_argument("--search-sxy", type=float, nargs="+", help="σα values (px) to try")
    s.add_argument("--search-srgb", type=float, nargs="+", help="σβ values (0..255) to try")
    s.add_argument("--search-samples", type=int, help="validation images to search on")
    s.add_argument("--refine", action="store_true",
                   help="after --search, learn the CRF by gradient starting from the best point found "
                        "(the gradient-mode options apply: --iters, --lr, --learn-bandwidths, ...)")
    options.add_data_args(p)
    options.add_model_args(p)
    options.add_crf_args(p)
    options.add_optim_args(p)
    options.add_run_args(p, "runs/crf")
    return options.set_presets(p, PRESETS)


def outputs(args) -> list:
    """The files a run writes in --out-dir (besides checkpoint.pt and metrics.csv)."""
    return (["dcnn.pt"] if not args.dcnn and args.pretrain_iters > 0 else []) + \
        ["model.pt", "metrics.json", "bands.png", "examples.png"]


def main(args):
    if args.refine and not args.search:
        raise ValueError("--refine refines the best point of a grid search: give --search too")
    run = start_training(args, outputs)
    info, out, resumed = run.info, run.out, run.resumed

    # ---- the frozen DCNN
    if args.dcnn:
        net = load_model(args.dcnn, args.num_classes).net.to(info.device)
    elif resumed is not None and resumed["stage"] == "crf":
        net = load_model(args.resume).net.to(info.device)   # the DCNN this run trained first
    elif args.pretrain_iters > 0:
        net = options.build_net(args).to(info.device)
        resumed = pretrain_dcnn(args, run, net, resumed)
    else:
        raise ValueError("give the DCNN to build on with --dcnn CKPT (train/dcnn.py's model.pt)")
    net.requires_grad_(False)
    net.eval()

    crf = options.build_crf(args)
    crf.keep_marginals = info.keep_marginals
    joint = models.DeepLabCRF(net, crf).to(info.device)
    initial, init_examples = engine.evaluate(joint, run.val_loader, args.num_classes, info.device,
                                             bands=args.bands, class_names=run.class_names, amp=args.amp,
                                             num_examples=6, progress=not args.no_progress,
                                             desc="eval (initial CRF)")
    report = {"dcnn": initial["dcnn"], "crf_initial": initial["crf"],
              "crf_initial_params": {"bilateral": list(args.bilateral), "spatial": list(args.spatial)}}

    if args.search:
        best, grid = grid_search(args, info, net, run.val_set)
        report["search"] = grid
        # (args keep the given --bilateral: a --refine run's checkpoint records the options as given,
        # and its --resume searches again)
        crf = options.build_crf(argparse.Namespace(**{**vars(args), "bilateral": [best["sxy"], best["srgb"],
                                                                                  best["w1"]]}))
        crf.keep_marginals = info.keep_marginals
        joint = models.DeepLabCRF(net, crf).to(info.device)
        log(f"best on {grid['samples']} images: w1 {best['w1']:g}, σα {best['sxy']:g}, "
            f"σβ {best['srgb']:g} (mIoU {100 * best['miou']:.2f})")
        label = "DCNN + CRF (grid search)"
    if args.refine:  # the searched CRF on the whole validation set, before the gradient moves it
        searched, _ = engine.evaluate(joint, run.val_loader, args.num_classes, info.device, bands=args.bands,
                                      class_names=run.class_names, amp=args.amp,
                                      progress=not args.no_progress, desc="eval (searched CRF)")
        report["crf_searched"] = searched["crf"]
    if not args.search or args.refine:
        opt = engine.build_optimizer(joint, name=args.optimizer, lr=args.lr, momentum=args.momentum,
                                     weight_decay=args.weight_decay, crf_lr_mult=args.crf_lr_mult,
                                     crf_weight_decay=args.crf_weight_decay)
        log(f"learning the CRF by gradient on the frozen DCNN, {args.iters} iterations")
        report["train"] = train_stage(args, run, joint, opt, lambda m, x, y: crf_loss(m, x, y, args.crf_loss),
                                      "crf", args.iters,
                                      resume=resumed is not None, stop_at=args.stop_at)
        label = "DCNN + CRF (searched, then learnt)" if args.search else "DCNN + CRF (learnt)"
        if report["train"]["stopped"]:
            log(f"stopped after iteration {args.stop_at}; continue with --resume {run.checkpoint}")
            return None

    final, final_examples = engine.evaluate(joint, run.val_loader, args.num_classes, info.device,
                                            bands=args.bands, class_names=run.class_names, amp=args.amp,
                                            num_examples=6, progress=not args.no_progress,
                                            desc="eval (final CRF)")
    report["crf_final"] = final["crf"]
    # The layer's own: learned bandwidths (--learn-bandwidths) or the searched ones.
    report["crf_final_params"] = {"bilateral": list(joint.crf.bilateral), "spatial": list(joint.crf.spatial)}
    report["seconds"] = run.seconds()
    rows = [("DCNN alone", initial["dcnn"]), ("DCNN + CRF (initial parameters)", initial["crf"])]
    if args.refine:
        rows.append(("DCNN + CRF (grid search)", report["crf_searched"]))
    rows.append((label, final["crf"]))
    if info.is_main:
        models.save_checkpoint(out.claim("model.pt"), joint, data=run.data)
        reports.write_json(out.claim("metrics.json"), report)
        reports.band_plot(out.claim("bands.png"), dict(rows))
        reports.examples_png(out.claim("examples.png"), {"DCNN": (init_examples, "dcnn"),
                                                         "+CRF initial": (init_examples, "crf"),
                                                         "+CRF final": (final_examples, "crf")}, run.class_names)
        print(reports.format_table(rows))
        print(f"wrote {out.listing()}")
    return report


def crf_loss(model, images, labels, loss="ce"):
    """The loss of the CRF's output (--crf-loss) with the DCNN kept in eval mode (frozen weights,
    no dropout)."""
    dist_utils.unwrap(model).net.eval()
    return engine.joint_loss(model, images, labels, loss=loss)


@torch.no_grad()
def grid_search(args, info, net, val_set):
    """DeepLab's search: mIoU of the CRF for every (w1, σα, σβ) on the first validation images.

    The DCNN's unaries are computed once; each grid point then costs only the CRF. Every rank
    evaluates its share of the images; confusion matrices are summed. Returns the best point and
    ``{"samples", "points": [{"w1", "sxy", "srgb", "miou"}, ...]}``.
    """
    n = min(len(val_set), args.search_samples)
    subset = torch.utils.data.Subset(val_set, list(range(n)))
    loader = engine.make_eval_loader(subset, info, args.eval_batch_size, args.workers)
    cached = []
    for images, labels, sizes, _ in loader:
        images = images.to(info.device)
        cached.append((images, net(images, upsample=True).float(), labels, sizes))
    points = []
    combos = list(itertools.product(args.search_w1, args.search_sxy, args.search_srgb))
    for w1, sxy, srgb in engine.progress_bar(combos, desc="grid search",
                                             enabled=not args.no_progress and info.is_main):
        crf = options.crf_layer(args.num_classes, (sxy, srgb, w1), args.spatial, args.crf_eval_iters,
                                args.crf_eval_iters).to(info.device).eval()
        cm = ConfusionMatrix(args.num_classes)
        for images, unary, labels, sizes in cached:
            pred = crf(unary, images).argmax(1).cpu()
            for k in range(pred.shape[0]):
                h, w = int(sizes[k, 0]), int(sizes[k, 1])
                cm.update(pred[k, :h, :w], labels[k, :h, :w])
        cm.all_reduce()
        points.append({"w1": float(w1), "sxy": float(sxy), "srgb": float(srgb), "miou": cm.miou()})
    best = max(points, key=lambda p: p["miou"])
    return best, {"samples": n, "points": points}


if __name__ == "__main__":
    run_main(main, get_args_parser())
