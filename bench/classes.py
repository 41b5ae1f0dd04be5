"""The CRF's cost against the class count: ours exact, ours with sender pruning, and densecrf.

A 60- or 150-class network (ADE20K, COCO-stuff) scores every class at every pixel, most of them
absent from the image. We make such scores from the real VOC images: the coarse-unary protocol's
21 probabilities (bench/voc_protocol.py: DCNN-like scores made from the ground truth), padded with
C - 21 absent classes at probability 1e-4 each (the 21 scaled to keep the sum 1); C = 2 merges the
20 object classes into one. The "random" case draws every logit at random (N(0, 1) per pixel and
class): every class reaches every probability somewhere, so nothing can be pruned.

Per case, side by side in one run, at the images' size (VOC's are about 500x375), DeepLab's
parameters, 10 iterations, in evaluation (no grad) and forward+backward:
- ours exact: CRFRNNLayer with prune=0, both lattices built in every call (as densecrf does);
- ours pruned: the same with sender pruning at --prune (default crfrnn.DEFAULT_PRUNE);
- densecrf: pydensecrf2's DenseCRF2D (single-threaded C++), evaluation only;
(wall time, and process CPU time: the steadier measure where other jobs share the cores; ours
runs --threads threads, densecrf one) with the label agreement with densecrf (all pixels), max |dQ|
against densecrf and against ours
exact, and the senders per iteration (mean over the images: classes that sent in iteration
1, 2, ...). Times: the jobs in turn (load from other processes falls on all alike), --repeats
rounds per image after a warm-up each, the median per job and image, then over the images.

With --sweep P1,P2,... it measures instead how the result moves with `prune` (how the default
was chosen): per prune value, over the images, the worst label agreement with ours exact and
with densecrf, the largest |dQ|, and the senders per iteration, for Potts matrices (the layer's
start, dense_crf) and with --learned for Potts matrices perturbed as a learned CRF's would be.

    OMP_WAIT_POLICY=PASSIVE python bench/classes.py --images 3 --repeats 3
    python bench/classes.py --classes 150 --cases padded --skip-grad --images 10
    python bench/classes.py --sweep 1e-4,7e-4,3e-3 --images 46 --classes 21,150 --cases padded
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

# common first: it puts the repository on sys.path
from common import (CRF_PARAMS, VOC_ROOT, add_device_option, add_json_option, chosen_device, environment, print_table,
                    run_main, synchronize, write_json)
import crfrnn
import densecrf_peer
import voc_protocol as vp

#: The padded classes' probability.
ABSENT_PROBABILITY = 1e-4


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_json_option(p)
    add_device_option(p, "where ours runs: cpu or cuda (default: cpu; densecrf runs on the CPU)")
    p.add_argument("--classes", default="2,21,60,150", help="class counts, comma-separated (default: 2,21,60,150)")
    p.add_argument("--cases", default="padded,random", help="padded (VOC scores padded with absent classes) "
                   "and/or random (random logits, nothing prunable); default: both")
    p.add_argument("--images", type=int, default=3, help="VOC val.txt images, the first N (default: 3)")
    p.add_argument("--first-image", type=int, default=0, help="start at this val.txt line (default: 0)")
    p.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    p.add_argument("--params", choices=sorted(CRF_PARAMS), default="deeplab",
                   help="kernel parameters (default: deeplab: w1 4, sigma 121/5, w2 3, sigma 3)")
    p.add_argument("--prune", type=float, default=crfrnn.DEFAULT_PRUNE,
                   help=f"sender pruning's epsilon for 'ours pruned' (default: {crfrnn.DEFAULT_PRUNE:g})")
    p.add_argument("--repeats", type=int, default=3, help="rounds of timed calls per image (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--skip-grad", action="store_true", help="no forward+backward jobs")
    p.add_argument("--skip-densecrf", action="store_true", help="no densecrf (no agreement columns)")
    p.add_argument("--root", default=str(VOC_ROOT), help="the VOC2012 folder (default: ../shared/data's)")
    p.add_argument("--downscale", type=int, default=1, help="shrink the images by this factor (quick runs; default 1)")
    p.add_argument("--sweep", default=None, metavar="P1,P2,...",
                   help="measure agreement and senders for these prune values instead of timing")
    p.add_argument("--learned", action="store_true",
                   help="--sweep: also Potts matrices perturbed by N(0, 0.5) per entry (a learned CRF's)")
    return p


def padded_probs(probs21, classes):
    """The 21 VOC probabilities [21, H, W] as a C-class net's: C = 2 merges the object classes;
    C > 21 adds C - 21 classes at ABSENT_PROBABILITY, the 21 scaled to keep the sum 1."""
    if classes == 2:
        return np.stack([probs21[0], probs21[1:].sum(0)])
    if classes < 21:
        raise ValueError(f"--classes: the padded case needs C = 2 or C >= 21, got {classes}")
    extra = classes - 21
    absent = np.full((extra, *probs21.shape[1:]), ABSENT_PROBABILITY, np.float32)
    return np.concatenate([probs21 * (1 - extra * ABSENT_PROBABILITY), absent]).astype(np.float32)


def random_logits(classes, shape, seed):
    g = np.random.default_rng(1000 + seed)
    return g.standard_normal((classes, *shape)).astype(np.float32)


def senders_per_iteration(crf, unary, image, prune):
    """Classes that sent in each iteration (Tensor[T] int), from crfrnn::mean_field_forward's
    senders output on the layer's lattices and matrices."""
    lattices = crf._lattices(crf.rgb255(image), None, (unary.shape[0], *unary.shape[2:]))
    u = unary.flatten(2).transpose(1, 2)
    scales = [lat.normalization_scales(crf.normalize, u.dtype) for lat in lattices]
    args = (u, [lat.vertex_index for lat in lattices], [lat.weights_as(u.dtype) for lat in lattices],
            [s[0] for s in scales], [s[1] for s in scales], [lat.neighbors for lat in lattices],
            crf.pairwise_matrices(), crf.num_eval_iterations)
    with torch.no_grad():
        senders = torch.ops.crfrnn.mean_field_forward(*args, False, prune)[3]
    return senders.sum(dim=(1, 2)).tolist()


def run_case(image, logits, args, layers, device):
    """Times and agreement of one image and class count (logits ndarray[C, H, W]). The jobs run in
    turn, once per round after a warm-up each (load from other processes falls on all alike); the
    medians over the rounds."""
    exact, pruned, train_exact, train_pruned = layers
    img = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float().to(device)
    unary = torch.from_numpy(logits)[None].to(device)
    params = CRF_PARAMS[args.params]

    def evaluate(crf):
        def call():
            crf.clear_lattice_cache()  # both lattices built in every call, as densecrf does
            with torch.no_grad():
                return crf(unary, img)
        return call

    def train(crf):
        def call():
            crf.clear_lattice_cache()
            u = unary.clone().requires_grad_()
            crf(u, img).logsumexp(1).sum().backward()
        return call

    jobs = {"exact ms": evaluate(exact), "pruned ms": evaluate(pruned)}
    if not args.skip_grad:
        jobs.update({"exact fwd+bwd ms": train(train_exact), "pruned fwd+bwd ms": train(train_pruned)})
    if not args.skip_densecrf:
        jobs["densecrf ms"] = lambda: densecrf_peer.densecrf_probs(image, logits, args.iterations, params["bilateral"],
                                                                   params["spatial"])
    results = {name: job() for name, job in jobs.items()}  # warm-up, and the results
    times = {name: [] for name in jobs}
    cpu = {name: [] for name in jobs}
    for _ in range(args.repeats):
        for name, job in jobs.items():
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            job()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
    row = {name: statistics.median(t) for name, t in times.items()}
    row.update({name.replace(" ms", " cpu ms"): statistics.median(t) for name, t in cpu.items()})
    q_exact = torch.softmax(results["exact ms"][0], 0).cpu().numpy()
    q_pruned = torch.softmax(results["pruned ms"][0], 0).cpu().numpy()
    row["pruned-exact max|dQ|"] = float(np.abs(q_pruned - q_exact).max())
    row["senders"] = senders_per_iteration(pruned, unary, img, args.prune)
    if not args.skip_densecrf:
        q_dense = results["densecrf ms"]
        labels = q_dense.argmax(0)
        row["exact agree %"] = 100.0 * float((q_exact.argmax(0) == labels).mean())
        row["pruned agree %"] = 100.0 * float((q_pruned.argmax(0) == labels).mean())
        row["exact max|dQ|"] = float(np.abs(q_exact - q_dense).max())
        row["pruned max|dQ|"] = float(np.abs(q_pruned - q_dense).max())
    return row


def summarize(rows):
    """The median over images of each number, the worst agreement and the largest |dQ|."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "senders":
            out[key] = "/".join(f"{v:.3g}" for v in np.mean(values, axis=0))
        elif "agree" in key:
            out[key] = min(values)
        elif "dQ" in key:
            out[key] = max(values)
        else:
            out[key] = statistics.median(values)
    if "densecrf ms" in out:
        out["densecrf/exact"] = out["densecrf ms"] / out["exact ms"]
        out["densecrf/pruned"] = out["densecrf ms"] / out["pruned ms"]
        out["densecrf/pruned cpu"] = out["densecrf cpu ms"] / out["pruned cpu ms"]
    if "exact fwd+bwd ms" in out:
        out["fwd+bwd/fwd exact"] = out["exact fwd+bwd ms"] / out["exact ms"]
    return out


def sweep(args, ids, classes, cases, device):
    """--sweep: per case, class count, matrices and prune value, the worst agreement and largest
    |dQ| over the images (against ours exact and densecrf), and the mean senders per iteration."""
    values = [float(v) for v in args.sweep.split(",")]
    params = CRF_PARAMS[args.params]
    rows = []
    for case in cases:
        for c in classes:
            for kind in ("potts", "learned") if args.learned else ("potts",):
                crf = crfrnn.CRFRNNLayer(c, num_iterations=args.iterations, num_eval_iterations=args.iterations,
                                         eval_prune=0.0, **params).eval().to(device)
                if kind == "learned":
                    g = torch.Generator().manual_seed(c)
                    with torch.no_grad():
                        crf.compatibility.add_(0.5 * torch.randn(c, c, generator=g).to(device))
                stats = {v: {"agree": [], "agree_dense": [], "dq": [], "dq_dense": [], "senders": [], "ms": []}
                         for v in values}
                for i, image_id in enumerate(ids):
                    image, label = vp.downscale_pair(*vp.load_pair(args.root, image_id), args.downscale)
                    seed = args.first_image + i
                    logits = (np.log(padded_probs(vp.coarse_probs(label, seed), c)) if case == "padded"
                              else random_logits(c, label.shape, seed)).astype(np.float32)
                    img = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device)
                    unary = torch.from_numpy(np.ascontiguousarray(logits))[None].to(device)
                    with torch.no_grad():
                        q_exact = torch.softmax(crf(unary, img)[0], 0).cpu().numpy()
                    q_dense = None
                    if not args.skip_densecrf and kind == "potts":
                        q_dense = densecrf_peer.densecrf_probs(image, logits, args.iterations, params["bilateral"],
                                                               params["spatial"])
                    for v in values:
                        crf.eval_prune = v
                        synchronize(device)
                        start = time.perf_counter()
                        with torch.no_grad():
                            q = torch.softmax(crf(unary, img)[0], 0).cpu().numpy()
                        stats[v]["ms"].append((time.perf_counter() - start) * 1e3)
                        stats[v]["agree"].append(100.0 * float((q.argmax(0) == q_exact.argmax(0)).mean()))
                        stats[v]["dq"].append(float(np.abs(q - q_exact).max()))
                        if q_dense is not None:
                            stats[v]["agree_dense"].append(100.0 * float((q.argmax(0) == q_dense.argmax(0)).mean()))
                            stats[v]["dq_dense"].append(float(np.abs(q - q_dense).max()))
                        stats[v]["senders"].append(senders_per_iteration(crf, unary, img, v))
                    crf.eval_prune = 0.0
                for v in values:
                    st = stats[v]
                    row = {"case": case, "C": c, "matrices": kind, "prune": v,
                           "theta (Potts)": float(inference_threshold(crf, v)),
                           "worst agree %": min(st["agree"]), "max|dQ|": max(st["dq"]),
                           "median |dQ|": statistics.median(st["dq"]),
                           "senders": "/".join(f"{x:.3g}" for x in np.mean(st["senders"], axis=0)),
                           "median ms": statistics.median(st["ms"])}
                    if st["agree_dense"]:
                        row["worst agree densecrf %"] = min(st["agree_dense"])
                        row["max|dQ| densecrf"] = max(st["dq_dense"])
                    rows.append(row)
                    print_table(f"{case}, C = {c}, {kind}, prune {v:g}", [row], list(row))
    columns = ["case", "C", "matrices", "prune", "theta (Potts)", "worst agree %", "max|dQ|", "median |dQ|",
               "worst agree densecrf %", "max|dQ| densecrf", "senders", "median ms"]
    print_table(f"sweep over {len(ids)} images (agreement: worst image; |dQ|: largest, and the median of the "
                "images' largest)", rows, [c for c in columns if any(c in r for r in rows)])
    return rows


def inference_threshold(crf, prune):
    """The smallest of the classes' thresholds (crfrnn.inference.sender_thresholds)."""
    return crfrnn.inference.sender_thresholds(crf.pairwise_matrices(), prune).min()


def main(args):
    classes = [int(c) for c in args.classes.split(",")]
    cases = [c for c in args.cases.split(",") if c]
    if not set(cases) <= {"padded", "random"}:
        raise ValueError(f"--cases must name padded and/or random, got {args.cases!r}")
    if args.images < 1 or args.repeats < 1 or args.iterations < 1 or args.downscale < 1:
        raise ValueError("--images, --repeats, --iterations and --downscale must be at least 1")
    if not args.skip_densecrf and not densecrf_peer.available():
        raise ValueError("densecrf (pip install pydensecrf2) is not installed: pass --skip-densecrf")
    torch.set_num_threads(args.threads)
    device = chosen_device(args)
    ids = vp.image_ids(args.root)[args.first_image:args.first_image + args.images]
    if args.sweep:
        rows = sweep(args, ids, classes, cases, device)
        write_json(args.json, {"environment": environment(device), "images": ids, "params": args.params,
                               "iterations": args.iterations, "sweep": rows})
        return
    params = CRF_PARAMS[args.params]
    results = []
    print(f"VOC {len(ids)} images from line {args.first_image}, --params {args.params}, {args.iterations} iterations, "
          f"prune {args.prune:g}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    for case in cases:
        for c in classes:
            common = dict(num_iterations=args.iterations, num_eval_iterations=args.iterations, **params)
            layers = (crfrnn.CRFRNNLayer(c, eval_prune=0.0, **common).eval(),
                      crfrnn.CRFRNNLayer(c, eval_prune=args.prune, **common).eval(),
                      crfrnn.CRFRNNLayer(c, prune=0.0, **common).train(),
                      crfrnn.CRFRNNLayer(c, prune=args.prune, **common).train())
            layers = tuple(layer.to(device) for layer in layers)
            rows = []
            for i, image_id in enumerate(ids):
                image, label = vp.downscale_pair(*vp.load_pair(args.root, image_id), args.downscale)
                seed = args.first_image + i
                if case == "padded":
                    logits = np.log(padded_probs(vp.coarse_probs(label, seed), c))
                else:
                    logits = random_logits(c, label.shape, seed)
                rows.append(run_case(image, np.ascontiguousarray(logits, dtype=np.float32), args, layers, device))
            row = {"case": case, "C": c, **summarize(rows)}
            results.append({"case": case, "C": c, "per_image": rows, "summary": row})
            print_table(f"{case}, C = {c}", [row], list(row))
    columns = ["case", "C", "exact ms", "pruned ms", "densecrf ms", "densecrf/exact", "densecrf/pruned",
               "densecrf/pruned cpu",
               "exact agree %", "pruned agree %", "pruned max|dQ|", "pruned-exact max|dQ|", "exact fwd+bwd ms",
               "pruned fwd+bwd ms", "fwd+bwd/fwd exact", "senders"]
    summaries = [r["summary"] for r in results]
    print_table("summary (times: median over images; agreement: worst image; max|dQ|: largest)",
                summaries, [c for c in columns if c in summaries[0]])
    write_json(args.json, {"environment": environment(device), "images": ids, "params": args.params,
                           "iterations": args.iterations, "prune": args.prune, "repeats": args.repeats,
                           "results": results})


if __name__ == "__main__":
    run_main(main, get_args_parser())
