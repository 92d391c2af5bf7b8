"""Augmentation and normalisation as batched tensor ops on the training device.

Per-sample random crops (4-pixel zero padding) and horizontal flips are drawn from an
explicit torch.Generator, so every rank of a layer-parallel replica that seeds it alike
sees exactly the same augmented batch (the stages' terms must refer to the same x).
"""
import torch
import torch.nn.functional as F


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on the training device. To a GPU through pinned memory, without waiting: a plain
    copy from pageable memory waits for the device to finish its queued work, which would
    be a host synchronisation every step (docs/design.md §2)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding, then a horizontal flip with probability 1/2."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = to_device(torch.randint(0, 2 * padding + 1, (n,), generator=generator), images.device)
    dx = to_device(torch.randint(0, 2 * padding + 1, (n,), generator=generator), images.device)
    flip = to_device(torch.rand(n, generator=generator) < 0.5, images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


def normalize(images_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    mean = to_device(torch.tensor(mean), images_uint8.device).view(1, -1, 1, 1)
    std = to_device(torch.tensor(std), images_uint8.device).view(1, -1, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std
