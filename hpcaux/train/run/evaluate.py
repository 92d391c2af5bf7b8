"""Accuracy of a whole (unsplit or already composed) model in one process."""
import torch


@torch.no_grad()
def evaluate_model(model, data, batch_size, device, subset=0, seed=0) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in data.test_batches(batch_size, device=device, subset=subset, seed=seed):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / total
