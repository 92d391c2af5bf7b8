"""Model zoo: every model is a BlockSequence that `partition` can cut into stages."""
from hpcaux.errors import UserError
from hpcaux.models.blocks import BlockSequence


def build_model(arch: str, num_classes: int) -> BlockSequence:
    from hpcaux.models.resnet_cifar import cifar_resnet
    from hpcaux.models.wideresnet import wide_resnet

    if arch.startswith("resnet") and arch != "resnet50":
        return cifar_resnet(int(arch[len("resnet"):]), num_classes)
    if arch == "wrn16_4":
        return wide_resnet(16, 4, num_classes)
    if arch == "wrn28_10":
        return wide_resnet(28, 10, num_classes)
    if arch == "resnet50":
        from hpcaux.models.resnet_imagenet import imagenet_resnet50
        return imagenet_resnet50(num_classes)
    raise UserError(f"unknown model '{arch}'")
