"""Fixed bandwidths kept as exact floats beside their logarithms in a module's buffers.

A CRF layer with fixed bandwidths stores their logs in buffers (so that they travel in the state
dict) but computes with the floats it was given: 121.0, not the exp of its float32 log, so that
the lattice it builds is the one densecrf builds for sigma = 121. The two copies must stay in
step whichever way one of them changes; `FixedBandwidths` keeps them so.
"""
import math

import torch


class FixedBandwidths:
    """The floats of fixed bandwidths, kept in step with the buffers that hold their logs.

    Args:
        sigmas (sequence of sequences of float): one group per buffer, e.g.
            ((sigma_xy, sigma_rgb), (sigma_xy,)) for buffers Tensor[2] and Tensor[1].

    The owner calls `follow(buffers)` before it reads `sigmas`: an in-place edit of a buffer
    since the last call makes the floats follow it (exp of the new log, entry by entry), while a
    move to another dtype or device keeps them. A change is seen by the buffers' version counters
    and storage, with no device sync; only then are the buffers read. Not seen: edits through
    ``.data`` (which bypass the version counter), edits of inference tensors (which have none),
    and edits made under torch.compile until the next eager call. `set` changes both copies, and
    `load` wraps a load_state_dict of the buffers.
    """

    def __init__(self, sigmas):
        self.sigmas = tuple(tuple(float(s) for s in group) for group in sigmas)
        self._seen = None  # (stamp of the buffers, their logs in float64) when last read

    def follow(self, buffers) -> bool:
        """Take any in-place change of `buffers` into the floats; True when a float changed."""
        if any(b.device.type == "meta" or b.is_inference() for b in buffers):
            return False
        stamp = tuple((b.data_ptr(), b._version, b.dtype) for b in buffers)
        if self._seen is not None and self._seen[0] == stamp:
            return False
        logs = [b.detach().to("cpu", torch.float64, copy=True) for b in buffers]
        changed = False
        if self._seen is not None:  # the values last seen, cast to the buffers' dtype: what a move gives
            changed = self.take_changed([before.to(b.dtype).double() for before, b in zip(self._seen[1], buffers)],
                                        logs)
        self._seen = (stamp, logs)
        return changed

    def take_changed(self, before, after) -> bool:
        """Bandwidths whose log changed from `before` to `after` (per buffer) become exp(after);
        the others keep their exact floats. True when any changed."""
        changed = False
        sigmas = []
        for floats, old, new in zip(self.sigmas, before, after):
            old, new = old.detach().double().cpu().tolist(), new.detach().double().cpu().tolist()
            changed |= old != new
            sigmas.append(tuple(f if o == n else math.exp(n) for f, o, n in zip(floats, old, new)))
        self.sigmas = tuple(sigmas)
        return changed

    def set(self, sigmas, buffers):
        """New floats, and their logs into `buffers`."""
        self.sigmas = tuple(tuple(float(s) for s in group) for group in sigmas)
        with torch.no_grad():
            for buffer, group in zip(buffers, self.sigmas):
                buffer.copy_(torch.tensor(group, dtype=torch.float64).log())
        self._seen = None
        self.follow(buffers)  # the new logs: the floats' own

    def load(self, buffers, load):
        """Run `load()` (which loads new values into `buffers`), then take the bandwidths that it
        changed; the same ones keep the exact floats they had (float32 logs round them)."""
        self.follow(buffers)  # an in-place edit since the last call counts first
        before = [b.detach().clone() for b in buffers]
        load()
        self.take_changed(before, buffers)
        self._seen = None
        self.follow(buffers)  # the loaded logs: the floats' own
