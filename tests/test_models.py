import pytest
import torch
import torch.nn as nn

from and_dist.models import ARCHS, AlexNetBN, EmbeddingNet, build_model
from and_dist.models import GlobalBatchNorm, convert_global_bn

# (arch, input side, batch): imagenet ResNets pool adaptively so 64px is enough;
# AlexNet's fc6 expects 256x6x6, i.e. a 224px input.
SHAPES = [
    ("resnet18_cifar", 32, 2),
    ("resnet18", 64, 4),
    ("resnet50", 64, 2),
    ("alexnet_bn", 224, 2),
    ("alexnet", 64, 2),
    ("convnet_small", 32, 4),
    ("convnet_gn", 32, 4),
]
FEAT_DIM = {"resnet18_cifar": 512, "resnet18": 512, "resnet50": 2048, "alexnet_bn": 4096, "alexnet": 4096, "convnet_small": 128, "convnet_gn": 128}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_all_archs_covered():
    assert sorted(a for a, _, _ in SHAPES) == sorted(ARCHS)


@pytest.mark.parametrize("arch,side,batch", SHAPES)
def test_output_shape_and_unit_norm(arch, side, batch):
    torch.manual_seed(0)
    model = build_model(arch)
    assert isinstance(model, EmbeddingNet)
    assert model.feat_dim == FEAT_DIM[arch]
    assert model.head.in_features == FEAT_DIM[arch] and model.head.out_features == 128
    feats = []
    model.backbone.register_forward_hook(lambda mod, inp, out: feats.append(out))
    with torch.no_grad():  # train mode (batch statistics), no autograd to keep it fast
        out = model(torch.randn(batch, 3, side, side))
    assert feats[0].shape == (batch, FEAT_DIM[arch])
    assert out.shape == (batch, 128)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(batch))


def test_low_dim():
    assert build_model("convnet_small", low_dim=32)(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_unknown_arch():
    with pytest.raises(ValueError, match="resnet18_cifar"):
        build_model("vgg16")


@pytest.mark.parametrize("arch,expected", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_imagenet_resnet_param_count_matches_torchvision(arch, expected):
    trunk = build_model(arch).backbone
    assert n_params(trunk) + n_params(nn.Linear(trunk.feat_dim, 1000)) == expected


def test_imagenet_resnet_state_dict_keys():
    """Spot-check torchvision key names so checkpoints interchange (minus fc.*)."""
    keys18 = set(build_model("resnet18").backbone.state_dict())
    for k in ["conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked",
              "layer1.0.conv1.weight", "layer1.1.bn2.bias", "layer2.0.downsample.0.weight",
              "layer2.0.downsample.1.running_var", "layer4.1.conv2.weight"]:  # fmt: skip
        assert k in keys18, k
    assert "layer1.0.downsample.0.weight" not in keys18
    assert len(keys18) == 122 - 2  # torchvision resnet18 has 122 keys incl. fc.weight/fc.bias

    keys50 = set(build_model("resnet50").backbone.state_dict())
    for k in ["layer1.0.downsample.0.weight", "layer1.2.conv3.weight", "layer3.5.bn3.running_mean",
              "layer4.2.bn3.weight"]:  # fmt: skip
        assert k in keys50, k
    assert len(keys50) == 320 - 2  # torchvision resnet50 has 320 keys incl. fc.weight/fc.bias


def test_resnet50_stride_on_3x3():
    """v1.5: the first block of a strided stage downsamples in conv2 (3x3), not conv1 (1x1)."""
    block = build_model("resnet50").backbone.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_resnet18_cifar_stem_and_param_count():
    trunk = build_model("resnet18_cifar").backbone
    assert trunk.conv1.kernel_size == (3, 3) and trunk.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in trunk.modules())
    # ImageNet resnet18 trunk (11,176,512) minus the 7x7 -> 3x3 stem difference
    # (64*3*(49-9) = 7,680) plus a 10-way fc (5,130).
    assert n_params(trunk) + n_params(nn.Linear(512, 10)) == 11_173_962
    # 32x32 input keeps full resolution into layer1 -> 4x4 before pooling.
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(torch.randn(1, 3, 32, 32)))))
    assert trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(x)))).shape == (1, 512, 4, 4)


def test_kaiming_init():
    trunk = build_model("resnet18").backbone
    w = trunk.layer3[0].conv1.weight  # fan_out = 256 * 9
    assert abs(w.std().item() - (2.0 / (256 * 9)) ** 0.5) < 0.002
    assert torch.all(trunk.bn1.weight == 1) and torch.all(trunk.bn1.bias == 0)


def test_alexnet_conv_features():
    trunk = build_model("alexnet_bn").backbone
    assert isinstance(trunk, AlexNetBN)
    trunk.eval()
    with torch.no_grad():
        feats = trunk.conv_features(torch.randn(1, 3, 224, 224))
    # after each ReLU, before the max-pools (the probes' taps)
    expected = {"conv1": (96, 55, 55), "conv2": (256, 27, 27), "conv3": (384, 13, 13),
                "conv4": (384, 13, 13), "conv5": (256, 13, 13)}  # fmt: skip
    assert list(feats) == list(expected)
    for name, shape in expected.items():
        assert isinstance(getattr(trunk, name), nn.Sequential)
        assert feats[name].shape == (1, *shape), name


def _alone_vs_batched(arch):
    torch.manual_seed(0)
    model = build_model(arch).train()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(2)])
    return alone, batched[:2]


def test_convnet_gn_is_batch_independent():
    alone, batched = _alone_vs_batched("convnet_gn")
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-6)


def test_convnet_small_bn_is_batch_dependent():
    # Sanity check that the GN test above can fail: train-mode BN normalises
    # with batch statistics, so a lone sample's output differs.
    alone, batched = _alone_vs_batched("convnet_small")
    assert not torch.allclose(alone, batched, atol=1e-3)


def test_global_bn_is_plain_bn_in_one_process():
    torch.manual_seed(0)
    model = build_model("convnet_small")
    x = torch.randn(8, 3, 32, 32)
    ref = model(x)
    converted = convert_global_bn(model)
    assert any(isinstance(m, GlobalBatchNorm) for m in converted.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert torch.allclose(converted(x), ref, atol=1e-6)
    gn = convert_global_bn(build_model("convnet_gn"))
    assert not any(isinstance(m, GlobalBatchNorm) for m in gn.modules())


def test_alexnet_builds_for_its_input_size_or_refuses_in_one_line():
    from and_dist.platform.errors import UserError
    for size in (64, 96, 224):
        model = build_model("alexnet_bn", image_size=size).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 3, size, size)).shape == (2, 128)
    with pytest.raises(UserError, match="at least 63 px"):
        build_model("alexnet_bn", image_size=32)


def test_global_bn_statistics_are_float32_for_bf16_inputs():
    """Under autocast BN inputs are bf16, where 43 x 3136 = 134848 would round to 135168: the
    statistics (and the count) are kept in float32, the output in the input's dtype."""
    from and_dist.models.global_bn import _GlobalBatchNorm
    x = (torch.randn(43, 2, 56, 56) + 3).bfloat16().requires_grad_()
    w, b = torch.ones(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    y, mean, var = _GlobalBatchNorm.apply(x, w, b, 1e-5)
    ref = x.detach().float()
    assert y.dtype == torch.bfloat16 and mean.dtype == torch.float32
    assert torch.allclose(mean, ref.mean((0, 2, 3)), rtol=1e-6)
    assert torch.allclose(var, ref.var((0, 2, 3)), rtol=1e-5)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
