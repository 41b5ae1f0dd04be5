"""Writing a file so that a crash, a kill or a full disk never leaves it half-written, and reading
a ``torch.save`` file with an error that says what is wrong with it.

    atomic_write("runs/x/metrics.json", text.encode())
    state = load_torch_file("vgg16.pth", "VGG-16 state dict")

The bytes go to a temporary file next to the target, ``.NAME.tmpPID``, which is flushed to the
disk (``fsync``) and then renamed over the target (``os.replace``, atomic on POSIX and Windows);
on POSIX the folder is synced too, so the rename survives a power cut. Readers see the old file
or the new one, never a mix. A temporary file that a killed run left behind (same pattern, its
process gone) is removed by the next write of the same target; no other file is ever touched.

:func:`load_torch_file` is ``torch.load(weights_only=True)`` with one ``ValueError`` naming the
file for an empty, truncated, foreign or object-holding file (torch's own errors for these are
an ``EOFError`` with no message, a zip-reader internal error, or advice to pass
``weights_only=False``, which would let the file run code).
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import zipfile

import torch

__all__ = ["atomic_write", "load_torch_file", "temporary_name"]


def temporary_name(path, pid: int | None = None) -> str:
    """The temporary file :func:`atomic_write` uses for ``path``: ``FOLDER/.NAME.tmpPID``."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.tmp{os.getpid() if pid is None else pid}")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process, or no way to tell: keep its file
        return True
    return True


def remove_stale_temporaries(path) -> list:
    """Delete the temporary files of ``path`` (``.NAME.tmpPID``) whose process is gone, or is this
    one (a write of ours that failed before its clean-up). Returns the paths removed."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    pattern = re.compile(rf"\.{re.escape(name)}\.tmp(\d+)")
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry)
        if not match:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _process_exists(pid):
            continue
        stale = os.path.join(folder, entry)
        try:
            if os.path.isfile(stale) and not os.path.islink(stale):
                os.remove(stale)
                removed.append(stale)
        except OSError:
            pass
    return removed


def _sync_folder(folder: str):
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically and durably (its folder must exist).

    Raises ``OSError`` naming ``path`` when the write fails (disk full, file-size limit, no
    permission); ``path`` then keeps its old content and no temporary file is left. Returns
    ``path`` as a string.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        raise OSError(f"could not write {path}: {e.strerror or e}" + (" (is the disk full?)" if full else "")) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _sync_folder(folder)
    return path


def load_torch_file(path, what: str = "checkpoint", map_location="cpu", weights_only: bool = True):
    """``torch.load`` of ``path`` (a ``what``, for the messages); ``FileNotFoundError`` when it is
    missing, a one-line ``ValueError`` naming it when it is not a readable ``torch.save`` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path!r} is empty (0 bytes), not a {what}: was its writing interrupted?")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not a {what}: not a torch.save file ({size} bytes; torch.save writes a "
                         "zip archive, and this file is not one, or is truncated)")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path!r} holds Python objects other than tensors and plain containers, which are not "
                         f"loaded from files (unpickling them could run code): not a {what} of this project. "
                         "In Python, torch.load(path, weights_only=False) reads a file you trust") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path!r} is not a readable {what} (corrupt or truncated: {first_line})") from e
