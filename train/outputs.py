"""The folder a script writes to, and the two promises every script keeps there:

1. it writes inside that folder only: a file name that would lead out of it (``..``, an
   absolute path) is refused;
2. it never replaces a file it did not create in this run: a file already there from an earlier
   run, or from anyone else, is replaced only when the user asks with ``--overwrite``, and an
   input of the run (``protect``) never, not even then.

A script claims each file before writing it (:meth:`OutputDir.claim`; checking all of them
first, :meth:`OutputDir.check_free`, refuses before any work is done), writes it atomically
(:func:`models.files.atomic_write`), and ends by listing :attr:`OutputDir.claimed`.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePath

__all__ = ["OutputDir"]


class OutputDir:
    """The output folder of one run (see the module docstring).

    Args:
        folder: the folder (``--out-dir``); created by :meth:`claim`.
        overwrite: replace files that exist before this run (``--overwrite``).
        protect: paths that are never written (the run's inputs), whatever ``overwrite`` says.
        keep: file names (relative to ``folder``) this run continues from an earlier one, e.g.
            the checkpoint and metrics log of a ``--resume`` d run: replaced without ``overwrite``.
    """

    def __init__(self, folder, overwrite: bool = False, protect=(), keep=()):
        self.folder = Path(folder)
        self.overwrite = bool(overwrite)
        self._protected = {_identity(p) for p in protect}
        self._mine = {_identity(self.folder / name) for name in keep}
        self.claimed: list[Path] = []

    def __str__(self):
        return str(self.folder)

    def path(self, name) -> Path:
        """The path of ``name`` inside the folder, claiming nothing; ``ValueError`` when ``name``
        is absolute, empty, or has a ``.``/``..`` part (it would lead out of the folder)."""
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
        """Refuse (``FileExistsError``, one line) when any of ``names`` may not be written: meant
        to be called before the work, with every name the run will write."""
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is a file, not a folder: choose another --out-dir")
        problems = [p for p in (self.problem(n) for n in names) if p]
        if not problems:
            return
        inputs = any("an input" in p for p in problems)
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise FileExistsError(
            "refusing to replace files this run did not create: " + "; ".join(problems[:3]) + more + ". "
            + ("Inputs are never replaced: choose another --out-dir" if inputs else
               "Pass --overwrite to replace them, or choose another --out-dir"))

    def claim(self, name) -> Path:
        """The path of ``name``, now this run's to write (and rewrite); ``FileExistsError`` when
        it may not be written (:meth:`problem`). Creates the folders on the way."""
        self.check_free([name])
        path = self.path(name)
        key = _identity(path)
        if key not in {_identity(p) for p in self.claimed}:
            self.claimed.append(path)
        self._mine.add(key)
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
