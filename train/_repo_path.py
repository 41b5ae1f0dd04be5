"""Imported first by the scripts when run as files (`python train/joint.py`): puts the repository
root, instead of train/, first on sys.path, so `import models`, `import train...` work and the
scripts' own names (crf.py, ...) do not shadow top-level modules."""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _here:
    sys.path[0] = os.path.dirname(_here)
else:
    sys.path.insert(0, os.path.dirname(_here))
