"""Training, evaluation and inference for DeepLab + CRF-RNN (recipes: train/README.md).

Scripts (each `python train/NAME.py --help`): ``joint.py`` (the main job: the DCNN and the
CRF-RNN layer trained end to end), ``dcnn.py`` (stage 1: the DCNN alone), ``crf.py`` (stage 2: the
CRF on a frozen DCNN, by gradient or grid search), ``evaluate.py`` (mIoU, per-class IoU, pixel
and boundary-band accuracy, with and without the CRF), ``segment.py`` (label and overlay PNGs).

What they are made of: ``options`` (the command line and its defaults) and ``engine`` (models and
data of the options, training runs and stages, evaluation), over the base helpers ``process``
(devices, DDP, the output folder, exit on bad input), ``checkpoint`` (training checkpoints and
trained models), ``reports`` (tables, JSON, pictures), ``metrics`` and ``data`` (datasets,
paired transforms, samplers, reading any image file).

``train`` is not installed with ``crfrnn``: run the scripts from the repository
(``python train/joint.py`` or ``python -m train.joint``).
"""
