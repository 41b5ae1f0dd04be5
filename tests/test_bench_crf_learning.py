"""bench/crf_learning.py end to end on a tiny split of the shared VOC images: it runs, prints, and
writes the JSON the issue specifies (five results, each with mIoU, pixel and band accuracy and
21 per-class IoUs or nulls)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def voc_folder(root, source, ids):
    """A VOC2012-layout folder under `root` whose files link to `source`'s."""
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
        (root / sub).mkdir()
        for image_id in ids:
            (root / sub / f"{image_id}.{ext}").symlink_to(source / sub / f"{image_id}.{ext}")
    return root


@pytest.mark.slow
@pytest.mark.data
def test_learning_benchmark_writes_the_specified_json(shared_data, tmp_path, capsys):
    import crf_learning
    import voc_protocol as vp
    source = vp.voc_root(shared_data)
    ids = vp.image_ids(source)
    train = voc_folder(tmp_path / "train", source, ids[:2])
    test = voc_folder(tmp_path / "test", source, ids[2:4])
    args = crf_learning.get_args_parser().parse_args([
        "--train-root", str(train), "--test-root", str(test), "--test-limit", "1", "--epochs", "1",
        "--train-scale", "0.25", "--grid-w1", "4", "6", "--grid-sxy", "121", "--grid-srgb", "5",
        "--also", "potts:scalar", "--json", str(tmp_path / "out.json"), "--no-progress"])
    crf_learning.main(args)
    out = json.loads((tmp_path / "out.json").read_text())
    assert set(out["results"]) == {"unary", "handset", "grid", "learned_matrices", "learned_full"}
    assert set(out["variants"]) == {"learned[potts:scalar]"}
    for result in (*out["results"].values(), *out["variants"].values()):
        assert set(result) == {"miou", "pixel_acc", "band_acc", "per_class_iou"}
        assert 0 < result["miou"] <= 100 and 0 < result["pixel_acc"] <= 100 and 0 < result["band_acc"] <= 100
        assert len(result["per_class_iou"]) == 21
        assert result["per_class_iou"][0] is not None and None in result["per_class_iou"]
    assert out["seconds"] > 0 and len(out["grid"]) == 2
    assert "background" not in out["unseen_classes"] and len(out["unseen_classes"]) >= 10  # 2 images
    assert set(out["phase_seconds"]) == {"grid", "learning", "test"}
    printed = capsys.readouterr().out
    assert "Grid search on the training folder" in printed and "Per-class IoU" in printed
