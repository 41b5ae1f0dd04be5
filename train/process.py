"""The start and end of every script's process: the options finished, the process group joined,
the CPU threads and glibc's malloc set, the output folder opened; bad input ends with one line."""
from __future__ import annotations

import ctypes
import os
import re
import sys
from pathlib import Path

import torch

from . import distributed as dist_utils
from .engine import NonFiniteLossError
from .options import finalize
from .outputs import OutputDir


def keep_large_blocks_in_the_heap() -> bool:
    """Stop glibc's malloc from returning large freed blocks to the system (Linux only).

    glibc serves every block over 32 MB with mmap and unmaps it on free, so on the CPU each
    [N, H*W, C] tensor of a CRF iteration (63 MB at N = 4, 500x375, C = 21) page-faults afresh
    at every step: batch-4 forward+backward ran about 1.8x slower per image than batch 1 (see
    README, `MALLOC_MMAP_MAX_=0 python bench/crf.py`). When the setting takes, the fused CRF may
    as well keep its marginals for the backward (``CRFRNNLayer(keep_marginals=True)``: about 10%
    off forward+backward). Returns whether the setting took.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        took = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, ...): leave malloc alone
        return False
    return took


def set_cpu_threads(threads: int, info: dist_utils.DistInfo):
    """``torch.set_num_threads(threads)``; 0 keeps PyTorch's choice, except in a CPU run of several
    processes without ``OMP_NUM_THREADS``, where each process takes its share of the cores."""
    if threads == 0 and info.device.type == "cpu" and info.world_size > 1 \
            and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // info.world_size)
    if threads > 0:
        torch.set_num_threads(threads)


def setup(args) -> dist_utils.DistInfo:
    """Finish the options (:func:`train.options.finalize`), join the process group, set the CPU
    threads (``--threads``), on the CPU keep large freed blocks in the heap
    (:func:`keep_large_blocks_in_the_heap`; ``info.keep_marginals`` says whether the CRF should
    then keep its marginals). Returns this process's :class:`train.distributed.DistInfo`."""
    finalize(args)
    info = dist_utils.init_distributed(args.device)
    set_cpu_threads(args.threads, info)
    if info.device.type == "cpu":
        info.keep_marginals = keep_large_blocks_in_the_heap()
    return info


#: The options that name a file a run reads: never written by it, even with --overwrite. (A
#: --resume checkpoint outside --out-dir cannot be written; one inside it continues that run.)
INPUT_FILE_OPTIONS = ("init", "dcnn", "checkpoint", "vgg_weights")


def open_output_dir(args, names, protect=()) -> OutputDir:
    """``--out-dir`` as an :class:`train.outputs.OutputDir` (``--overwrite``; ``protect``: the
    run's inputs, besides the files its INPUT_FILE_OPTIONS name), after checking that the run may
    write every one of ``names`` (a ``FileExistsError`` before any work otherwise). A
    ``--resume`` of a checkpoint in ``--out-dir`` continues the run that wrote those files, so it
    may replace them. An empty ``--out-dir`` is refused (it would mean the current folder).

    Rank 0 alone writes files, so it alone checks, and tells the other processes the verdict
    (they would otherwise see the files rank 0 has begun to write as someone else's)."""
    if not str(args.out_dir).strip():
        raise ValueError("--out-dir is empty: give the folder to write to")
    folder = Path(args.out_dir)
    resume = getattr(args, "resume", None)
    continues_here = bool(resume) and Path(resume).resolve().parent == folder.resolve()
    inputs = [getattr(args, name, None) for name in INPUT_FILE_OPTIONS]
    protect = [*protect, *(path for path in inputs if isinstance(path, (str, Path)) and str(path))]
    if not dist_utils.is_main_process():
        refusal = dist_utils.broadcast_object(None)
        if refusal:
            raise FileExistsError(refusal)
        return OutputDir(folder, overwrite=True)           # writes nothing: nothing to check
    out = OutputDir(folder, overwrite=args.overwrite, protect=protect, keep=names if continues_here else ())
    try:
        out.check_free(names)
    except FileExistsError as e:
        dist_utils.broadcast_object(str(e))
        raise
    dist_utils.broadcast_object(None)
    return out


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line. An error raised in a DataLoader worker arrives
    wrapped in the worker's traceback: its own message is the last line of that."""
    text = str(error).strip()
    if "\nOriginal Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1].strip())
    return " ".join(text.split()) or type(error).__name__


def run_main(main, parser):
    """Parse, run ``main(args)``; a NaN/Inf loss, bad input (a missing, malformed or unreadable
    file or dataset, a bad option) or a failed write (disk full, a file the run may not replace)
    ends with a one-line message and exit status 2 (other errors: traceback, 1)."""
    args = parser.parse_args()
    finished = False
    try:
        main(args)
        finished = True
    except (NonFiniteLossError, ValueError, OSError) as e:
        if os.environ.get("CRFRNN_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}  (set CRFRNN_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    finally:
        dist_utils.cleanup(finished)
