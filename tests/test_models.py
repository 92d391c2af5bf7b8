"""Models, partition, AuxNet: composing the stages is bit-identical to the unsplit model."""
import pytest
import torch

from hpcaux.errors import UserError
from hpcaux.models import build_model
from hpcaux.models.auxnet import AuxNet
from hpcaux.models.blocks import BoundaryNorm
from hpcaux.models.partition import balanced_cuts, block_flops, block_params, boundary_shapes, make_stages
from hpcaux.train.run.balance import Partition, refine_cuts

CIFAR_MODELS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "wrn16_4", "wrn28_10"]

pytestmark = pytest.mark.quick


IMAGENET_MODELS = ["resnet18", "resnet34", "resnet50"]


def _input(arch):
    torch.manual_seed(0)
    return torch.randn(2, 3, 128, 128) if arch in IMAGENET_MODELS else torch.randn(3, 3, 32, 32)


@pytest.mark.parametrize("arch", CIFAR_MODELS + IMAGENET_MODELS)
def test_partition_round_trip_is_bit_identical(arch):
    torch.manual_seed(0)
    model = build_model(arch, 1000 if arch in IMAGENET_MODELS else 10).eval()
    x = _input(arch)
    with torch.no_grad():
        whole = model(x)
        costs = block_params(model)
        for K in (1, 2, 3, 4):
            stages = make_stages(model, balanced_cuts(costs, K), boundary_norm=False)
            assert len(stages) == K
            h = x
            for stage in stages:
                h = stage(h)
            assert torch.equal(h, whole), (arch, K)


def test_cifar_resnet_depths_and_block_counts():
    for depth in (20, 32, 44, 56, 110):
        model = build_model(f"resnet{depth}", 10)
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        assert convs + 1 == depth  # 6n+1 convs and the final linear layer
        assert len(model) == (depth - 2) // 2 + 2  # stem, 3n blocks (n = (depth-2)/6), head


def test_imagenet_resnets_are_torchvisions_block_by_block():
    """ResNet-18/34/50 are torchvision's networks: same parameters, same logits, one block
    per residual block (2+2+2+2, 3+4+6+3, 3+4+6+3) between the stem and the classifier."""
    from torchvision import models

    for depth, body in ((18, 8), (34, 16), (50, 16)):
        torch.manual_seed(0)
        ours = build_model(f"resnet{depth}", 10).eval()
        reference = getattr(models, f"resnet{depth}")(num_classes=10).eval()
        reference.load_state_dict(dict(zip(reference.state_dict(), ours.state_dict().values())))
        assert len(ours) == body + 2
        x = torch.randn(2, 3, 128, 128)
        with torch.no_grad():
            assert torch.equal(ours(x), reference(x)), depth


def test_balanced_cuts_minimise_the_largest_stage():
    assert balanced_cuts([1, 1, 1, 1], 2) == [2]
    assert balanced_cuts([4, 1, 1, 1, 1], 2) == [1]
    assert balanced_cuts([1, 2, 3, 4, 5, 6], 3) == [3, 5]  # parts 6, 9, 6
    with pytest.raises(UserError, match="larger than the model's 3 blocks"):
        balanced_cuts([1, 1, 1], 4)


def test_block_flops_count_the_convolutions():
    model = build_model("resnet20", 10)
    x = torch.randn(8, 3, 32, 32)
    flops = block_flops(model, x)
    assert len(flops) == len(model) and all(f > 0 for f in flops)
    # conv 3x3 16->16 at 32x32: 2 convs x 16*16*9*1024 MACs per sample
    assert flops[1] == 8 * 2 * 16 * 16 * 9 * 1024
    assert len(block_params(model)) == len(model)


def _summed(costs):
    """Stage times as sums of fixed block costs: a deterministic stand-in for a measurement."""
    calls = []

    def stage_ms(cuts):
        calls.append(list(cuts))
        bounds = [0, *cuts, len(costs)]
        return [float(sum(costs[a:b])) for a, b in zip(bounds, bounds[1:])]
    return stage_ms, calls


def test_refine_cuts_moves_a_cut_while_the_slowest_stage_gets_faster():
    stage_ms, calls = _summed([5, 1, 1, 1, 1, 1])
    assert refine_cuts([5], 6, stage_ms) == ([1], [5.0, 5.0])
    assert calls[0] == [5] and [2] in calls  # it walked there one block at a time
    stage_ms, _ = _summed([1, 2, 3, 4, 5, 6])
    assert refine_cuts([1, 2], 6, stage_ms)[0] == balanced_cuts([1, 2, 3, 4, 5, 6], 3) == [3, 5]


def test_refine_cuts_keeps_a_cut_that_a_move_improves_only_within_the_noise():
    stage_ms, _ = _summed([100, 100, 99, 102])
    assert refine_cuts([2], 4, stage_ms) == ([2], [200.0, 201.0])  # [3] gives 299/102: worse
    stage_ms, _ = _summed([100, 1, 100, 103])
    assert refine_cuts([2], 4, stage_ms, noise=0.02)[0] == [2]  # [3] is 201/103 against 203: 1 %
    assert refine_cuts([2], 4, stage_ms, noise=0.0)[0] == [3]


def test_partition_reports_its_imbalance():
    part = Partition([4], [50.0, 60.0], 32, "configured")
    assert part.imbalance == pytest.approx(60 / 55 - 1)
    assert part.describe() == "cuts [4] (configured): stages take 50.0/60.0 ms per 32 images side by side, " \
                              "imbalance 9.1 %"
    assert part.summary()["cut_stage_ms"] == [50.0, 60.0]


def test_boundary_norm_and_auxnet_shapes():
    model = build_model("resnet20", 10)
    stages = make_stages(model, [4, 7], boundary_norm=True)
    shapes = boundary_shapes(stages, (3, 32, 32))
    assert shapes == [(16, 32, 32), (32, 16, 16)]
    aux = AuxNet(shapes, width=16, depth=2)
    preds = aux(torch.randn(4, 3, 32, 32))
    for k, shape in enumerate(shapes):
        assert preds[k].shape == (4, *shape)
        per_sample = preds[k].flatten(1)
        assert torch.allclose(per_sample.mean(1), torch.zeros(4), atol=1e-5)
        assert torch.allclose(per_sample.var(1, unbiased=False), torch.ones(4), atol=1e-3)
    assert set(aux(torch.randn(2, 3, 32, 32), [1])) == {1}
    x = torch.randn(3, 8, 4, 4) * 50 + 3
    y = BoundaryNorm()(x)
    assert torch.allclose(y.flatten(1).std(1, unbiased=False), torch.ones(3), atol=1e-3)


def test_auxnet_head_layers_deepen_each_boundary_head_on_its_own():
    """auxnet.head_layers: head k has its own convolutions, strided down to its boundary's
    size; the predictions keep their shapes and normalisation."""
    shapes = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    aux = AuxNet(shapes, width=16, depth=1, head_layers=[0, 1, 2])
    assert [len(h.convs) // 2 for h in aux.heads] == [0, 1, 2]
    assert [c.stride for c in aux.heads[2].convs if isinstance(c, torch.nn.Conv2d)] == [(2, 2), (1, 1)]
    preds = aux(torch.randn(4, 3, 32, 32))
    for k, shape in enumerate(shapes):
        assert preds[k].shape == (4, *shape)
        assert torch.allclose(preds[k].flatten(1).var(1, unbiased=False), torch.ones(4), atol=1e-3)
    plain = AuxNet(shapes, width=16, depth=1)
    assert sum(p.numel() for p in aux.parameters()) == sum(p.numel() for p in plain.parameters()) + 3 * (16 * 16 * 9 + 16)


def test_auxnet_is_cheap_relative_to_a_stage():
    model = build_model("resnet20", 10)
    x = torch.randn(32, 3, 32, 32)
    stages = make_stages(model, [4], boundary_norm=True)
    aux = AuxNet(boundary_shapes(stages, (3, 32, 32)), width=32, depth=2)
    aux_flops = sum(block_flops(torch.nn.Sequential(aux.trunk, aux.heads[0].proj), x))
    stage_flops = sum(block_flops(model, x)[4:])
    assert aux_flops < 0.15 * stage_flops, (aux_flops, stage_flops)


def test_auxnet_downsamples_imagenet_inputs():
    aux = AuxNet([(256, 56, 56)], width=8, depth=1, image_size=224)
    assert aux(torch.randn(1, 3, 224, 224))[0].shape == (1, 256, 56, 56)
    assert len(aux.trunk) == 3  # 224 -> 112 -> 56 -> 28
