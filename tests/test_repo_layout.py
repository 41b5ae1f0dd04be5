"""The shape of the repository: no import circle in models/ or train/, models/ independent of
train/, and an installed crfrnn that brings no top-level `models` or `train` package."""
import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages=("models", "train")) -> dict:
    """{module: modules of ``packages`` it imports}, every import counted (also those inside
    functions): a lazy import closes a circle as surely as a top-level one."""
    files = {_module_name(p): p for pkg in packages for p in (REPO / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import name` imports the module pkg.name when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict):
    """One import circle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_lazy_import_circle(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_in_models_or_train():
    graph = import_graph()
    assert {"models.imagenet_init", "models.vgg_deeplab"} <= graph["models"]     # the graph sees
    assert "models.vgg_deeplab" in graph["models.imagenet_init"]                  # package, module
    assert "train.data" in graph["train.metrics"] and "train.data.labels" in graph["train.data.loader"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert "models.imagenet_init" not in graph["models.vgg_deeplab"]


def test_models_do_not_import_train():
    graph = import_graph()
    assert not {m for name, deps in graph.items() if name.startswith("models") for m in deps
                if m.startswith("train")}


def test_vgg_deeplab_imports_alone():
    code = "import models.vgg_deeplab as v; print(v.deeplab('largefov', num_classes=21).fc8.out_channels)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "21", r.stderr


def test_setup_finds_only_the_library():
    """What `pip install .` installs as packages, as setuptools reads setup.cfg."""
    from setuptools.config.setupcfg import read_configuration

    cwd = os.getcwd()
    os.chdir(REPO)                  # packages = find: searches the current folder
    try:
        packages = read_configuration(REPO / "setup.cfg")["options"]["packages"]
    finally:
        os.chdir(cwd)
    assert sorted(packages) == ["crfrnn", "crfrnn.pydensecrf"]  # the library and its pydensecrf drop-in


@pytest.mark.slow
def test_the_wheel_holds_only_crfrnn(tmp_path):
    """Build a wheel from a copy of the sources (the extension compiles: about a minute on 2 cores)
    and list its top-level names: what `pip show -f crfrnn` would list after installing it."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.so", "*.egg-info", "__pycache__", ".pytest_cache"))
    env = dict(os.environ, CRFRNN_NO_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                        "-w", str(tmp_path / "wheel"), str(src)], env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("crfrnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"crfrnn", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert {"crfrnn/layer.py", "crfrnn/pydensecrf/densecrf.py"} <= set(names)
    assert not any(n.startswith(("models/", "train/")) for n in names)
