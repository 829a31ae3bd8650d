"""Sizes as torch.export sees them."""
import torch


def is_symbolic(values) -> bool:
    """Whether a size (an int or a nested tuple / list of them) holds a symbol, as when torch.export traces a model
    for any image size: code that branches on such a size would fix it to the traced example's."""
    if isinstance(values, (tuple, list, torch.Size)):
        return any(is_symbolic(v) for v in values)
    return isinstance(values, (torch.SymInt, torch.SymFloat))
