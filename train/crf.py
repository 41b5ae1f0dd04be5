"""Stage 2: the fully connected CRF on a frozen DCNN, learnt by gradient (CRF-RNN's layer: kernel
weights, compatibility and with --learn-bandwidths the bandwidths, through --crf-iters mean-field
iterations) or by DeepLab's grid search of w1, σα, σβ (``--search``), or the grid's best refined
by gradient (``--search --refine``). Recipes: train/README.md.
"""
if __package__ in (None, ""):  # run as a file: put the repository root first on sys.path
    import _repo_path  # noqa: F401  (train/_repo_path.py)

import itertools

import torch

import models
from train import engine, options, reports
from train.checkpoint import load_model
from train.process import all_reduce_sum, log, run_main


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
    return options.set_presets(p, "crf")


def main(args):
    if args.refine and not args.search:
        raise ValueError("--refine refines the best point of a grid search: give --search too")
    options.finalize(args)
    crf = engine.build_crf(args)              # (bad CRF options end the run here, before any work)
    pretrains = not args.dcnn and args.pretrain_iters > 0
    run = engine.TrainingRun(args, ["dcnn.pt"] * pretrains + ["model.pt", "metrics.json", "bands.png", "examples.png"])
    info, out, resumed = run.info, run.out, run.resumed

    # ---- the frozen DCNN
    if args.dcnn:
        net = load_model(args.dcnn, args.num_classes).net.to(info.device)
    elif resumed is not None and resumed["stage"] == "crf":
        net = load_model(args.resume, None).net.to(info.device)   # the DCNN this run trained first
    elif pretrains:
        net = engine.build_net(args).to(info.device)
        resumed = run.pretrain_dcnn(net)
    else:
        raise ValueError("give the DCNN to build on with --dcnn CKPT (train/dcnn.py's model.pt)")
    net.requires_grad_(False)
    net.eval()

    joint = models.DeepLabCRF(net, crf).to(info.device)
    initial, init_examples = run.evaluate(joint, 6, "eval (initial CRF)")
    report = {"dcnn": initial["dcnn"], "crf_initial": initial["crf"],
              "crf_initial_params": {"bilateral": list(args.bilateral), "spatial": list(args.spatial)}}
    if args.search:
        best, report["search"] = grid_search(args, run, net)
        # (args keep the given --bilateral: a --refine run's checkpoint records the options as given,
        # and its --resume searches again)
        joint = models.DeepLabCRF(net, engine.build_crf(args, [best["sxy"], best["srgb"], best["w1"]])).to(info.device)
        log(f"best on {report['search']['samples']} images: w1 {best['w1']:g}, σα {best['sxy']:g}, "
            f"σβ {best['srgb']:g} (mIoU {100 * best['miou']:.2f})")
        label = "DCNN + CRF (grid search)"
    if args.refine:  # the searched CRF on the whole validation set, before the gradient moves it
        report["crf_searched"] = run.evaluate(joint, 0, "eval (searched CRF)")[0]["crf"]
    if not args.search or args.refine:
        log(f"learning the CRF by gradient on the frozen DCNN, {args.iters} iterations")
        report["train"] = run.train(joint, lambda m, x, y: crf_loss(m, x, y, args.crf_loss), "crf", args.iters,
                                    args.lr, resume=resumed is not None, stop_at=args.stop_at)
        label = "DCNN + CRF (searched, then learnt)" if args.search else "DCNN + CRF (learnt)"
        if report["train"]["stopped"]:
            return None

    final, final_examples = run.evaluate(joint, 6, "eval (final CRF)")
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


def crf_loss(model, images, labels, loss):
    """The loss of the CRF's output (--crf-loss), the DCNN kept in eval mode (no dropout)."""
    models.unwrap(model).net.eval()
    return engine.joint_loss(model, images, labels, unary_weight=0.0, loss=loss)


@torch.no_grad()
def grid_search(args, run, net):
    """DeepLab's search (train.engine.search_grid) of the Potts CRF's (w1, σα, σβ) over --search-*
    (the spatial kernel fixed at --spatial) on the first --search-samples validation images, each
    process on its share of them, the DCNN's unaries computed once. Returns the best point and
    ``{"samples", "points": [{"w1", "sxy", "srgb", "miou"}, ...]}``."""
    n = min(len(run.val_set), args.search_samples)
    subset = torch.utils.data.Subset(run.val_set, list(range(n)))
    samples = []
    with torch.no_grad():
        for images, labels, _, _ in engine.eval_loader(subset, run.info, args.eval_batch_size, args.workers):
            images = images.to(run.info.device)
            samples.append((net(images, upsample=True).float(), images, labels))   # labels padded with void

    def make_crf(w1, sxy, srgb):
        return engine.crf_layer(args.num_classes, (sxy, srgb, w1), args.spatial, args.crf_eval_iters,
                                args.crf_eval_iters).to(run.info.device).eval()
    best, points = engine.search_grid(samples, make_crf, itertools.product(args.search_w1, args.search_sxy,
                                                                            args.search_srgb),
                                      args.num_classes, progress=not args.no_progress and run.info.is_main,
                                      reduce_sum=all_reduce_sum)
    return best, {"samples": n, "points": points}


if __name__ == "__main__":
    run_main(main, get_args_parser())
