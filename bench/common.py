"""Helpers shared by the benchmarks: timing, test images, tables, JSON output, and the start and
end of a benchmark's process (:func:`run_main`)."""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))   # after site-packages: an installed crfrnn stays the one measured
from models.files import atomic_write  # noqa: E402  (after the repository is on sys.path)
import crfrnn  # noqa: E402

#: The CRF parameter sets the benchmarks run (--params): DeepLab-LargeFOV's, CRF-RNN's, and the
#: densecrf demo's (sigma_xy, sigma_rgb, w1 / sigma_xy, w2).
CRF_PARAMS = {"deeplab": crfrnn.DEEPLAB_LARGEFOV_PARAMS, "crfasrnn": crfrnn.CRFRNN_PARAMS,
              "demo": {"bilateral": (80.0, 13.0, 10.0), "spatial": (3.0, 3.0)}}
SHARED_DATA = Path(os.environ.get("CRFRNN_SHARED_DATA", REPO.parent / "shared" / "data"))
VOC_ROOT = SHARED_DATA / "VOCdevkit" / "VOC2012"


def add_device_option(p, help="where ours runs: cpu or cuda (default: cpu)"):
    p.add_argument("--device", default="cpu", help=help)


def chosen_device(args):
    """--device as a torch.device; ValueError (run_main's one-line error) for a name torch does
    not know, or CUDA where no GPU is visible."""
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device: expected cpu or cuda, got {args.device!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is visible")
    return device


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device, repeats=5, warmup=1):
    """Median wall time of fn() in milliseconds (GPU work synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def load_rgb(image_id=None, size=(500, 375)):
    """A real VOC image as Tensor[1, 3, H, W] float in 0..255 (resized to `size` = (W, H)), or,
    without ../shared/data, a deterministic synthetic image of the same size (noted in `source`)."""
    from PIL import Image
    if VOC_ROOT.is_dir():
        ids = (VOC_ROOT / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
        image_id = image_id or ids[0]
        img = Image.open(VOC_ROOT / "JPEGImages" / f"{image_id}.jpg").convert("RGB").resize(size, Image.BILINEAR)
        source = f"VOC {image_id}"
        arr = np.asarray(img).copy()
    else:
        rng = np.random.default_rng(0)
        arr = (rng.random((size[1] // 25 + 1, size[0] // 25 + 1, 3)) * 255).astype(np.uint8)
        arr = np.asarray(Image.fromarray(arr).resize(size, Image.NEAREST)).copy()
        source = "synthetic blocks (no ../shared/data)"
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float(), source


def print_table(title, rows, columns):
    """Print rows (list of dicts) as an aligned text table with the given column keys."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def add_json_option(p):
    """``--json PATH`` and ``--overwrite`` (an existing PATH is replaced only with it)."""
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results as JSON (an existing file is replaced only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")


def check_json_target(args):
    """Refuse, before anything is measured, a ``--json`` file that exists (without
    ``--overwrite``) or is a folder, or whose folder does not exist."""
    if not getattr(args, "json", None):
        return
    path = Path(args.json)
    if path.is_dir():
        raise ValueError(f"--json {path} is a folder: give a file name")
    if path.exists() and not args.overwrite:
        raise FileExistsError(f"--json {path} exists: pass --overwrite to replace it, or another name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--json {path}: folder {path.parent} does not exist")


def write_json(path, payload):
    """Write JSON atomically (:func:`models.files.atomic_write`); nothing without ``path``."""
    if not path:
        return
    atomic_write(path, json.dumps(payload, indent=2).encode())
    print(f"\nwrote {path}")


def run_main(main, parser):
    """Parse the options, check ``--json`` (:func:`check_json_target`) and run ``main(args)``;
    bad input (a missing file or folder, a bad option value) or a failed write ends with a
    one-line message and exit status 2."""
    args = parser.parse_args()
    try:
        check_json_target(args)
        main(args)
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


def environment(device):
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu_count"] = os.cpu_count()
    return info
