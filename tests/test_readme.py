"""The README is true: its Python examples run as they stand, and every repository file it names
is in the repository."""
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_its_examples():
    assert len(PYTHON_BLOCKS) >= 4
    assert any("Lattice(" in b for b in PYTHON_BLOCKS) and any("dense_crf(" in b for b in PYTHON_BLOCKS)


@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("index", [pytest.param(i, marks=pytest.mark.slow)
                                   if "resnet" in b or "aoti_compile_and_package" in b else i
                                   for i, b in enumerate(PYTHON_BLOCKS)])  # a ResNet-50: ~10 s; AOTInductor: ~30 s
def test_each_python_example_runs_on_its_own(index):
    """Each block in a namespace of its own: it must define (or import) every name it uses; and
    feed the library what it expects (no warning, e.g. about an image's colour range)."""
    torch.manual_seed(0)
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})


def test_every_repository_file_the_readme_names_exists():
    """Paths with a folder (``crfrnn/csrc/lattice_math.h``, ``bench/crf.py``) and any ``.md`` or
    ``.sh`` file; the run outputs (``runs/...``, ``OUT/...``) and the data beside the repository
    (``../shared/...``) and paths under a shell variable (``$dst/ImageSets/...``) are not
    repository files."""
    named = set(re.findall(r"(?<![$}\w./-])[\w.-]*(?:/[\w.-]+)+\.(?:py|h|cpp|cu|cuh|inc|md|sh|toml|cfg|txt)\b",
                           README))
    named |= set(re.findall(r"[\w./-]+\.(?:md|sh)\b", README))
    named = {n for n in named if not n.startswith(("runs/", "OUT/", "../", "http", "photos/"))}
    assert "bench/crf.py" in named and "crfrnn/csrc/lattice_math.h" in named
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, missing
