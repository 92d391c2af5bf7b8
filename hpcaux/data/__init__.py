"""Data sets (CIFAR pickles, ImageNet folders), preparation and on-device augmentation."""
