"""The start and end of every script's process: the options finished, the process group joined,
the CPU threads and glibc's malloc set, the output folder made; bad input ends with one line."""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch

from . import distributed as dist_utils
from .engine import NonFiniteLossError
from .options import finalize


def keep_large_blocks_in_the_heap() -> bool:
    """Stop glibc's malloc from returning large freed blocks to the system (Linux only).

    glibc serves every block over 32 MB with mmap and unmaps it on free, so on the CPU each
    [N, H*W, C] tensor of a CRF iteration (63 MB at N = 4, 500x375, C = 21) page-faults afresh
    at every step: batch-4 forward+backward ran about 1.8x slower per image than batch 1 (see
    README, `MALLOC_MMAP_MAX_=0 python bench/crf.py`). Returns whether the setting took.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, ...): leave malloc alone
        return False


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
    (:func:`keep_large_blocks_in_the_heap`), create ``--out-dir``. Returns this process's
    :class:`train.distributed.DistInfo`."""
    finalize(args)
    info = dist_utils.init_distributed(args.device)
    set_cpu_threads(args.threads, info)
    if info.device.type == "cpu":
        keep_large_blocks_in_the_heap()
    if info.is_main:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    return info


def run_main(main, parser):
    """Parse, run ``main(args)``; a NaN/Inf loss or bad input (missing or malformed dataset,
    bad option) ends with a one-line message and exit status 2 (other errors: traceback, 1)."""
    args = parser.parse_args()
    try:
        main(args)
    except (NonFiniteLossError, FileNotFoundError, ValueError) as e:
        if os.environ.get("CRFRNN_TRACEBACK"):
            raise
        print(f"error: {e}  (set CRFRNN_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    finally:
        dist_utils.cleanup()
