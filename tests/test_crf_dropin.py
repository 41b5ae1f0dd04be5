"""Drop-in: the CRF layer on top of a torchvision segmentation model, trained end to end."""
import pytest
import torch
import torch.nn as nn

import crfrnn

segmentation = pytest.importorskip("torchvision.models.segmentation")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SegmentationWithCRF(nn.Module):
    """Any net returning {"out": logits [N, C, H, W]} followed by the CRF on the same input."""

    def __init__(self, net, crf):
        super().__init__()
        self.net, self.crf = net, crf

    def forward(self, x):  # x: ImageNet-normalised [N, 3, H, W]; the CRF undoes the normalisation
        return self.crf(self.net(x)["out"], x)


def test_fcn_resnet50_with_crf_trains_end_to_end():
    torch.manual_seed(0)
    num_classes = 3
    net = segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes,
                                    aux_loss=False)
    crf = crfrnn.CRFRNNLayer(num_classes, num_iterations=3, bilateral=(10.0, 20.0, 3.0),
                             spatial=(2.0, 2.0), image_mean=MEAN, image_std=STD)
    model = SegmentationWithCRF(net, crf).train()

    # Two images with a bright square on a dark background; the square is class 1 or 2.
    rgb = torch.full((2, 3, 48, 48), 0.1)
    target = torch.zeros(2, 48, 48, dtype=torch.long)
    rgb[0, :, 10:30, 12:34] = 0.9
    target[0, 10:30, 12:34] = 1
    rgb[1, :, 20:44, 5:25] = 0.7
    target[1, 20:44, 5:25] = 2
    x = (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crf_start = crf.compatibility.detach().clone()
    backbone = net.backbone.conv1.weight
    backbone_start = backbone.detach().clone()
    losses = []
    for _ in range(4):
        out = model(x)
        assert out.shape == (2, num_classes, 48, 48)
        loss = nn.functional.cross_entropy(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert not torch.equal(backbone, backbone_start), "no gradient reached the backbone"
    assert not torch.equal(crf.compatibility, crf_start), "the CRF parameters did not move"

    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, num_classes, 48, 48)  # eval mode: 10 iterations
