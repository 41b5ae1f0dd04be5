"""Training, evaluation and inference for DeepLab + CRF-RNN.

Runnable scripts (each `python train/NAME.py --help`):

- ``joint.py``    end-to-end training of the DCNN and the CRF-RNN layer (the main job);
- ``dcnn.py``     stage 1: the DCNN alone (DeepLab recipe);
- ``crf.py``      stage 2: the CRF on a frozen DCNN (by gradient or by DeepLab's grid search);
- ``evaluate.py`` mIoU, per-class IoU, pixel accuracy and boundary-band accuracy, with and
  without the CRF;
- ``segment.py``  label and overlay PNGs for image files.

Helpers: ``train.options`` (command-line options, per-dataset defaults, what they build),
``train.process`` (a script's process: setup, exit on bad input), ``train.stages`` (the opening
of a training run, training stages), ``train.engine`` (schedules, losses, loops),
``train.checkpoint`` (training state, resume, loading a trained model), ``train.outputs`` (the
output folder: nothing written outside it, nothing replaced that the run did not create),
``train.reports`` (tables, JSON, pictures), ``train.data`` (datasets, paired transforms, reading
any image file), ``train.metrics``, ``train.distributed``, ``train.visualize``.

``train`` is not installed with ``crfrnn``: run the scripts from the repository
(``python train/joint.py`` or ``python -m train.joint``).
"""
