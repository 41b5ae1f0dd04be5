"""Deployment (issue 22): torch.export of CRFRNNLayer and DeepLabCRF with a dynamic batch, height
and width, saved and loaded (torch.export.save/load), and AOTInductor packages loaded in a fresh
Python process, all equal to eager.

What is tested is always the artefact read back from a file (the loaded ExportedProgram, the
package loaded by another process), at sizes other than the example's, so that a dimension that
export silently specialised would show. Export needs an example batch >= 2 and sizes >= 2 (0/1
specialisation: an example dimension of 1 is traced as the constant 1).

Times on this repository's 2-core machine (shared with other jobs, so +-50%): exporting a layer
0.7-4 s, saving 0.2 s, loading 0.5 s, DeepLabCRF (width 1/8) 3.3 s; the default tests here
15-20 s together. AOTInductor compiles a layer's package in 10 s (Inductor's cache warm) to 26 s
(cold), DeepLabCRF's in 60-80 s, and a package loads in 1.4 s: those tests are `slow`
(about 3 min together).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.export import Dim

import crfrnn
import models
from helpers import crf_inputs

#: The example sizes exported at (batch and sizes >= 2, see above), and the sizes the loaded
#: artefacts are run at: other batches, larger and smaller images, a single pixel row.
EXAMPLE = (2, 12, 16)
OTHER_SIZES = [(1, 9, 23), (3, 19, 5)]

#: The layers a deployer exports besides CRFRNNLayer(21) (`loaded_crf`): DeepLab-LargeFOV's
#: preset, the pure-PyTorch reference backend (Python ops), the step-by-step loop instead of the
#: fused op (slow: ten iterations unrolled, 4 s).
LAYERS = {
    "crfrnn": lambda c: crfrnn.CRFRNNLayer(c),
    "deeplab_largefov": lambda c: crfrnn.CRFRNNLayer.deeplab_largefov(c),
    "reference": lambda c: crfrnn.CRFRNNLayer(c, backend="reference"),
    "unfused": lambda c: crfrnn.CRFRNNLayer(c, fused=False),
}

#: The loaded programs run the same crfrnn:: and aten ops as eager, in the same order: measured
#: difference 0.0 (bitwise equal) for every layer, size and the DeepLabCRF's three outputs here
#: (logits up to ~20), and so for the fused layer's AOTInductor package. Bound: a few float32 ulps
#: of logits of that size.
EXACT = dict(rtol=1e-6, atol=1e-5)


def layer_dims(max_batch=16, max_size=2048):
    """N, H, W for the layer's `dynamic_shapes` (unary and image share them)."""
    return Dim("N", min=1, max=max_batch), Dim("H", min=1, max=max_size), Dim("W", min=1, max=max_size)


def export_layer(crf, num_classes):
    n, h, w = layer_dims()
    unary, image = crf_inputs(*EXAMPLE[:1], num_classes, *EXAMPLE[1:], dtype=torch.float32, seed=1)
    return torch.export.export(crf, (unary, image),
                               dynamic_shapes={"unary": {0: n, 2: h, 3: w}, "image": {0: n, 2: h, 3: w}})


def layer_inputs(num_classes, sizes, seed=2):
    return [crf_inputs(n, num_classes, h, w, dtype=torch.float32, seed=seed + i) for i, (n, h, w) in enumerate(sizes)]


def export_save_load(crf, num_classes, path):
    """(the ExportedProgram, the one saved to `path` and loaded back), after an eager call at the
    example's shape: the layer then keeps a spatial lattice, which must not leak into the graph."""
    with torch.no_grad():
        crf(*crf_inputs(*EXAMPLE[:1], num_classes, *EXAMPLE[1:], dtype=torch.float32))
    ep = export_layer(crf, num_classes)
    torch.export.save(ep, path)
    return ep, torch.export.load(path)


def assert_loaded_equals_eager(crf, loaded, num_classes, sizes):
    run = loaded.module()
    for unary, image in layer_inputs(num_classes, sizes):
        with torch.no_grad():
            expected, got = crf(unary, image), run(unary, image)
        assert got.shape == unary.shape
        torch.testing.assert_close(got, expected, **EXACT)


@pytest.fixture(scope="module")
def loaded_crf(tmp_path_factory):
    """(eager CRFRNNLayer(21) in eval mode, its ExportedProgram, the one saved and loaded back)."""
    crf = crfrnn.CRFRNNLayer(21).eval()
    return (crf, *export_save_load(crf, 21, tmp_path_factory.mktemp("export") / "crf.pt2"))


# ------------------------------------------------------------------------------------------
# torch.export: save, load, run at other sizes

def test_layer_exports_with_dynamic_batch_height_and_width(loaded_crf):
    """The loaded program equals the eager layer at the example's size and at other batches and
    sizes; the kept spatial lattice is not baked into the graph."""
    crf, ep, loaded = loaded_crf
    assert not ep.constants and not loaded.constants, f"tensors baked into the graph: {list(ep.constants)}"
    assert_loaded_equals_eager(crf, loaded, 21, [EXAMPLE] + OTHER_SIZES)


def test_loaded_layer_at_one_pixel_and_batch_one(loaded_crf):
    """Dim(min=1) holds: batch 1 and a 1x1 image run, though the example had 2 and 12x16."""
    crf, _, loaded = loaded_crf
    assert_loaded_equals_eager(crf, loaded, 21, [(1, 1, 1), (1, 1, 7)])


@pytest.mark.parametrize("name", ["deeplab_largefov", "reference", pytest.param("unfused", marks=pytest.mark.slow)])
def test_other_layers_export_with_dynamic_batch_height_and_width(name, tmp_path):
    """(4 classes: the code paths are those of 21, at a fifth of the reference backend's time.)"""
    crf = LAYERS[name](4).eval()
    _, loaded = export_save_load(crf, 4, tmp_path / "crf.pt2")
    assert_loaded_equals_eager(crf, loaded, 4, OTHER_SIZES)


def test_loaded_layer_keeps_its_value_checks_and_input_checks(loaded_crf):
    """The layer's value checks are in the graph (asynchronous asserts: RuntimeError with the
    eager message, no counts); shapes outside the exported ones and other dtypes are refused."""
    run = loaded_crf[2].module()
    unary, image = layer_inputs(21, [(1, 9, 11)])[0]
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="unary contains NaN/Inf"):
            run(torch.full_like(unary, float("nan")), image)
        with pytest.raises(RuntimeError, match="image is outside 0..255"):
            run(unary, image + 300)
        with pytest.raises(AssertionError, match="Guard failed: image.size"):  # H of unary and image differ
            run(unary, image[:, :, :-1])
        with pytest.raises(AssertionError, match="Guard failed: .* <= 2048"):  # above the Dim's max
            run(torch.zeros(1, 21, 2049, 2), torch.zeros(1, 3, 2049, 2))
        with pytest.raises(RuntimeError, match="dtype mismatch"):  # exported for float32
            run(unary.double(), image.double())


def test_training_mode_export_is_differentiable(tmp_path):
    """Exported in training mode (its iteration count, the fused forward op that saves what its
    backward needs), the loaded program gives the eager values and gradients, for the unary and
    for the layer's parameters."""
    crf = crfrnn.CRFRNNLayer(4, num_iterations=3).train()
    torch.export.save(export_layer(crf, 4), tmp_path / "crf_train.pt2")
    loaded = torch.export.load(tmp_path / "crf_train.pt2").module()
    unary, image = layer_inputs(4, [(1, 13, 11)])[0]
    grads = {}
    for key, module in (("eager", crf), ("loaded", loaded)):
        u = unary.clone().requires_grad_()
        module(u, image).square().sum().backward()
        grads[key] = {"unary": u.grad, **{n: p.grad for n, p in module.named_parameters()}}
    assert grads["loaded"].keys() == grads["eager"].keys()
    # measured: bitwise equal; gradients up to ~80 (unary) and ~1e4 (parameters) here
    for name, g in grads["eager"].items():
        torch.testing.assert_close(grads["loaded"][name], g, rtol=1e-5, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------
# DeepLabCRF

def small_joint(num_classes=4, seed=0):
    """A DeepLabCRF of width 1/8 whose unary matters: fc8 scaled so that the coarse scores
    reach a few units (a fresh fc8 gives ~0.04, which the CRF's pairwise terms would drown)."""
    torch.manual_seed(seed)
    net = models.deeplab("largefov", num_classes=num_classes, width=0.125)
    with torch.no_grad():
        net.fc8.weight.mul_(100)
    crf = crfrnn.CRFRNNLayer(num_classes, image_mean=models.IMAGENET_MEAN, image_std=models.IMAGENET_STD)
    return models.DeepLabCRF(net, crf).eval()


def normalised_images(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(models.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(models.IMAGENET_STD)[:, None, None]
    return (torch.rand(n, 3, h, w, generator=g) - mean) / std


#: H, W >= 9: DeepLab's stride-8 scores then have at least 2 rows and columns (a single row
#: makes the bilinear upsampling a special case, which export guards against).
JOINT_EXAMPLE = (2, 40, 56)
JOINT_SIZES = [(1, 37, 51), (3, 9, 17)]


def export_joint(joint):
    dims = {0: Dim("N", min=1, max=16), 2: Dim("H", min=9, max=2048), 3: Dim("W", min=9, max=2048)}
    return torch.export.export(joint, (normalised_images(*JOINT_EXAMPLE, seed=0),), dynamic_shapes={"x": dims})


def test_deeplabcrf_exports_with_dynamic_batch_height_and_width(tmp_path):
    """The whole model (DCNN, upsampling, CRF) exports with its dict output; loaded, it equals
    eager at other sizes.

    Fails with torch.export's "Constraints violated (H, W)! ... your code specialized it to be a
    constant (40)" until models/vgg_deeplab.py's upsample_scores stops turning the size into
    Python ints (``int(size[0])`` specialises a symbolic size)."""
    joint = small_joint()
    torch.export.save(export_joint(joint), tmp_path / "joint.pt2")
    loaded = torch.export.load(tmp_path / "joint.pt2").module()
    for i, (n, h, w) in enumerate(JOINT_SIZES):
        x = normalised_images(n, h, w, seed=1 + i)
        with torch.no_grad():
            expected, got = joint(x), loaded(x)
        assert set(got) == {"coarse", "unary", "crf"}
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], **EXACT, msg=key)


# ------------------------------------------------------------------------------------------
# AOTInductor packages, loaded in a fresh process

#: The loading process: `import crfrnn` first (it registers the crfrnn:: ops the package calls),
#: then the package; runs it on each saved input, saves the outputs; and checks that inputs the
#: package was not compiled for are refused (with AOTI_RUNTIME_CHECK_INPUTS=1, set by run_fresh;
#: without it a package reads whatever it is given: an image smaller than the unary out of bounds).
LOADER = textwrap.dedent("""
    import sys, torch
    import crfrnn
    package, inputs, outputs = sys.argv[1:]
    run = torch._inductor.aoti_load_package(package)
    torch.save([run(*args) for args in torch.load(inputs)], outputs)
    args = torch.load(inputs)[0]
    wrong = {"float64": [a.double() for a in args]}
    if len(args) == 2:  # the CRF layer's (unary, image)
        wrong["an image narrower than the unary"] = [args[0], args[1][..., :-1]]
    for what, bad in wrong.items():
        try:
            run(*bad)
        except RuntimeError:
            continue
        raise SystemExit(f"inputs in {what} were not refused")
""")


def run_fresh(code, *args, cwd, check=True):
    env = {**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"}
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def compile_package(ep, path):
    # check_lowerbound=False: with AOTI_RUNTIME_CHECK_INPUTS=1 the package would otherwise refuse
    # batch 1 and sizes 1 (it assumes the >= 2 of export's 0/1 specialisation, not the Dims' min).
    # (package_path as a str: aoti_compile_and_package checks that it returns what it was given)
    return torch._inductor.aoti_compile_and_package(
        ep, package_path=str(path), inductor_configs={"aot_inductor.check_lowerbound": False})


def run_package_fresh(crf, package, tmp_path):
    """Run `package` on a few (unary, image) pairs in a fresh process (LOADER); the outputs with
    eager's."""
    inputs = layer_inputs(21, OTHER_SIZES + [(1, 1, 1)])
    torch.save(inputs, tmp_path / "inputs.pt")
    run_fresh(LOADER, package, tmp_path / "inputs.pt", tmp_path / "outputs.pt", cwd=tmp_path)
    outputs = torch.load(tmp_path / "outputs.pt")
    assert len(outputs) == len(inputs)
    with torch.no_grad():
        return [(got, crf(*args)) for args, got in zip(inputs, outputs)]


@pytest.fixture(scope="module")
def crf_package(tmp_path_factory):
    """(eager CRFRNNLayer(21) in eval mode, the path of its AOTInductor package): 10-26 s."""
    crf = crfrnn.CRFRNNLayer(21).eval()
    return crf, compile_package(export_layer(crf, 21), tmp_path_factory.mktemp("aoti") / "crf.pt2")


@pytest.mark.slow
def test_layer_aoti_package_in_a_fresh_process(crf_package, tmp_path):
    """The fused op's package: the same ops as eager around Inductor's few elementwise kernels
    (measured: bitwise equal)."""
    for got, expected in run_package_fresh(*crf_package, tmp_path):
        torch.testing.assert_close(got, expected, **EXACT)


@pytest.mark.slow
def test_aoti_package_needs_crfrnn_imported(crf_package, tmp_path):
    """Without `import crfrnn` the package's crfrnn:: ops are unknown to the loading process."""
    code = "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])"
    result = run_fresh(code, crf_package[1], cwd=tmp_path, check=False)
    assert result.returncode != 0 and "crfrnn::" in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_reference_backend_aoti_package_in_a_fresh_process(tmp_path):
    """The reference backend's package (~20-28 s): its lattice ops are Python, called back from
    the package; its iterations are aten ops, which Inductor fuses and sums in another order.
    Measured over 30 inputs (logits up to ~17): up to 1.9e-4 from eager."""
    crf = LAYERS["reference"](21).eval()
    package = compile_package(export_layer(crf, 21), tmp_path / "crf.pt2")
    for got, expected in run_package_fresh(crf, package, tmp_path):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_deeplabcrf_aoti_package_in_a_fresh_process(tmp_path):
    """~75-90 s (compilation 60-80 s). Inductor's convolutions round differently from eager's (the
    scores differ in the last bits), and ten mean-field iterations amplify that: the CRF's output
    is compared with eager at a looser bound, and its CRF part alone (eager's CRF on the package's
    own unary) exactly."""
    joint = small_joint()
    package = compile_package(export_joint(joint), tmp_path / "joint.pt2")
    inputs = [(normalised_images(n, h, w, seed=1 + i),) for i, (n, h, w) in enumerate(JOINT_SIZES)]
    torch.save(inputs, tmp_path / "inputs.pt")
    run_fresh(LOADER, package, tmp_path / "inputs.pt", tmp_path / "outputs.pt", cwd=tmp_path)
    outputs = torch.load(tmp_path / "outputs.pt")
    assert len(outputs) == len(inputs)
    for (x,), got in zip(inputs, outputs):
        with torch.no_grad():
            expected = joint(x)
            crf_alone = joint.crf(got["unary"], x)
        # measured: up to 4.5e-6 on scores up to ~4 (these and larger images)
        torch.testing.assert_close(got["coarse"], expected["coarse"], rtol=0, atol=2e-5)
        torch.testing.assert_close(got["unary"], expected["unary"], rtol=0, atol=2e-5)
        torch.testing.assert_close(got["crf"], crf_alone, **EXACT)  # measured 0.0
        # measured: 4.9e-5 on these images, up to 0.029 on others of up to 100x120 (logits up to
        # ~13), the labels all the same
        torch.testing.assert_close(got["crf"], expected["crf"], rtol=0, atol=0.1)
        same = (got["crf"].argmax(1) == expected["crf"].argmax(1)).float().mean()
        assert same >= 0.99, f"{1 - same:.2%} of the labels differ"
