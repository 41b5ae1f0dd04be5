"""train.data: the synthetic set, paired transforms, VOC/SBD readers, samplers, collate."""
import numpy as np
import pytest
import torch
from PIL import Image

from train.data import (SBDSegmentation, SegmentationSet, ShardSampler, StreamBatchSampler,
                        SyntheticShapes, VOCAugmented, VOCSegmentation, build_dataset, denormalize,
                        pad_collate, train_transform)
from train.data.transforms import (IMAGENET_MEAN, Compose, Normalize, RandomCrop,
                                   RandomHorizontalFlip, RandomScale, to_tensors)
from train.reports import PALETTE


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_well_formed():
    a = SyntheticShapes(10, size=(48, 64), num_classes=5, seed=3)
    b = SyntheticShapes(10, size=(48, 64), num_classes=5, seed=3)
    for i in (0, 7, 9):
        ia, la = a[i]
        ib, lb = b[i]
        assert ia.shape == (48, 64, 3) and ia.dtype == np.uint8
        assert la.shape == (48, 64) and la.dtype == np.int64
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        assert la.min() >= 0 and la.max() < 5
    # index order does not matter (no hidden state), other seeds/splits differ
    np.testing.assert_array_equal(SyntheticShapes(10, size=(48, 64), num_classes=5, seed=3)[9][0], a[9][0])
    assert not np.array_equal(SyntheticShapes(10, size=(48, 64), num_classes=5, seed=4)[0][0], a[0][0])
    assert not np.array_equal(SyntheticShapes(10, size=(48, 64), num_classes=5, seed=3, split="val")[0][0], a[0][0])


def test_synthetic_objects_have_sharp_colour_edges():
    """Across an object boundary the colour jumps by far more than the noise inside a region."""
    ds = SyntheticShapes(20, size=64, num_classes=6, seed=0, noise=0.0)
    jumps, inside = [], []
    for i in range(20):
        img, lab = ds[i]
        img = img.astype(float)
        d = np.abs(img[:, 1:] - img[:, :-1]).sum(-1)
        cross = lab[:, 1:] != lab[:, :-1]
        jumps += list(d[cross])
        inside += list(d[~cross])
    assert np.median(jumps) > 10 * np.median(inside)
    assert len(set(np.concatenate([ds[i][1].ravel() for i in range(20)]))) == 6  # every class occurs


def test_synthetic_void_band_and_bad_args():
    img, lab = SyntheticShapes(4, size=48, num_classes=4, seed=0, void_width=3)[1]
    assert (lab == 255).any()
    clean = SyntheticShapes(4, size=48, num_classes=4, seed=0, void_width=0)[1][1]
    np.testing.assert_array_equal(lab[lab != 255], clean[lab != 255])
    good = dict(size=48, num_classes=4, seed=0)
    for kw, message in ((dict(size=8), "size must be"), (dict(num_classes=1), "num_classes must be >= 2"),
                        (dict(split="nope"), "split must be one of"), (dict(void_width=-1), "void_width must be")):
        with pytest.raises(ValueError, match=message):
            SyntheticShapes(4, **{**good, **kw})
    with pytest.raises(IndexError):
        SyntheticShapes(4, **good)[4]


# ----------------------------------------------------------------------------- transforms
def _coded_pair(h=30, w=40, seed=0):
    """An image whose red channel is 10 x label, so any mismatch in a paired transform shows."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 5, (h, w))
    img = np.stack([lab * 10, rng.integers(0, 255, (h, w)), rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
    return img, lab


@pytest.mark.parametrize("seed", range(4))
def test_crop_and_flip_keep_image_and_label_paired(seed):
    img, lab = _coded_pair()
    t = Compose([RandomCrop(48), RandomHorizontalFlip()])
    x, y = t(*to_tensors(img, lab), np.random.default_rng(seed))
    assert x.shape == (3, 48, 48) and y.shape == (48, 48)
    real = y != 255
    assert int(real.sum()) == 30 * 40                    # the whole image is inside, padding is void
    torch.testing.assert_close(x[0][real], (y[real] * 10).float())
    fill = torch.tensor([255 * m for m in IMAGENET_MEAN])
    torch.testing.assert_close(x[:, ~real], fill[:, None].expand(3, int((~real).sum())))


def test_random_scale_uses_nearest_for_labels():
    img, lab = _coded_pair(32, 32)
    x, y = RandomScale(0.5, 0.5)(*to_tensors(img, lab), np.random.default_rng(0))
    assert y.shape == (16, 16) and x.shape == (3, 16, 16)
    assert set(y.unique().tolist()) <= set(range(5))      # no interpolated label values
    np.testing.assert_array_equal(y.numpy(), lab[::2, ::2])  # nearest of a 2x downscale


def test_train_transform_is_deterministic_given_rng_and_normalises():
    img, lab = _coded_pair(50, 60)
    t = train_transform(32, 0.5, 1.5, True)
    a = t(*to_tensors(img, lab), np.random.default_rng(5))
    b = t(*to_tensors(img, lab), np.random.default_rng(5))
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])
    x, _ = Normalize()(*to_tensors(img, lab))
    torch.testing.assert_close(denormalize(x), torch.from_numpy(img).permute(2, 0, 1).float(), atol=1e-3, rtol=0)


def test_to_tensors_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="differ in size"):
        to_tensors(np.zeros((10, 12, 3), np.uint8), np.zeros((10, 11), np.int64))
    with pytest.raises(ValueError, match="RGB"):
        to_tensors(np.zeros((10, 12), np.uint8), np.zeros((10, 12), np.int64))


# ----------------------------------------------------------------------------- VOC / SBD on disk
def _save_label(path, lab, mode="P"):
    if mode == "P":
        im = Image.fromarray(lab.astype(np.uint8), mode="P")
        im.putpalette(PALETTE.reshape(-1).tolist())
    else:
        im = Image.fromarray(PALETTE[lab])  # an RGB rendering: not an index PNG
    im.save(path)


def make_voc(root, ids_train=("a1", "a2", "a3"), ids_val=("b1", "b2"), size=(20, 30), seed=0):
    """Write a VOCdevkit/VOC2012 folder with random images and palette labels; return the labels."""
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = {}
    for k in list(ids_train) + list(ids_val):
        img = rng.integers(0, 255, size + (3,)).astype(np.uint8)
        lab = rng.integers(0, 21, size)
        lab[0] = 255
        Image.fromarray(img).save(voc / "JPEGImages" / f"{k}.jpg", quality=95)
        _save_label(voc / "SegmentationClass" / f"{k}.png", lab)
        labels[k] = lab
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids_train) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids_val) + "\n")
    return voc, labels


def test_voc_reader_on_written_folder(tmp_path):
    voc, labels = make_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", voc):
        ds = VOCSegmentation(root, "train")
        assert ds.ids == ["a1", "a2", "a3"]
        img, lab = ds[1]
        assert img.shape == (20, 30, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(lab, labels["a2"])
    assert len(VOCSegmentation(tmp_path, "val")) == 2
    ds = build_dataset("voc", "val", data_root=tmp_path, sbd_root=None, seed=0, num_samples=1,
                       image_size=0, num_classes=21)
    assert len(ds) == 1 and ds.ids == ["b1"]


def test_voc_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VOCSegmentation(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="VOCdevkit"):
        VOCSegmentation(tmp_path / "empty", "train")
    voc, _ = make_voc(tmp_path / "v")
    with pytest.raises(FileNotFoundError, match="split 'trainval' not found"):
        VOCSegmentation(tmp_path / "v", "trainval")
    (voc / "JPEGImages" / "a2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        VOCSegmentation(tmp_path / "v", "train")
    # malformed: no SegmentationClass folder
    voc2, _ = make_voc(tmp_path / "w")
    import shutil
    shutil.rmtree(voc2 / "SegmentationClass")
    with pytest.raises(FileNotFoundError, match="malformed VOC folder"):
        VOCSegmentation(tmp_path / "w", "train")


def test_voc_rejects_rgb_labels_and_size_mismatch(tmp_path):
    voc, labels = make_voc(tmp_path)
    _save_label(voc / "SegmentationClass" / "a1.png", labels["a1"], mode="RGB")
    ds = VOCSegmentation(tmp_path, "train")
    with pytest.raises(ValueError, match="mode 'RGB'"):
        ds[0]
    _save_label(voc / "SegmentationClass" / "a2.png", labels["a2"][:, :25])
    with pytest.raises(ValueError, match="same size"):
        ds[1]


def test_segmentation_set_rejects_out_of_range_labels(tmp_path):
    voc, labels = make_voc(tmp_path)
    lab = labels["a1"].copy()
    lab[5, 5] = 40
    _save_label(voc / "SegmentationClass" / "a1.png", lab)
    ds = SegmentationSet(VOCSegmentation(tmp_path, "train"), None, 21, seed=0)
    with pytest.raises(ValueError, match=r"a1: label values \[40\]"):
        ds[0]


def _write_sbd(root, ids, size=(20, 30), seed=1):
    from scipy.io import savemat

    for d in ("img", "cls"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = {}
    for k in ids:
        Image.fromarray(rng.integers(0, 255, size + (3,)).astype(np.uint8)).save(root / "img" / f"{k}.jpg")
        lab = rng.integers(0, 21, size).astype(np.uint8)
        savemat(root / "cls" / f"{k}.mat", {"GTcls": {"Segmentation": lab, "Boundaries": np.zeros((21, 1), object),
                                                      "CategoriesPresent": np.unique(lab)}})
        labels[k] = lab
    return labels


def test_sbd_and_train_aug(tmp_path):
    voc, _ = make_voc(tmp_path / "voc")
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    labels = _write_sbd(sbd, ["a1", "b1", "s1", "s2", "s3"])
    (sbd / "train.txt").write_text("a1\nb1\ns1\n")
    (sbd / "val.txt").write_text("s2\ns3\ns1\n")
    ds = SBDSegmentation(tmp_path / "benchmark_RELEASE", "train")
    img, lab = ds[2]
    assert ds.ids[2] == "s1" and img.shape == (20, 30, 3)
    np.testing.assert_array_equal(lab, labels["s1"])
    aug = VOCAugmented(tmp_path / "voc", sbd)
    # VOC train (a1..a3) + SBD minus VOC val (b1) and minus duplicates (a1 from VOC, s1 once)
    assert aug.ids == ["a1", "a2", "a3", "s1", "s2", "s3"]
    assert aug[3][1].shape == (20, 30)
    np.testing.assert_array_equal(aug[4][1], labels["s2"])
    with pytest.raises(FileNotFoundError, match="SBD"):
        SBDSegmentation(tmp_path / "voc", "train")


@pytest.mark.data
def test_shared_voc_val_images(shared_data):
    ds = VOCSegmentation(shared_data, "val")
    assert len(ds) == 46
    wrapped = SegmentationSet(ds, train_transform(321, 0.5, 1.5, True), 21, seed=0)
    for i in (0, 45):
        img, lab = ds[i]
        assert img.shape[:2] == lab.shape
        assert set(np.unique(lab)) <= set(range(21)) | {255}
        x, y, idx = wrapped[(i, 0, i)]
        assert x.shape == (3, 321, 321) and y.shape == (321, 321) and idx == i


# ----------------------------------------------------------------------------- samplers
def _batches(sampler):
    return [[k[0] for k in b] for b in sampler]


def test_stream_sampler_resume_and_epochs():
    full = list(StreamBatchSampler(10, 3, 8, seed=1))
    tail = list(StreamBatchSampler(10, 3, 8, seed=1, start_iter=5))
    assert tail == full[5:]
    flat = [k[0] for b in full for k in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]                      # a fresh permutation each epoch
    assert len({k[2] for b in full for k in b}) == 24    # every sample has its own augmentation key


def test_stream_sampler_shards_the_global_batch():
    one = list(StreamBatchSampler(13, 4, 6, seed=2, world_size=1))
    r0 = list(StreamBatchSampler(13, 2, 6, seed=2, rank=0, world_size=2))
    r1 = list(StreamBatchSampler(13, 2, 6, seed=2, rank=1, world_size=2))
    for b, b0, b1 in zip(one, r0, r1):
        assert b == b0 + b1


def test_shard_sampler_covers_each_index_once():
    got = sorted(list(ShardSampler(7, 0, 3)) + list(ShardSampler(7, 1, 3)) + list(ShardSampler(7, 2, 3)))
    assert got == list(range(7))


def test_pad_collate_pads_with_void_and_reports_sizes():
    a = (torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.long), 0)
    b = (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.long), 1)
    x, y, sizes, idx = pad_collate([a, b])
    assert x.shape == (2, 3, 6, 5) and y.shape == (2, 6, 5)
    assert sizes.tolist() == [[4, 5], [6, 3]] and idx.tolist() == [0, 1]
    assert (y[0, 4:] == 255).all() and (y[1, :, 3:] == 255).all() and (x[0, :, 4:] == 0).all()


def test_segmentation_set_augmentation_depends_only_on_key():
    ds = SegmentationSet(SyntheticShapes(4, size=40, num_classes=6, seed=0), train_transform(32, 0.5, 1.5, True), 6,
                         seed=0)
    a, b = ds[(2, 0, 17)], ds[(2, 0, 17)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
