"""sadeepj/crfasrnn_pytorch's CRF-RNN layer on the same input as ours: a speed peer for training.

Not a dependency: pass a local checkout of https://github.com/sadeepj/crfasrnn_pytorch whose
extension is built in place (``cd DIR/crfasrnn && python setup.py build_ext --inplace``, which
makes ``permuto_cpp*.so`` there). Their layer takes batch 1 only, rebuilds the permutohedral
lattice in every filter call (forward and backward) and normalises CRF-RNN's way ("after"); it
runs on the CPU.
"""
import sys
from pathlib import Path

__all__ = ["load_layer"]


def load_layer(checkout, num_classes, num_iterations, bilateral, spatial):
    """Their ``CrfRnn`` module with our kernel parameters.

    Args:
        checkout (str or Path): the crfasrnn_pytorch checkout (holding ``crfasrnn/``).
        bilateral ((sigma_xy, sigma_rgb, weight)), spatial ((sigma_xy, weight)): as ours.
    Returns:
        a callable (image Tensor[1, 3, H, W] float 0..255, logits Tensor[1, C, H, W]) -> logits.
    Raises:
        FileNotFoundError: no checkout there, or its extension is not built.
    """
    root = Path(checkout).resolve()
    package = root / "crfasrnn"
    if not (package / "crfrnn.py").is_file():
        raise FileNotFoundError(f"--crfasrnn {checkout}: no crfasrnn/crfrnn.py there (a checkout of "
                                "sadeepj/crfasrnn_pytorch is expected)")
    if not list(package.glob("permuto_cpp*.so")) and not list(root.glob("permuto_cpp*.so")):
        raise FileNotFoundError(f"--crfasrnn {checkout}: its extension is not built (run `python setup.py "
                                f"build_ext --inplace` in {package})")
    for path in (str(root), str(package)):  # `crfasrnn.*` and the `permuto_cpp` extension
        if path not in sys.path:
            sys.path.insert(0, path)
    from crfasrnn.crfrnn import CrfRnn
    from crfasrnn.params import DenseCRFParams
    params = DenseCRFParams(alpha=bilateral[0], beta=bilateral[1], bilateral_ker_weight=bilateral[2],
                            gamma=spatial[0], spatial_ker_weight=spatial[1])
    layer = CrfRnn(num_classes, num_iterations=num_iterations, crf_init_params=params)
    return lambda image, logits: layer(image, logits)
