"""Accuracy of a whole (unsplit or already composed) model in one process."""
import torch


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
