"""Benchmark of the mean-field CRF layer against Krähenbühl's densecrf (pydensecrf2) and, for
training, against the step-by-step autograd loop and sadeepj/crfasrnn_pytorch.

Real VOC images (the first --images of val.txt) resized to 500x375, C = 21 coarse-unary logits
(bench/voc_protocol.py), 10 mean-field iterations with DeepLab-LargeFOV's kernels (w1 4,
sigma_alpha 121, sigma_beta 5, w2 3, sigma_gamma 3; --params to change). Times, median of
--repeats, lattice builds included as below:

- ours: forward (eval, no grad: crfrnn::mean_field_inference), cold (both lattices built in the
  call, as densecrf builds its own in every call) and steady (the layer keeps the spatial
  lattice, which depends on the image shape only, from the previous call of the same shape), and
  forward+backward (gradients to the unary and the C x C parameters, steady) three ways: the
  fused training ops (crfrnn::mean_field_forward/backward), the same with checkpoint=True, and
  the step-by-step autograd loop (mean_field(..., fused=False), what the fused ops replace);
  batch 1 and 4;
- densecrf: DenseCRF2D.inference on the same input (one image after the other for a batch;
  single-threaded C++, CPU only), and the ratio densecrf / ours;
- with --crfasrnn DIR (a checkout of sadeepj/crfasrnn_pytorch, extension built, see
  bench/crfasrnn_peer.py): their layer's forward and forward+backward (batch 1 only: one image
  after the other for a batch), and the ratio theirs / ours;
- memory: bytes saved for backward by the fused ops, the step-by-step loop and checkpointing (and
  on CUDA the peak allocation); and how closely our marginals match densecrf's;
- with --images > 1: each ratio's median, min and max over the images, and on how many it meets
  the project's goal for it (TARGETS): the ratios depend on the image's lattice size.

    python bench/crf.py                                  # CPU, batch 1 and 4
    python bench/crf.py --images 3 --iterations 5 --crfasrnn /tmp/crfasrnn
    python bench/crf.py --device cuda --json crf_gpu.json
    python bench/crf.py --batch 1 --images 46 --skip-step --repeats 3   # all 46 VOC images
"""
import argparse
import contextlib

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

# common first: it puts the repository on sys.path (for models and train)
from common import (CRF_PARAMS, VOC_ROOT, add_device_option, add_json_option, chosen_device, environment, print_table,
                    run_main, time_it, write_json)
import crfasrnn_peer
import crfrnn
import densecrf_peer
import voc_protocol as vp



def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_option(p)
    add_json_option(p)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default: 1 4)")
    p.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    p.add_argument("--classes", type=int, default=21, help="number of classes C (default: 21)")
    p.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"),
                   help="image size (default: 500 375)")
    p.add_argument("--params", choices=sorted(CRF_PARAMS), default="deeplab",
                   help="kernel parameters: deeplab (121/5/4, 3/3), crfrnn (160/3/5, 3/3), "
                        "demo (80/13/10, 3/3) (default: deeplab)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions, median reported")
    p.add_argument("--images", type=int, default=1,
                   help="how many real images (the first of VOC val.txt, 46 at hand; default: 1); "
                        "with more than one, a table of each ratio over the images and against the "
                        "project's goals for them")
    p.add_argument("--skip-densecrf", action="store_true", help="do not run pydensecrf2")
    p.add_argument("--skip-step", action="store_true", help="do not time the step-by-step loop")
    p.add_argument("--crfasrnn", metavar="DIR",
                   help="a checkout of sadeepj/crfasrnn_pytorch with its extension built: time its "
                        "layer on the same input (CPU, batch 1 per call)")
    return p


def load_input(size, classes, index=0):
    """(image uint8 [H, W, 3], logits float32 [C, H, W], source) at size (W, H): image `index` of
    VOC val.txt (the protocol's unary seed), or synthetic blocks without the shared data."""
    if VOC_ROOT.is_dir():
        image_id = vp.image_ids(VOC_ROOT)[index]
        image, label = vp.load_pair(VOC_ROOT, image_id)
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize(size, Image.NEAREST))
        source = f"VOC {image_id}, coarse-unary protocol"
    else:  # no shared data: blocks of colour with matching labels
        rng = np.random.default_rng(index)
        cells = rng.integers(0, vp.NUM_CLASSES, (size[1] // 50 + 1, size[0] // 50 + 1)).astype(np.uint8)
        label = np.asarray(Image.fromarray(cells).resize(size, Image.NEAREST))
        palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
        image = palette[label]
        source = "synthetic blocks (no ../shared/data), coarse-unary protocol"
    logits = vp.coarse_logits(label, index).numpy()
    if classes != logits.shape[0]:  # other C: pad with copies of the background score, or cut
        extra = np.repeat(logits[:1] - 2.0, max(0, classes - logits.shape[0]), 0)
        logits = np.concatenate([logits, extra])[:classes]
    return np.array(image), np.ascontiguousarray(logits), source  # a writable copy for torch


@contextlib.contextmanager
def step_by_step(crf):
    """The layer `crf` runs the step-by-step autograd loop (CRFRNNLayer(fused=False)) inside."""
    fused, crf.fused = crf.fused, False
    try:
        yield
    finally:
        crf.fused = fused


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while running fn() (distinct storages)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def time_layer(crf, crf_ckpt, unary, img, device, repeats, step):
    """Our timings (ms) of one input: lattice build, forward cold and steady, forward+backward
    fused, checkpointed and (if `step`) step by step."""
    def forward():
        with torch.no_grad():
            return crf.eval()(unary, img)

    def forward_cold():
        crf.clear_lattice_cache()
        return forward()

    def build():
        with torch.no_grad():
            return crfrnn.build_crf_lattices(img, crf.bilateral, crf.spatial)

    def fwd_bwd(layer):
        u = unary.clone().requires_grad_()
        out = layer.train()(u, img)
        out.logsumexp(1).sum().backward()

    lat = build()
    h, w = img.shape[2:]
    row = {"vertices/px bil": lat[0].num_vertices / (img.shape[0] * h * w),
           "build ms": time_it(build, device, repeats),
           "fwd cold ms": time_it(forward_cold, device, repeats),
           "fwd ms": time_it(forward, device, repeats),
           "fwd+bwd ms": time_it(lambda: fwd_bwd(crf), device, repeats),
           "fwd+bwd ckpt ms": time_it(lambda: fwd_bwd(crf_ckpt), device, repeats)}
    if step:
        with step_by_step(crf):
            row["fwd+bwd step ms"] = time_it(lambda: fwd_bwd(crf), device, repeats)
    return row


def time_crfasrnn(layer, image, logits, repeats):
    """Their forward (no grad) and forward+backward (gradients to the unary and their matrices),
    ms, one image."""
    img = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    unary = torch.from_numpy(logits)[None]

    def forward():
        with torch.no_grad():
            return layer(img, unary)

    def fwd_bwd():
        layer(img, unary.clone().requires_grad_()).logsumexp(1).sum().backward()

    return time_it(forward, "cpu", repeats), time_it(fwd_bwd, "cpu", repeats)


def memory_for_backward(crf, crf_ckpt, unary, img, device):
    """Bytes autograd saves (MB) for the fused ops, the step-by-step loop and checkpointing; on
    CUDA the peak allocation of a forward+backward too."""
    mem = {}
    runs = (("fused", crf, contextlib.nullcontext), ("step", crf, lambda: step_by_step(crf)),
            ("checkpoint", crf_ckpt, contextlib.nullcontext))
    for name, layer, context in runs:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        u = unary.clone().requires_grad_()
        with context():
            out, nbytes = saved_bytes(lambda: layer.train()(u, img))
        mem[f"saved MB {name}"] = nbytes / 2**20
        out.logsumexp(1).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            mem[f"peak MB {name}"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        del out, u
    return mem


# The project's goals for each ratio (set when the fused backward was built).
TARGETS = {"fwd+bwd / fwd": ("<=", 1.6), "step / fused fwd+bwd": (">=", 2.5), "densecrf / ours fwd cold": (">=", 3.0),
           "densecrf / ours fwd": (">=", 3.0), "crfasrnn / ours fwd+bwd": (">=", 8.0)}


def summarise(ratios):
    """Per batch size and ratio: median, min and max over the images, and on how many images the
    ratio meets its target (TARGETS), since the ratios depend on the image's lattice size."""
    out = []
    for batch in sorted({r["N"] for r in ratios}):
        of_batch = [r for r in ratios if r["N"] == batch]
        for name in [k for k in of_batch[0] if k not in ("image", "N")]:
            values = [r[name] for r in of_batch]
            row = {"N": batch, "ratio": name, "median": float(np.median(values)), "min": min(values), "max": max(values)}
            if name in TARGETS:
                sense, bound = TARGETS[name]
                met = sum(v <= bound if sense == "<=" else v >= bound for v in values)
                row.update({"target": f"{sense} {bound:g}", "images meeting it": f"{met}/{len(values)}"})
            out.append(row)
    return out


def main(args):
    device = chosen_device(args)
    if args.images < 1:
        raise ValueError(f"--images must be >= 1, got {args.images}")
    at_hand = len(vp.image_ids(VOC_ROOT)) if VOC_ROOT.is_dir() else None  # None: synthetic, any number
    if at_hand is not None and args.images > at_hand:
        raise ValueError(f"--images must be <= {at_hand} (the VOC val images at hand), got {args.images}")
    params = CRF_PARAMS[args.params]
    peer = None
    if args.crfasrnn:
        try:
            peer = crfasrnn_peer.load_layer(args.crfasrnn, args.classes, args.iterations, **params)
        except FileNotFoundError as exc:
            raise SystemExit(str(exc)) from None
    run_dense = not args.skip_densecrf and densecrf_peer.available()
    inputs = [load_input(tuple(args.size), args.classes, i) for i in range(args.images)]
    h, w = inputs[0][0].shape[:2]
    print(f"input: {', '.join(source for _, _, source in inputs)}; {w}x{h}, C = {args.classes}, "
          f"{args.iterations} iterations, params {args.params} {params}; {environment(device)}")
    if not run_dense:
        print("densecrf: not run (pydensecrf2 missing or --skip-densecrf)")

    rows, ratios, memory = [], [], []
    for index, (image, logits, source) in enumerate(tqdm(inputs, desc="images", disable=len(inputs) == 1)):
        dense_ms = peer_ms = None
        if run_dense:
            dense_ms = time_it(lambda: densecrf_peer.densecrf_probs(image, logits, args.iterations, **params),
                               "cpu", max(1, args.repeats // 2 + 1))
        if peer is not None:
            peer_ms = time_crfasrnn(peer, image, logits, max(1, args.repeats // 2 + 1))
        for batch in args.batch:
            img = torch.from_numpy(image).permute(2, 0, 1)[None].float().repeat(batch, 1, 1, 1).to(device)
            unary = torch.from_numpy(logits)[None].repeat(batch, 1, 1, 1).to(device)
            layer_args = dict(num_iterations=args.iterations, num_eval_iterations=args.iterations, **params)
            crf = crfrnn.CRFRNNLayer(args.classes, **layer_args).to(device)
            crf_ckpt = crfrnn.CRFRNNLayer(args.classes, checkpoint=True, **layer_args).to(device)
            row = {"image": index, "N": batch, "device": device.type,
                   **time_layer(crf, crf_ckpt, unary, img, device, args.repeats, not args.skip_step)}
            ratio = {"image": index, "N": batch, "fwd+bwd / fwd": row["fwd+bwd ms"] / row["fwd ms"]}
            if "fwd+bwd step ms" in row:
                ratio["step / fused fwd+bwd"] = row["fwd+bwd step ms"] / row["fwd+bwd ms"]
            if dense_ms is not None:
                row["densecrf ms"] = dense_ms * batch
                ratio["densecrf / ours fwd cold"] = dense_ms * batch / row["fwd cold ms"]
                ratio["densecrf / ours fwd"] = dense_ms * batch / row["fwd ms"]
            if peer_ms is not None:
                row["crfasrnn fwd ms"], row["crfasrnn fwd+bwd ms"] = (t * batch for t in peer_ms)
                ratio["crfasrnn / ours fwd"] = row["crfasrnn fwd ms"] / row["fwd ms"]
                ratio["crfasrnn / ours fwd+bwd"] = row["crfasrnn fwd+bwd ms"] / row["fwd+bwd ms"]
            rows.append(row)
            ratios.append(ratio)
            memory.append({"image": index, "N": batch, **memory_for_backward(crf, crf_ckpt, unary, img, device)})

    agreement = {}
    if run_dense:
        image, logits, _ = inputs[0]
        qd = densecrf_peer.densecrf_probs(image, logits, args.iterations, **params)
        with torch.no_grad():
            out = crf.eval()(torch.from_numpy(logits)[None].to(device),
                             torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device))
        q = torch.softmax(out.float(), 1)[0].cpu().numpy()
        agreement = {"label agreement": float((q.argmax(0) == qd.argmax(0)).mean()),
                     "mean |dQ|": float(np.abs(q - qd).mean()), "max |dQ|": float(np.abs(q - qd).max())}

    print_table(f"CRF layer, {args.iterations} iterations at {w}x{h}, C = {args.classes} "
                "(median ms; fwd cold builds both lattices, the others the bilateral one)", rows,
                ["image", "N", "device", "vertices/px bil", "build ms", "fwd cold ms", "fwd ms", "fwd+bwd ms",
                 "fwd+bwd ckpt ms", "fwd+bwd step ms", "densecrf ms", "crfasrnn fwd ms", "crfasrnn fwd+bwd ms"])
    print_table("Ratios of times (fwd+bwd / fwd: the cost of training over inference; the others: higher = "
                "ours/fused faster; densecrf and crfasrnn single-threaded on the CPU)", ratios,
                ["image", "N", "fwd+bwd / fwd", "step / fused fwd+bwd", "densecrf / ours fwd cold",
                 "densecrf / ours fwd", "crfasrnn / ours fwd", "crfasrnn / ours fwd+bwd"])
    summary = summarise(ratios)
    if args.images > 1:
        print_table("Over the images: each ratio's median, min and max, and the images where it meets its target", summary,
                    ["N", "ratio", "median", "min", "max", "target", "images meeting it"])
    mem_cols = ["image", "N", "saved MB fused", "saved MB step", "saved MB checkpoint"]
    if device.type == "cuda":
        mem_cols += ["peak MB fused", "peak MB step", "peak MB checkpoint"]
    print_table("Memory for backward: fused ops, step-by-step loop, checkpointing", memory, mem_cols)
    if agreement:
        print_table("Our marginals vs densecrf's (image 0, batch 1)", [agreement],
                    ["label agreement", "mean |dQ|", "max |dQ|"])
    write_json(args.json, {"environment": environment(device), "inputs": [source for _, _, source in inputs],
                           "params": {"name": args.params, **params}, "iterations": args.iterations,
                           "rows": rows, "ratios": ratios, "summary": summary, "memory": memory,
                           "agreement": agreement})


if __name__ == "__main__":
    run_main(main, get_args_parser())
