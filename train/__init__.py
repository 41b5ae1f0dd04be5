"""Training, evaluation and inference for DeepLab + CRF-RNN.

Runnable scripts (each `python train/NAME.py --help`):

- ``joint.py``    end-to-end training of the DCNN and the CRF-RNN layer (the main job);
- ``dcnn.py``     stage 1: the DCNN alone (DeepLab recipe);
- ``crf.py``      stage 2: the CRF on a frozen DCNN (by gradient or by DeepLab's grid search);
- ``evaluate.py`` mIoU, per-class IoU, pixel accuracy and boundary-band accuracy, with and
  without the CRF;
- ``segment.py``  label and overlay PNGs for image files.

Helpers: ``train.data`` (datasets and paired transforms), ``train.metrics``,
``train.checkpoint``, ``train.engine`` (schedules, loops), ``train.distributed``,
``train.visualize``.
"""
