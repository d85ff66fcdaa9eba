import pytest
import torch

from trainables.models import ModelSpec, build_model, count_parameters

C = 11


def param_count(name: str, **knobs) -> tuple[torch.nn.Module, int]:
    model = build_model(ModelSpec(name, C, img_size=32, pretrained=False, **knobs))
    return model, count_parameters(model)


@pytest.mark.parametrize(
    "name, low, high",
    [("cnn", 20.0e6, 22.0e6), ("vit", 5.5e6, 5.8e6)],
)
def test_single_backbone_models_have_the_seed_size_and_output_shape(name, low, high):
    model, params = param_count(name)
    assert low <= params <= high
    model.eval()
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, C)


def test_cnn_head_is_the_seed_head():
    model, _ = param_count("cnn", dropout=0.2)
    layers = list(model.head)
    assert [type(layer).__name__ for layer in layers] == ["Dropout", "Linear", "ReLU", "Linear"]
    assert layers[0].p == 0.2
    assert (layers[1].in_features, layers[1].out_features, layers[3].out_features) == (1280, 256, C)


def test_vit_head_is_the_seed_head():
    model, _ = param_count("vit")
    layers = list(model.head)
    assert [type(layer).__name__ for layer in layers] == ["LayerNorm", "Linear", "GELU", "Linear"]
    assert (layers[1].in_features, layers[3].out_features) == (192, C)


def test_hybrid_is_both_backbones_plus_its_head():
    hybrid, hybrid_params = param_count("hybrid")
    cnn_backbone = count_parameters(build_model(ModelSpec("cnn", C, 32, pretrained=False)).backbones)
    vit_backbone = count_parameters(build_model(ModelSpec("vit", C, 32, pretrained=False)).backbones)
    head = count_parameters(hybrid.head)
    assert hybrid_params == cnn_backbone + vit_backbone + head
    # Linear(1472,256) + LayerNorm(256) + Linear(256,128) + MHA(128) + Linear(128,C)
    expected_head = (1472 * 256 + 256) + 512 + (256 * 128 + 128) + (4 * 128 * 128 + 4 * 128) + (128 * C + C)
    assert head == expected_head
    hybrid.eval()
    assert hybrid(torch.rand(2, 3, 32, 32)).shape == (2, C)


def test_token_fusion_variant_attends_over_two_tokens():
    model, _ = param_count("hybrid", fusion="two_tokens")
    model.eval()
    assert type(model.head).__name__ == "TwoTokenFusionHead"
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, C)


def test_vit_depth_keeps_the_first_blocks():
    _, full_params = param_count("vit")
    shallow, shallow_params = param_count("vit", vit_depth=3)
    assert len(shallow.backbones[0].backbone.blocks) == 3
    assert shallow_params < full_params
    shallow.eval()
    assert shallow(torch.rand(1, 3, 32, 32)).shape == (1, C)


@pytest.mark.parametrize(
    "spec, message",
    [
        (ModelSpec("resnet", C, pretrained=False), "unknown model"),
        (ModelSpec("vit", C, img_size=40, pretrained=False), "multiple of the ViT patch"),
        (ModelSpec("cnn", 1, pretrained=False), "at least 2 classes"),
        (ModelSpec("hybrid", C, fusion="concat", pretrained=False), "unknown fusion"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(ValueError, match=message):
        build_model(spec)
