"""Evaluating a model: the accuracy of a whole (unsplit or already composed) model in one
process, and the re-estimation of BatchNorm statistics (of a model or of one stage of a
chain across ranks) on forward passes the caller runs."""
from contextlib import contextmanager

import torch


@contextmanager
def averaged_norm_statistics(module: torch.nn.Module):
    """Inside the block, every BatchNorm of `module` forgets its running statistics and
    averages them (cumulatively, not by momentum) over the forward passes run in training
    mode; afterwards each keeps the average and gets its momentum back."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


@torch.no_grad()
def evaluate_model(model, data, split, batch_size, device, subset=0, seed=0) -> float:
    """Accuracy on held-out split "val" or "test" (data/sets.py)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in data.heldout_batches(split, batch_size, device=device, subset=subset, seed=seed):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / total
