"""models: the DCNN half (atrous VGG-16 DeepLab variants) and DeepLabCRF (DCNN + CRF-RNN).

Public API:
    deeplab(variant, num_classes=21, msc=False, width=1.0, dropout=0.5)
        variants "largefov", "7x7", "4x4", "4x4-d8" -> DeepLab
    DeepLab: net(x) -> Tensor[N, C, ceil(H/8), ceil(W/8)]; net(x, upsample=True) -> Tensor[N, C, H, W]
    DeepLabCRF(net, crf): joint(x) -> {"coarse", "unary", "crf"}; use_crf, freeze_crf()
    load_vgg16_imagenet(net, state_dict_or_path=None): torchvision VGG-16 ImageNet weights
    save_checkpoint(path, model, **extra) / load_checkpoint(path) -> (model, extra)
    unwrap(model): the plain module behind DDP / DataParallel / torch.compile wrappers
    output_size(H, W), upsample_scores(scores, size), receptive_field(net)
"""
from .checkpoint import build_model, load_checkpoint, model_config, save_checkpoint, unwrap
from .imagenet_init import fetch_torchvision_vgg16, load_vgg16_imagenet
from .joint import IMAGENET_MEAN, IMAGENET_STD, DeepLabCRF
from .vgg_deeplab import (MSC_SOURCES, OUTPUT_STRIDE, VARIANTS, DeepLab, DeepLabConfig, deeplab,
                          output_size, receptive_field, upsample_scores)

__all__ = ["deeplab", "DeepLab", "DeepLabConfig", "DeepLabCRF", "VARIANTS", "MSC_SOURCES",
           "OUTPUT_STRIDE", "load_vgg16_imagenet", "fetch_torchvision_vgg16", "save_checkpoint",
           "load_checkpoint", "build_model", "model_config", "output_size", "upsample_scores",
           "receptive_field", "IMAGENET_MEAN", "IMAGENET_STD", "unwrap"]
