"""saq.models: every model builds, has the right output shape and layer types, and the ImageNet
networks carry torchvision's parameter names and shapes."""
import pytest
import torch
from torch import nn

from saq.models import MODEL_NAMES, default_input_size, get_model

# Small inputs where the architecture allows it (all pools are adaptive), to keep CPU tests fast.
SMALL_INPUT = {
    "preact_resnet20": (2, 3, 32, 32),
    "resnet18": (2, 3, 64, 64),
    "resnet50": (1, 3, 64, 64),
    "mobilenetv2_cifar": (2, 3, 32, 32),
    "mobilenetv2": (1, 3, 64, 64),
    "vit_tiny": (1, 3, 224, 224),
    "digits_cnn": (2, 1, 8, 8),
}


def test_model_names():
    assert set(MODEL_NAMES) == {"preact_resnet20", "resnet18", "resnet50", "mobilenetv2_cifar",
                                "mobilenetv2", "vit_tiny", "digits_cnn"}
    assert set(SMALL_INPUT) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_and_layer_types(name):
    torch.manual_seed(0)
    model = get_model(name, num_classes=7).eval()
    shape = SMALL_INPUT[name]
    assert shape[1] == default_input_size(name)[0]
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # The quantizer needs a first conv fed by the input and a last linear producing the logits.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert convs[0].in_channels == shape[1]
    assert linears[-1].out_features == 7


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_in_chans(name):
    chans = 3 if name == "digits_cnn" else 1
    kw = dict(img_size=32, patch_size=4) if name == "vit_tiny" else {}
    model = get_model(name, num_classes=3, in_chans=chans, **kw).eval()
    _, _, h, w = SMALL_INPUT[name]
    h, w = (32, 32) if name == "vit_tiny" else (h, w)
    with torch.no_grad():
        assert model(torch.randn(1, chans, h, w)).shape == (1, 3)


def test_default_input_size():
    assert default_input_size("preact_resnet20") == (3, 32, 32)
    assert default_input_size("mobilenetv2_cifar") == (3, 32, 32)
    assert default_input_size("resnet18") == (3, 224, 224)
    assert default_input_size("vit_tiny") == (3, 224, 224)
    assert default_input_size("digits_cnn") == (1, 8, 8)


def test_train_mode_backward_preact_resnet20():
    model = get_model("preact_resnet20", num_classes=10)
    out = model(torch.randn(4, 3, 32, 32))
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet18_torchvision_names():
    sd = get_model("resnet18", num_classes=1000).state_dict()
    expected = {
        "conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.running_mean": (64,),
        "bn1.num_batches_tracked": (), "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.1.bn2.running_var": (64,), "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer2.0.downsample.1.weight": (128,),
        "layer4.1.conv2.weight": (512, 512, 3, 3), "fc.weight": (1000, 512), "fc.bias": (1000,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert len(sd) == 122  # torchvision resnet18().state_dict() has 122 entries
    assert "layer1.0.downsample.0.weight" not in sd
    assert _num_params(get_model("resnet18", 1000)) == 11_689_512  # torchvision's count


def test_resnet50_mobilenetv2_vit_counts_and_names():
    r50 = get_model("resnet50", num_classes=1000)
    sd = r50.state_dict()
    assert len(sd) == 320 and _num_params(r50) == 25_557_032
    assert tuple(sd["layer1.0.conv3.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd["layer3.0.conv2.weight"].shape) == (256, 256, 3, 3)  # v1.5: stride on 3x3
    assert r50.layer3[0].conv2.stride == (2, 2) and r50.layer3[0].conv1.stride == (1, 1)

    mb = get_model("mobilenetv2", num_classes=1000)
    sd = mb.state_dict()
    assert _num_params(mb) == 3_504_872
    for k, shape in {"features.0.0.weight": (32, 3, 3, 3), "features.0.1.weight": (32,),
                     "features.1.conv.0.0.weight": (32, 1, 3, 3),
                     "features.1.conv.1.weight": (16, 32, 1, 1),
                     "features.2.conv.0.0.weight": (96, 16, 1, 1),
                     "features.2.conv.3.running_mean": (24,),
                     "features.18.0.weight": (1280, 320, 1, 1),
                     "classifier.1.weight": (1000, 1280)}.items():
        assert tuple(sd[k].shape) == shape, k

    vit = get_model("vit_tiny", num_classes=1000)
    sd = vit.state_dict()
    assert _num_params(vit) == 5_717_416  # timm deit_tiny_patch16_224
    for k, shape in {"patch_embed.proj.weight": (192, 3, 16, 16), "cls_token": (1, 1, 192),
                     "pos_embed": (1, 197, 192), "blocks.11.attn.qkv.weight": (576, 192),
                     "blocks.0.mlp.fc2.weight": (192, 768), "head.weight": (1000, 192)}.items():
        assert tuple(sd[k].shape) == shape, k


def test_preact_resnet20_reference_layout():
    model = get_model("preact_resnet20", num_classes=100)
    sd = model.state_dict()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 21  # 19 weighted 3x3 convs + 2 shortcut 1x1 convs
    assert tuple(sd["conv.weight"].shape) == (16, 3, 3, 3)
    assert tuple(sd["layer2.0.downsample.weight"].shape) == (32, 16, 1, 1)
    assert tuple(sd["layer3.2.conv2.weight"].shape) == (64, 64, 3, 3)
    assert tuple(sd["bn.weight"].shape) == (64,) and tuple(sd["fc.weight"].shape) == (100, 64)
    assert "layer1.0.downsample.weight" not in sd
    assert [len(getattr(model, f"layer{k}")) for k in (1, 2, 3)] == [3, 3, 3]


def test_vit_small_input_and_wrong_size():
    vit = get_model("vit_tiny", num_classes=10, img_size=32, patch_size=4).eval()
    assert vit.pos_embed.shape == (1, 65, 192)
    with torch.no_grad():
        assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="img_size"):
        vit(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="patch_size"):
        get_model("vit_tiny", num_classes=10, img_size=30, patch_size=4)


def test_state_dict_round_trip():
    a, b = get_model("mobilenetv2_cifar", 10), get_model("mobilenetv2_cifar", 10)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_unknown_model_name():
    with pytest.raises(ValueError) as e:
        get_model("resnet19", num_classes=10)
    msg = str(e.value)
    assert "name" in msg and "resnet19" in msg and "preact_resnet20" in msg and "digits_cnn" in msg
    with pytest.raises(ValueError, match="resnet19"):
        default_input_size("resnet19")
    with pytest.raises(ValueError, match="num_classes"):
        get_model("digits_cnn", num_classes=0)


def test_digits_cnn_learns():
    """The default model on the default data: well above 95% test accuracy in a few seconds."""
    from saq.data import make_loaders, set_epoch

    torch.manual_seed(0)
    train, test, info = make_loaders("digits", batch_size=64, seed=0)
    model = get_model("digits_cnn", num_classes=info["num_classes"])
    epochs = 5  # 98-99% over torch seeds 0-3 (about 1 s on 2 idle CPU cores)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * len(train))
    for epoch in range(epochs):
        set_epoch(train, epoch)
        model.train()
        for x, y in train:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test)
    assert correct / info["test_size"] > 0.95


@pytest.mark.parametrize("name,size", [("mobilenetv2_cifar", 32), ("mobilenetv2", 64)])
def test_quantized_mobilenetv2_gradients_stay_bounded_at_init(name, size):
    # A block's signed input through the recipe's unsigned activation quantizers makes the
    # gradient grow ~3x per block going backwards (to 4e5 - 3e6 at init, W4A4 LIQ); with gamma 0
    # in each residual branch's last BatchNorm (the default) only the blocks without a shortcut
    # still add to it (mobilenetv2_cifar: 8, mobilenetv2 at 64 px: ~260).
    import torch.nn.functional as F

    import saq

    def max_grad(**kw):
        torch.manual_seed(0)
        m = saq.quantize_model(get_model(name, 10, **kw), 4, 4, quantizer="liq")
        x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
        F.cross_entropy(m(x), y).backward()
        return max(p.grad.abs().max().item() for p in m.parameters() if p.grad is not None)

    bounded = max_grad()
    assert bounded < 1e3
    # the reference code's init: the growth is real, and the default removes most of it
    assert max_grad(zero_init_residual=False) > 1e3 * bounded
