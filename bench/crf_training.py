"""The CRF layer's training speed on a busy machine: the jobs of one training step timed in
interleaved rounds, so that load from other processes falls on all of them alike.

Jobs, on a real VOC image at 500x375 with the coarse-unary protocol's logits (bench/crf.py's input):
- fused forward (eval, no grad: crfrnn::mean_field_inference, exact: eval_prune=0), the reference
  of the ratios;
- fused forward+backward (crfrnn::mean_field_forward / mean_field_backward), the library's
  defaults (the marginals kept for the backward);
- the same with the marginals recomputed in the backward (keep_marginals=False);
- the step-by-step autograd loop's forward+backward (mean_field(..., fused=False));
- with --crfasrnn DIR: sadeepj/crfasrnn_pytorch's forward+backward (one image per call).

Each round runs every job once, in this order; wall and process CPU time are recorded per call
and the medians over rounds reported, with the ratios the fused backward is judged by. Process CPU
time is the steadier measure when other jobs share the cores; at one thread (--threads 1) both
should agree on an idle machine.

    python bench/crf_training.py --threads 1 --iterations 10 --batch 1 --rounds 5
    python bench/crf_training.py --threads 1 --iterations 5 --params crfasrnn --crfasrnn /tmp/crfasrnn
    python bench/crf_training.py --device cuda     # ours on the GPU (crfasrnn_pytorch stays on the CPU)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

# common first: it puts the repository on sys.path (for models and train)
from common import (CRF_PARAMS, add_device_option, add_json_option, chosen_device, environment, run_main, synchronize,
                    write_json)
import crfrnn
import crf as bench_crf


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_json_option(p)
    add_device_option(p, "where ours runs: cpu or cuda (default: cpu; crfasrnn_pytorch runs on the CPU)")
    p.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    p.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds, medians reported (default: 5)")
    p.add_argument("--params", choices=sorted(CRF_PARAMS), default="deeplab",
                   help="kernel parameters, as bench/crf.py's --params (default: deeplab)")
    p.add_argument("--image", type=int, default=0, help="which VOC val.txt image (default: 0, the first)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: 0, torch's own choice)")
    p.add_argument("--keep-large-blocks", action="store_true",
                   help="first call train.process.keep_large_blocks_in_the_heap(), as the training "
                        "scripts do: malloc keeps freed large blocks for every job")
    p.add_argument("--crfasrnn", metavar="DIR", help="a checkout of sadeepj/crfasrnn_pytorch with its "
                   "extension built (bench/crfasrnn_peer.py): time its forward+backward too")
    return p


def make_jobs(args, device):
    """{name: callable} of the jobs, on one input of batch --batch, ours on `device`."""
    classes = 21
    try:
        image, logits, source = bench_crf.load_input((500, 375), classes, args.image)
    except IndexError:
        raise ValueError(f"--image {args.image}: val.txt has no such line") from None
    img = torch.from_numpy(image).permute(2, 0, 1)[None].float().repeat(args.batch, 1, 1, 1).to(device)
    unary = torch.from_numpy(logits)[None].repeat(args.batch, 1, 1, 1).to(device)
    params = CRF_PARAMS[args.params]
    crf = crfrnn.CRFRNNLayer(classes, num_iterations=args.iterations, num_eval_iterations=args.iterations,
                             eval_prune=0.0, **params).to(device)

    def forward():
        with torch.no_grad():
            crf.eval()(unary, img)

    def forward_backward():
        crf.train()(unary.clone().requires_grad_(), img).logsumexp(1).sum().backward()

    def recomputing():
        crf.keep_marginals = False
        try:
            forward_backward()
        finally:
            crf.keep_marginals = True

    def step_by_step():
        with bench_crf.step_by_step(crf):
            forward_backward()

    jobs = {"fused forward (no grad)": forward, "fused forward+backward": forward_backward,
            "fused forward+backward, recomputing Q": recomputing, "step-by-step forward+backward": step_by_step}
    if args.crfasrnn:
        import crfasrnn_peer
        peer = crfasrnn_peer.load_layer(args.crfasrnn, classes, args.iterations, **params)

        img_cpu, unary_cpu = img.cpu(), unary.cpu()

        def theirs():
            for i in range(args.batch):
                peer(img_cpu[i:i + 1], unary_cpu[i:i + 1].clone().requires_grad_()).logsumexp(1).sum().backward()
        jobs["crfasrnn_pytorch forward+backward"] = theirs
    return jobs, source


def time_interleaved(jobs, rounds, device):
    """{name: {"wall_ms": [...], "cpu_ms": [...]}}: each job once per round, after one warm-up each
    (GPU work synchronised)."""
    times = {name: {"wall_ms": [], "cpu_ms": []} for name in jobs}
    for job in jobs.values():
        job()
    for _ in range(rounds):
        for name, job in jobs.items():
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            job()
            synchronize(device)
            times[name]["wall_ms"].append((time.perf_counter() - wall) * 1e3)
            times[name]["cpu_ms"].append((time.process_time() - cpu) * 1e3)
    return times


def main(args):
    if args.iterations < 1 or args.batch < 1 or args.rounds < 1:
        raise ValueError("--iterations, --batch and --rounds must be at least 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.keep_large_blocks:
        from train.process import keep_large_blocks_in_the_heap
        if not keep_large_blocks_in_the_heap():
            raise ValueError("--keep-large-blocks: this malloc takes no such setting (glibc on Linux only)")
    device = chosen_device(args)
    jobs, source = make_jobs(args, device)
    times = time_interleaved(jobs, args.rounds, device)
    print(f"input: {source}, 500x375, C = 21, {args.iterations} iterations, batch {args.batch}, "
          f"--params {args.params}, {args.rounds} rounds, {torch.get_num_threads()} threads, ours on {device}"
          + (", large blocks kept in the heap" if args.keep_large_blocks else ""))
    medians = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    for name, m in medians.items():
        print(f"{name:36s} wall ms median {m['wall_ms']:8.0f}   cpu ms median {m['cpu_ms']:8.0f}")
    ratios = {}
    for clock in ("cpu_ms", "wall_ms"):
        ms = {name: m[clock] for name, m in medians.items()}
        fused = ms["fused forward+backward"]
        ratios[clock] = {"fused forward+backward / fused forward": fused / ms["fused forward (no grad)"],
                         "recomputing Q / fused forward": ms["fused forward+backward, recomputing Q"]
                         / ms["fused forward (no grad)"],
                         "step-by-step / fused forward+backward": ms["step-by-step forward+backward"] / fused}
        if "crfasrnn_pytorch forward+backward" in ms:
            ratios[clock]["crfasrnn_pytorch / fused forward+backward"] = ms["crfasrnn_pytorch forward+backward"] / fused
    for name in ratios["cpu_ms"]:
        print(f"{name:44s} {ratios['cpu_ms'][name]:5.2f}x CPU time, {ratios['wall_ms'][name]:5.2f}x wall")
    write_json(args.json, {"environment": environment(device), "input": source, "iterations": args.iterations,
                           "batch": args.batch, "params": args.params, "rounds": args.rounds,
                           "keep_large_blocks": args.keep_large_blocks, "times": times, "medians": medians,
                           "ratios_cpu_time": ratios["cpu_ms"], "ratios_wall_time": ratios["wall_ms"]})


if __name__ == "__main__":
    run_main(main, get_args_parser())
