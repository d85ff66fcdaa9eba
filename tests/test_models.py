import pytest
import timm
import torch

from trainables.models import ModelSpec, build_model, count_parameters, reference_problem
from trainables.spec import CNN_BACKBONE, REFERENCE, VIT_BACKBONE, backbones_of, validate_spec

C = 11
TINY_REFERENCE = "test_resnet"
"""A timm test model of ~0.4 M parameters: a reference that builds and runs in a blink."""


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
        (ModelSpec(REFERENCE, C, pretrained=False), "needs its timm name"),
        (ModelSpec("cnn", C, backbone="convnext_tiny", pretrained=False), "for a reference model only"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(ValueError, match=message):
        build_model(spec)


@pytest.mark.parametrize(
    "backbone, timm_kwargs",
    [(TINY_REFERENCE, {}), ("test_vit", {"img_size": 32})],  # a ViT's position embedding follows the image size
)
def test_a_reference_is_timms_classifier_with_its_own_head(backbone, timm_kwargs):
    model = build_model(ModelSpec(REFERENCE, C, img_size=32, backbone=backbone, pretrained=False))
    assert count_parameters(model) == count_parameters(timm.create_model(backbone, num_classes=C, **timm_kwargs))
    assert isinstance(model.head, torch.nn.Identity)
    model.eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, C)


def test_a_reference_normalises_with_its_own_mean_and_std():
    model = build_model(ModelSpec(REFERENCE, C, img_size=32, backbone="test_efficientnet", pretrained=False))
    normalized = model.backbones[0]
    assert normalized.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert normalized.std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])


def test_a_fixed_size_reference_is_built_for_the_study_image_size():
    """A ViT reference at 32 px: built for 224 px it would refuse the batch."""
    model = build_model(ModelSpec(REFERENCE, C, img_size=32, backbone="vit_tiny_patch16_224", pretrained=False))
    assert len(model.backbones[0].backbone.blocks) == 12  # vit_depth is our vit's knob, not the reference's
    model.eval()
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, C)


def test_reference_problem_names_the_fix():
    assert reference_problem(TINY_REFERENCE) is None
    assert reference_problem("convnext_tiny.fb_in1k") is None  # a pretrained tag is allowed
    message = reference_problem("convnxt_tiny")
    assert message is not None
    assert "convnxt_tiny is not a timm model" in message and "convnext_tiny" in message
    assert "timm.list_models()" in (reference_problem("") or "")


def test_backbones_of_each_model_kind():
    assert backbones_of(ModelSpec("cnn", C)) == (CNN_BACKBONE,)
    assert backbones_of(ModelSpec("vit", C)) == (VIT_BACKBONE,)
    assert backbones_of(ModelSpec("hybrid", C)) == (CNN_BACKBONE, VIT_BACKBONE)
    assert backbones_of(ModelSpec(REFERENCE, C, backbone="convnext_tiny")) == ("convnext_tiny",)


def test_a_model_file_written_before_references_still_loads():
    spec = ModelSpec.from_portable({"name": "vit", "num_classes": C, "img_size": 32, "vit_depth": 4})
    assert spec.backbone == ""
    validate_spec(spec)
    reference = ModelSpec(REFERENCE, C, backbone=TINY_REFERENCE)
    assert ModelSpec.from_portable(reference.portable()) == reference


def test_a_reference_loads_its_weights_from_a_local_file(tmp_path):
    """weights_files stands in for the hub download, as for the lightweight backbones; timm's 1000-class
    head in the file is dropped for the study's classes."""
    torch.manual_seed(0)
    source = timm.create_model(TINY_REFERENCE)
    path = tmp_path / f"{TINY_REFERENCE}.pth"
    torch.save(source.state_dict(), path)
    spec = ModelSpec(REFERENCE, C, img_size=32, backbone=TINY_REFERENCE, weights_files=((TINY_REFERENCE, str(path)),))
    model = build_model(spec)
    loaded = model.backbones[0].backbone
    assert torch.equal(loaded.conv1[0].weight, source.conv1[0].weight)
    assert loaded.get_classifier().out_features == C
