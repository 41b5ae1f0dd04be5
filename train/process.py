"""A script's process: device and process group (DDP under torchrun; rank 0 alone writes files),
CPU threads and malloc, the output folder, progress bars, and how it ends on bad input.

The output folder (:class:`OutputDir`) keeps two promises: a script writes inside it only, and
never replaces a file it did not create in this run (an earlier run's only with ``--overwrite``,
an input of the run never). Every name is checked before any work (:func:`open_output_dir`).
"""
from __future__ import annotations

import ctypes
import gc
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePath

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm


@dataclass
class DistInfo:
    """This process's place in the run."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------- processes
def _group() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def log(msg: str):
    """Print on rank 0 only."""
    if is_main_process():
        print(msg, flush=True)


def barrier():
    if _group():
        dist.barrier()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``."""
    if not _group():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not _group():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a CPU tensor) summed over the processes."""
    if not _group():
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    x = t.to(device).clone()
    dist.all_reduce(x)
    return x.cpu()


def any_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes and it has something to train."""
    if info.world_size == 1 or not any(p.requires_grad for p in model.parameters()):
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda"
                                               else None)


def keep_large_blocks_in_the_heap() -> bool:
    """Stop glibc's malloc from returning large freed blocks to the system (Linux only); returns
    whether the setting took.

    glibc serves every block over 32 MB with mmap and unmaps it on free, so on the CPU each
    [N, H*W, C] tensor of a CRF iteration (63 MB at N = 4, 500x375, C = 21) page-faults afresh
    at every step: batch-4 forward+backward ran about 1.8x slower per image than batch 1. (The
    CRF's own saved marginals and grids do not need it: the library keeps their blocks between
    steps itself.)
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, ...): leave malloc alone
        return False


def setup(args) -> DistInfo:
    """Choose the device (``--device``), join the process group under torchrun, set the CPU
    threads (``--threads``, where the script has it; 0 keeps PyTorch's choice, except that the
    processes of a CPU run without ``OMP_NUM_THREADS`` share the cores out) and, on the CPU,
    keep large freed blocks in the heap."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    name = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:K, got {args.device!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but no CUDA GPU is available")
    device = torch.device(name if name == "cpu" or ":" in name else f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world, device=device)
    threads = getattr(args, "threads", None) or 0
    if threads == 0 and device.type == "cpu" and world > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // world)
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cpu":
        keep_large_blocks_in_the_heap()
    return info


def cleanup(finished: bool):
    """Leave the process group (if any); ``finished``: every process ended normally, so they wait
    for each other first (a barrier would hang after one of them failed).

    DistributedDataParallel's hooks hold the group through reference cycles: without a collection
    its gloo threads could outlive ``destroy_process_group`` and be torn down with the interpreter,
    which aborts the process ("terminate called without an active exception")."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        barrier()
    gc.collect()
    dist.destroy_process_group()


def progress_bar(iterable=None, *, enabled: bool, **kwargs) -> tqdm:
    """A tqdm bar, drawn only when ``enabled`` and stderr is a terminal; ``bar.disable`` says
    whether it is hidden."""
    return tqdm(iterable, disable=None if enabled else True, dynamic_ncols=True, **kwargs)


# ----------------------------------------------------------------------------- the output folder
class OutputDir:
    """The output folder of one run (module docstring): ``overwrite``: replace files from before
    this run; ``protect``: paths never written (the run's inputs); ``keep``: names this run
    continues from an earlier one (a ``--resume`` d run's checkpoint and log)."""

    def __init__(self, folder, *, overwrite: bool, protect=(), keep=()):
        self.folder = Path(folder)
        self.overwrite = bool(overwrite)
        self._protected = {_identity(p) for p in protect}
        self._mine = {_identity(self.folder / name) for name in keep}
        self.claimed: list[Path] = []

    def path(self, name) -> Path:
        """The path of ``name`` in the folder, claiming nothing; ``ValueError`` for a name that
        would lead out (absolute, empty, a ``.``/``..`` part)."""
        rel = PurePath(name)
        if rel.is_absolute() or rel.drive or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
            raise ValueError(f"refusing to write {str(name)!r}: output names must stay inside {self.folder}")
        return self.folder / rel

    def problem(self, name) -> str | None:
        """Why ``name`` may not be written now (None when it may)."""
        path = self.path(name)
        key = _identity(path)
        if key in self._protected:
            return f"{path} is an input of this run"
        if key in self._mine:
            return None
        if path.is_dir() and not path.is_symlink():
            return f"{path} is a folder"
        if (path.exists() or path.is_symlink()) and not self.overwrite:
            return f"{path} exists"
        return None

    def check_free(self, names):
        """``FileExistsError`` (one line) when any of ``names`` may not be written."""
        for folder in (self.folder, *self.folder.parents):  # the first that exists must be a folder
            if folder.exists():
                if not folder.is_dir():
                    raise NotADirectoryError(f"{folder} is a file, not a folder: choose another --out-dir")
                break
        problems = [p for p in (self.problem(n) for n in names) if p]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise FileExistsError(
                "refusing to replace files this run did not create: " + "; ".join(problems[:3]) + more + ". "
                + ("Inputs are never replaced: choose another --out-dir" if any("an input" in p for p in problems)
                   else "Pass --overwrite to replace them, or choose another --out-dir"))

    def claim(self, name) -> Path:
        """The path of ``name``, now this run's to write (and rewrite); creates the folders on the way."""
        self.check_free([name])
        path = self.path(name)
        if _identity(path) not in {_identity(p) for p in self.claimed}:
            self.claimed.append(path)
        self._mine.add(_identity(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def listing(self) -> str:
        """``FOLDER/{a, b, c}``: the claimed files, for the final "wrote ..." line."""
        names = [str(p.relative_to(self.folder)) for p in self.claimed]
        return f"{self.folder}{os.sep}{{{', '.join(names)}}}" if names else f"nothing in {self.folder}"


def _identity(path) -> str:
    """A key equal for two spellings of the same file (relative/absolute, symlinked folders)."""
    path = Path(path)
    try:
        return os.path.normcase(str(path.parent.resolve() / path.name))
    except OSError:
        return os.path.normcase(os.path.abspath(path))


#: The options that name a file a run reads: never written by it, even with --overwrite.
INPUT_FILE_OPTIONS = ("init", "dcnn", "checkpoint", "vgg_weights")


def open_output_dir(args, names, protect=()) -> OutputDir:
    """``--out-dir`` as an :class:`OutputDir`, once the run may write every one of ``names``.
    ``protect``: inputs besides those of INPUT_FILE_OPTIONS. A ``--resume`` of a checkpoint in
    ``--out-dir`` continues the run that wrote its files, so it may replace them. Rank 0 alone
    writes, so it alone checks, and tells the others."""
    if not str(args.out_dir).strip():
        raise ValueError("--out-dir is empty: give the folder to write to")
    folder = Path(args.out_dir)
    resume = getattr(args, "resume", None)
    continues_here = bool(resume) and Path(resume).resolve().parent == folder.resolve()
    inputs = [getattr(args, name, None) for name in INPUT_FILE_OPTIONS]
    protect = [*protect, *(p for p in inputs if isinstance(p, (str, Path)) and str(p))]
    if not is_main_process():
        refusal = broadcast_object(None)
        if refusal:
            raise FileExistsError(refusal)
        return OutputDir(folder, overwrite=True)           # writes nothing: nothing to check
    out = OutputDir(folder, overwrite=args.overwrite, protect=protect, keep=names if continues_here else ())
    try:
        out.check_free(names)
        lock_folder(folder)
    except FileExistsError as e:
        broadcast_object(str(e))
        raise
    broadcast_object(None)
    return out


_LOCKED = {}  # folder -> the descriptor that holds its lock, for the rest of the process


def lock_folder(folder: Path):
    """Hold an exclusive lock on ``folder`` (created if missing) until this process ends, so that
    a second run into it refuses (``FileExistsError``) instead of interleaving its files with
    this one's; this process may open it again (one script after another in one Python). A
    no-op where there is no flock (Windows)."""
    try:
        import fcntl
    except ImportError:
        return
    key = _identity(folder)
    if key in _LOCKED:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise FileExistsError(f"another run is writing to {folder} now: wait for it to end, or choose another "
                              "--out-dir") from None
    _LOCKED[key] = fd


# ----------------------------------------------------------------------------- the end
def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (one raised in a DataLoader worker arrives wrapped in
    the worker's traceback: its own message is the last line of that)."""
    text = str(error).strip()
    if "\nOriginal Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1].strip())
    return " ".join(text.split()) or type(error).__name__


def run_main(main, parser):
    """Parse, run ``main(args)``. Bad input (``ValueError``, ``OSError``: a bad file or option, a
    failed write), a NaN/Inf loss (``FloatingPointError``) or too little memory ends with one line
    and exit status 2; Ctrl-C with one line and 130; other errors with a traceback and 1."""
    args = parser.parse_args()
    finished = False
    try:
        main(args)
        finished = True
    except (ValueError, OSError, FloatingPointError, MemoryError, torch.OutOfMemoryError) as e:
        if os.environ.get("CRFRNN_TRACEBACK"):
            raise
        memory = "out of memory: " if isinstance(e, (MemoryError, torch.OutOfMemoryError)) else ""
        print(f"error: {memory}{one_line(e)}  (set CRFRNN_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("CRFRNN_TRACEBACK"):
            raise
        resume = " (a training run continues from its last checkpoint: --resume OUT/checkpoint.pt)" \
            if hasattr(args, "resume") else ""
        print(f"interrupted{resume}", file=sys.stderr)
        sys.exit(130)
    finally:
        cleanup(finished)
