"""Benchmark of the mean-field CRF layer against Krähenbühl's densecrf (pydensecrf2).

A real VOC image resized to 500x375, C = 21 coarse-unary logits (bench/voc_protocol.py), 10
mean-field iterations with DeepLab-LargeFOV's kernels (w1 4, sigma_alpha 121, sigma_beta 5, w2 3,
sigma_gamma 3; --params to change). Times, median of --repeats, lattice builds included as below:

- ours: forward (eval, no grad: the fused C++ op on the CPU), cold (both lattices built in the
  call, as densecrf builds its own in every call) and steady (the layer keeps the spatial
  lattice, which depends on the image shape only, from the previous call of the same shape), and
  forward+backward (gradients to the unary and the C x C parameters, steady), with and without
  --checkpoint-style recomputation, batch 1 and 4;
- densecrf: DenseCRF2D.inference on the same input (one image after the other for a batch;
  single-threaded C++, CPU only), and the ratio densecrf / ours;
- memory: bytes saved for backward (all devices) and, on CUDA, the peak allocation, with and
  without checkpointing; and how closely our marginals match densecrf's.

    python bench/crf.py                                  # CPU, batch 1 and 4
    python bench/crf.py --device cuda --json crf_gpu.json
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crfrnn  # noqa: E402
import densecrf_peer  # noqa: E402
import voc_protocol as vp  # noqa: E402
from common import VOC_ROOT, add_json_option, environment, print_table, run_main, time_it, write_json  # noqa: E402
from crfrnn.crf import CRFRNN_PARAMS, DEEPLAB_LARGEFOV_PARAMS  # noqa: E402

PARAMS = {"deeplab": DEEPLAB_LARGEFOV_PARAMS, "crfrnn": CRFRNN_PARAMS,
          "demo": {"bilateral": (80.0, 13.0, 10.0), "spatial": (3.0, 3.0)}}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    add_json_option(p)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default: 1 4)")
    p.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    p.add_argument("--classes", type=int, default=21, help="number of classes C (default: 21)")
    p.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"),
                   help="image size (default: 500 375)")
    p.add_argument("--params", choices=sorted(PARAMS), default="deeplab",
                   help="kernel parameters: deeplab (121/5/4, 3/3), crfrnn (160/3/5, 3/3), "
                        "demo (80/13/10, 3/3) (default: deeplab)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions, median reported")
    p.add_argument("--skip-densecrf", action="store_true", help="do not run pydensecrf2")
    return p


def load_input(size, classes):
    """(image uint8 [H, W, 3], logits float32 [C, H, W], source) at size (W, H)."""
    if VOC_ROOT.is_dir():
        image_id = vp.image_ids(VOC_ROOT)[0]
        image, label = vp.load_pair(VOC_ROOT, image_id)
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        source = f"VOC {image_id}, coarse-unary protocol"
    else:  # no shared data: blocks of colour with matching labels
        rng = np.random.default_rng(0)
        cells = rng.integers(0, vp.NUM_CLASSES, (size[1] // 50 + 1, size[0] // 50 + 1)).astype(np.uint8)
        label = np.asarray(Image.fromarray(cells).resize(size, Image.NEAREST))
        palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
        image = palette[label]
        source = "synthetic blocks (no ../shared/data), coarse-unary protocol"
    logits = vp.coarse_logits(label, 0).numpy()
    if classes != logits.shape[0]:  # other C: pad with copies of the background score, or cut
        extra = np.repeat(logits[:1] - 2.0, max(0, classes - logits.shape[0]), 0)
        logits = np.concatenate([logits, extra])[:classes]
    return np.array(image), np.ascontiguousarray(logits), source  # a writable copy for torch


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while running fn() (distinct storages)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def main(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but no CUDA GPU is visible")
    params = PARAMS[args.params]
    image, logits, source = load_input(tuple(args.size), args.classes)
    h, w = image.shape[:2]
    run_dense = not args.skip_densecrf and densecrf_peer.available()
    print(f"input: {source}, {w}x{h}, C = {args.classes}, {args.iterations} iterations, "
          f"params {args.params} {params}; {environment(device)}")
    if not run_dense:
        print("densecrf: not run (pydensecrf2 missing or --skip-densecrf)")

    dense_ms = None
    if run_dense:
        dense_ms = time_it(lambda: densecrf_peer.densecrf_probs(image, logits, args.iterations, **params),
                           "cpu", max(1, args.repeats // 2 + 1))

    rows, ratios, memory = [], [], []
    for batch in args.batch:
        img = torch.from_numpy(image).permute(2, 0, 1)[None].float().repeat(batch, 1, 1, 1).to(device)
        unary = torch.from_numpy(logits)[None].repeat(batch, 1, 1, 1).to(device)
        crf = crfrnn.CRFRNNLayer(args.classes, num_iterations=args.iterations,
                                 num_eval_iterations=args.iterations, **params).to(device)
        crf_ckpt = crfrnn.CRFRNNLayer(args.classes, num_iterations=args.iterations,
                                      num_eval_iterations=args.iterations, checkpoint=True,
                                      **params).to(device)

        def forward():
            with torch.no_grad():
                return crf.eval()(unary, img)

        def forward_cold():
            crf.clear_lattice_cache()
            return forward()

        def build():
            with torch.no_grad():
                return crfrnn.crf.build_crf_lattices(img, crf.bilateral, crf.spatial)

        def fwd_bwd(layer):
            u = unary.clone().requires_grad_()
            out = layer.train()(u, img)
            out.logsumexp(1).sum().backward()

        lat = build()
        row = {"N": batch, "device": device.type, "vertices/px bil": lat[0].num_vertices / (batch * h * w),
               "build ms": time_it(build, device, args.repeats),
               "fwd cold ms": time_it(forward_cold, device, args.repeats),
               "fwd ms": time_it(forward, device, args.repeats),
               "fwd+bwd ms": time_it(lambda: fwd_bwd(crf), device, args.repeats),
               "fwd+bwd ckpt ms": time_it(lambda: fwd_bwd(crf_ckpt), device, args.repeats)}
        if dense_ms is not None:
            row["densecrf ms"] = dense_ms * batch
        rows.append(row)
        if dense_ms is not None:
            ratios.append({"N": batch, "densecrf / ours fwd cold": dense_ms * batch / row["fwd cold ms"],
                           "densecrf / ours fwd": dense_ms * batch / row["fwd ms"],
                           "densecrf / ours fwd+bwd": dense_ms * batch / row["fwd+bwd ms"]})

        mem = {"N": batch}
        for name, layer in (("stored", crf), ("checkpoint", crf_ckpt)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            u = unary.clone().requires_grad_()
            out, nbytes = saved_bytes(lambda: layer.train()(u, img))
            mem[f"saved MB {name}"] = nbytes / 2**20
            out.logsumexp(1).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                mem[f"peak MB {name}"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            del out, u
        mem["saved x"] = mem["saved MB stored"] / mem["saved MB checkpoint"]
        memory.append(mem)

    agreement = {}
    if run_dense:
        qd = densecrf_peer.densecrf_probs(image, logits, args.iterations, **params)
        with torch.no_grad():
            out = crf.eval()(torch.from_numpy(logits)[None].to(device),
                             torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device))
        q = torch.softmax(out.float(), 1)[0].cpu().numpy()
        agreement = {"label agreement": float((q.argmax(0) == qd.argmax(0)).mean()),
                     "mean |dQ|": float(np.abs(q - qd).mean()), "max |dQ|": float(np.abs(q - qd).max())}

    print_table(f"CRF layer, {args.iterations} iterations at {w}x{h}, C = {args.classes} "
                "(median ms; fwd cold builds both lattices, fwd and fwd+bwd the bilateral one)", rows,
                ["N", "device", "vertices/px bil", "build ms", "fwd cold ms", "fwd ms", "fwd+bwd ms",
                 "fwd+bwd ckpt ms", "densecrf ms"])
    if ratios:
        print_table("densecrf time / our time (higher = ours faster; densecrf single-threaded on the CPU)",
                    ratios, ["N", "densecrf / ours fwd cold", "densecrf / ours fwd", "densecrf / ours fwd+bwd"])
    mem_cols = ["N", "saved MB stored", "saved MB checkpoint", "saved x"]
    if device.type == "cuda":
        mem_cols += ["peak MB stored", "peak MB checkpoint"]
    print_table("Memory for backward: stored iterations vs checkpointing", memory, mem_cols)
    if agreement:
        print_table("Our marginals vs densecrf's (batch 1)", [agreement],
                    ["label agreement", "mean |dQ|", "max |dQ|"])
    write_json(args.json, {"environment": environment(device), "input": source,
                           "params": {"name": args.params, **params}, "iterations": args.iterations,
                           "rows": rows, "ratios": ratios, "memory": memory, "agreement": agreement})


if __name__ == "__main__":
    run_main(main, get_args_parser())
