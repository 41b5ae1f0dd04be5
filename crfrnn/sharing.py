"""Parameter sharing of the CRF's C x C matrices: how a learnable parameter of each sharing holds
the matrix (its entries), the matrix it stands for, and where a state dict's shapes say it was
saved with another sharing.

- The compatibility mu: "potts" (fixed 1 - I, no parameter), "symmetric" (mu = mu^T: its upper
  triangle, C (C + 1) / 2 values) or "full" (C x C, CRF-RNN's).
- Each kernel's weight W_m: "scalar" (w I: one value), "diagonal" (diag(w): C values) or "full"
  (C x C, CRF-RNN's).
"""
import torch

#: Parameter sharing of the compatibility mu.
COMPATIBILITY_SHARING = ("potts", "symmetric", "full")
#: Parameter sharing of each kernel's weight W_m.
KERNEL_WEIGHT_SHARING = ("scalar", "diagonal", "full")


def sharing_entries(matrix, sharing):
    """The entries of a C x C `matrix` that a parameter of `sharing` holds: all of them ("full",
    Tensor[C, C]), its upper triangle ("symmetric", Tensor[C (C + 1) / 2], row by row) or its
    diagonal ("diagonal", Tensor[C]); None for the sharings without per-class entries ("potts":
    no parameter, "scalar": one value shared by every class)."""
    if sharing in ("potts", "scalar"):
        return None
    if sharing == "symmetric":
        rows, cols = torch.triu_indices(*matrix.shape, device=matrix.device)
        return matrix[rows, cols]
    if sharing == "diagonal":
        return torch.diag(matrix)
    return matrix


def parameter_shape(sharing, num_classes):
    """Shape of a parameter of `sharing` for C = `num_classes` (None: no parameter)."""
    if sharing == "scalar":
        return ()
    entries = sharing_entries(torch.empty(num_classes, num_classes), sharing)
    return None if entries is None else tuple(entries.shape)


def initial_kernel_weight(sharing, weight, num_classes):
    """w I in the parametrisation of `sharing`: Tensor[] ("scalar"), [C] ("diagonal"), [C, C]."""
    if sharing == "scalar":
        return torch.tensor(float(weight))
    return sharing_entries(float(weight) * torch.eye(num_classes), sharing)


def kernel_weight_matrix(param, sharing, num_classes):
    """The C x C weight matrix W_m that `param` (of `sharing`) stands for."""
    if sharing == "scalar":
        return param * torch.eye(num_classes, dtype=param.dtype, device=param.device)
    if sharing == "diagonal":
        return torch.diag(param)
    return param


def initial_compatibility(sharing, num_classes):
    """The Potts start 1 - I in the parametrisation of `sharing` (None for "potts": fixed)."""
    return sharing_entries(1.0 - torch.eye(num_classes), sharing)


def compatibility_matrix(param, sharing, num_classes, dtype, device):
    """The C x C compatibility mu that `param` (of `sharing`; None for "potts") stands for."""
    if sharing == "potts":
        return 1.0 - torch.eye(num_classes, dtype=dtype, device=device)
    if sharing == "symmetric":
        rows, cols = torch.triu_indices(num_classes, num_classes, device=param.device)
        upper = torch.zeros(num_classes, num_classes, dtype=param.dtype, device=param.device)
        upper = upper.index_put((rows, cols), param)
        return upper + upper.triu(1).t()
    return param


def mismatch(state_dict, prefix, parameters, num_classes):
    """A message when the state dict's parameter shapes are another sharing's or class count's,
    else None. `parameters`: (name, constructor option, its value, the option's choices) of each
    matrix parameter. A missing entry is left to load_state_dict: strict, it names the missing
    key; strict=False keeps the module's own value (PyTorch does not tell a module which of the
    two it is)."""
    for name, option, sharing, kinds in parameters:
        if prefix + name not in state_dict:
            continue
        shapes = {kind: parameter_shape(kind, num_classes) for kind in kinds}
        got = tuple(state_dict[prefix + name].shape)
        if got == shapes[sharing]:
            continue
        guess = [kind for kind, shape in shapes.items() if shape == got]
        found = f"shape {list(got)}"
        found += f" ({option}='{guess[0]}')" if guess else " (another number of classes?)"
        needed = "no entry" if shapes[sharing] is None else f"shape {list(shapes[sharing])}"
        return (f"{prefix}{name}: the state dict has {found}, but this layer was built with "
                f"{option}='{sharing}' for {num_classes} classes, which needs {needed}")
    return None
