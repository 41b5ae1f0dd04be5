"""Training, evaluation and inference for DeepLab + CRF-RNN: the scripts (``python train/NAME.py``)
and their helpers; recipes and the code's layout in train/README.md. Not installed with ``crfrnn``."""
