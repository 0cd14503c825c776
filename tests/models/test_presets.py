"""Presets select the right layers per family; heads are replaced; misfits name what fits."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import visionlora as vl
from tests.conftest import tiny_unet

# (constructor, blocks in the last stage, convs per block (without the shortcut))
TORCHVISION_RESNETS = {
    "resnet18": (torchvision.models.resnet18, 2, 2),
    "resnet34": (torchvision.models.resnet34, 3, 2),
    "resnet50": (torchvision.models.resnet50, 3, 3),
    "resnet101": (torchvision.models.resnet101, 3, 3),
    "resnet152": (torchvision.models.resnet152, 3, 3),
    "wide_resnet50_2": (torchvision.models.wide_resnet50_2, 3, 3),
    "resnext50_32x4d": (torchvision.models.resnext50_32x4d, 3, 3),
}


def expected_last_stage(prefix: str, blocks: int, convs: int, shortcut: str) -> list[str]:
    names = []
    for b in range(blocks):
        names += [f"{prefix}.{b}.conv{i}" for i in range(1, convs + 1)]
        if b == 0:
            names.append(f"{prefix}.0.{shortcut}")
    return names


def in_model_order(model: nn.Module, names: list[str]) -> list[str]:
    order = [n for n, _ in model.named_modules()]
    return sorted(names, key=order.index)


@pytest.mark.parametrize("arch", list(TORCHVISION_RESNETS))
def test_torchvision_resnet_last_blocks_is_the_whole_last_stage(arch):
    build, blocks, convs = TORCHVISION_RESNETS[arch]
    with torch.device("meta"):
        model = build()
    expected = expected_last_stage("layer4", blocks, convs, "downsample.0")
    assert vl.expand_preset(model, "preset:resnet-last-blocks") == in_model_order(model, expected)


@pytest.mark.parametrize(
    "arch,blocks,convs,shortcut",
    [
        ("resnet50", 3, 3, "downsample.0"),
        ("resnext50_32x4d", 3, 3, "downsample.0"),
        ("seresnet50", 3, 3, "downsample.0"),  # the SE gate's 1x1 convs (se.fc1/fc2) are not selected
        ("resnet50d", 3, 3, "downsample.1"),  # avg-pool shortcut: the conv is its second module
        ("resnet18", 2, 2, "downsample.0"),
    ],
)
def test_timm_resnet_last_blocks(arch, blocks, convs, shortcut):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    expected = expected_last_stage("layer4", blocks, convs, shortcut)
    assert vl.expand_preset(model, "preset:resnet-last-blocks") == in_model_order(model, expected)


def test_timm_resnetv2_uses_its_own_stage_naming():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model("resnetv2_50x1_bit", pretrained=False)
    expected = expected_last_stage("stages.3.blocks", 3, 3, "downsample.conv")
    assert vl.expand_preset(model, "preset:resnet-last-blocks") == in_model_order(model, expected)


def test_last_n_blocks_counts_back_across_stages():
    model = torchvision.models.resnet18()
    assert vl.expand_preset(model, "preset:resnet-last-blocks:3") == [
        "layer3.1.conv1",
        "layer3.1.conv2",
        "layer4.0.conv1",
        "layer4.0.conv2",
        "layer4.0.downsample.0",
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]


def test_last_convs_form_takes_the_last_n_convs_in_module_order():
    model = torchvision.models.resnet18()
    assert vl.expand_preset(model, "preset:last-convs:3") == [
        "layer4.0.downsample.0",
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]


def unet_names(preset: str) -> list[str]:
    return vl.expand_preset(tiny_unet(), preset)


def test_unet_attention_takes_q_k_v_out_of_self_and_cross_attention():
    names = unet_names("preset:unet-attention")
    unet = tiny_unet()
    attention = [n for n, m in unet.named_modules() if type(m).__name__ == "Attention"]
    # 7 transformer blocks (2 down, 1 mid, 4 up: up blocks hold layers_per_block + 1) × self + cross attention
    assert len(attention) == 14
    assert names == in_model_order(unet, [f"{a}.{c}" for a in attention for c in ("to_q", "to_k", "to_v", "to_out.0")])
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in names


def test_unet_variants_add_feed_forward_and_resnet_convs():
    attention = set(unet_names("preset:unet-attention"))
    with_ff = set(unet_names("preset:unet-attention-ff"))
    locon = set(unet_names("preset:unet-locon"))
    assert {n.rsplit(".ff.", 1)[1] for n in with_ff - attention} == {"net.0.proj", "net.2"}
    added = locon - with_ff
    assert {n.rsplit(".", 1)[1] for n in added} == {"conv1", "conv2", "conv_shortcut"}
    assert all(".resnets." in n for n in added)


def test_unet2dmodel_with_and_without_attention():
    diffusers = pytest.importorskip("diffusers")
    kwargs = dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
    )
    with_attention = diffusers.UNet2DModel(
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), **kwargs
    )
    names = vl.expand_preset(with_attention, "preset:unet-attention")
    assert names and all(n.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v"} or n.endswith("to_out.0") for n in names)
    without = diffusers.UNet2DModel(
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
        **kwargs,
    )
    with pytest.raises(
        vl.TargetError, match=r"'preset:unet-attention' does not fit UNet2DModel; presets that fit it: last-convs"
    ):
        vl.expand_preset(without, "preset:unet-attention")


def test_a_preset_that_does_not_fit_names_the_model_class_and_the_presets_that_fit():
    with pytest.raises(
        vl.TargetError, match=r"does not fit UNet2DConditionModel; presets that fit it: last-convs, unet-attention"
    ):
        vl.apply_lora(tiny_unet(), vl.LoraConfig(targets="preset:resnet-last-blocks"))
    with pytest.raises(
        vl.TargetError, match=r"does not fit ResNet; presets that fit it: resnet-last-blocks, resnet-blocks, last-convs"
    ):
        vl.apply_lora(torchvision.models.resnet18(), vl.LoraConfig(targets="preset:unet-attention"))


@pytest.mark.parametrize(
    "target,message",
    [
        (
            "preset:resnet-lastblocks",
            r"unknown preset 'resnet-lastblocks'; presets: resnet-last-blocks, resnet-blocks, last-convs",
        ),
        ("preset:last-convs", r"last-convs needs a count, e.g. 'preset:last-convs:4'"),
        ("preset:resnet-last-blocks:0", r"must be an integer >= 1, got '0'"),
    ],
)
def test_bad_preset_strings(target, message):
    with pytest.raises(vl.TargetError, match=message):
        vl.expand_preset(torchvision.models.resnet18(), target)


def test_preset_in_a_config_with_resolution_ranks_and_a_new_head():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    heads = vl.replace_head(model, 7)
    cfg = vl.LoraConfig(targets="preset:resnet-last-blocks", trainable=heads, rank_by_resolution={4: 8, 0: 2})
    vl.apply_lora(model, cfg, example_input=torch.randn(1, 3, 64, 64))
    assert heads == ["fc"] and model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"fc.weight", "fc.bias"} <= trainable
    assert {layer.adapter("default").rank for _, layer in vl.state.lora_layers(model)} == {2}  # layer4 runs at 2x2


@pytest.mark.parametrize(
    "build,expected",
    [
        (lambda: torchvision.models.resnet18(), "fc"),
        (lambda: torchvision.models.mobilenet_v3_small(), "classifier.3"),
        (lambda: torchvision.models.vit_b_16(image_size=32), "heads.head"),
    ],
)
def test_replace_head_on_torchvision_models(build, expected):
    model = build().eval()
    assert vl.replace_head(model, 5) == [expected]
    size = 32 if expected == "heads.head" else 64
    assert model(torch.randn(1, 3, size, size)).shape == (1, 5)


def test_replace_head_uses_timm_reset_classifier_including_conv_heads():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10).eval()
    assert vl.replace_head(model, 3) == ["head.fc"]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_presets_on_an_already_adapted_model_name_the_wrapped_layers():
    model = torchvision.models.resnet18()
    vl.apply_lora(model, vl.LoraConfig(targets="preset:resnet-last-blocks:1", rank=2))
    assert vl.expand_preset(model, "preset:resnet-last-blocks:1") == ["layer4.1.conv1", "layer4.1.conv2"]
    assert vl.expand_preset(model, "preset:last-convs:2") == ["layer4.1.conv1", "layer4.1.conv2"]
    vl.apply_lora(model, vl.LoraConfig(targets="preset:resnet-last-blocks:1", rank=2), adapter_name="b")
    unet = tiny_unet()
    vl.apply_lora(unet, vl.LoraConfig(targets="preset:unet-attention-ff", rank=2))
    vl.apply_lora(unet, vl.LoraConfig(targets="preset:unet-attention-ff", rank=2), adapter_name="b")
    assert all(list(layer.adapters) == ["default", "b"] for _, layer in vl.state.lora_layers(unet))


@pytest.mark.parametrize(
    "arch,gates",
    [("skresnet18", ("attn.fc_reduce", "attn.fc_select")), ("resnest14d", ("conv2.fc1", "conv2.fc2"))],
)
def test_attention_gates_inside_composite_convs_are_not_selected(arch, gates):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    names = vl.expand_preset(model, "preset:resnet-last-blocks:1")
    assert names and not any(n.endswith(g) for n in names for g in gates)
    inner = ".paths." if arch == "skresnet18" else ".conv2.conv"
    assert any(inner in n for n in names)  # the composite conv's own convs are


def test_replace_head_on_distilled_and_conv_headed_models():
    timm = pytest.importorskip("timm")
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32).eval()
    assert vl.replace_head(deit, 4) == ["head", "head_dist"]
    assert deit.head.out_features == deit.head_dist.out_features == 4
    squeeze = torchvision.models.squeezenet1_0().eval()
    assert vl.replace_head(squeeze, 6) == ["classifier.1"]
    assert squeeze(torch.randn(1, 3, 64, 64)).shape == (1, 6)
    with pytest.raises(vl.ConfigError, match="num_classes: 0 is invalid"):
        vl.replace_head(squeeze, 0)


def test_a_yaml_config_with_a_preset_and_resolution_ranks():
    import yaml

    text = """
targets: preset:resnet-last-blocks
rank_by_resolution: {4: 8, 0: 2}
trainable: [fc]
"""
    cfg = vl.LoraConfig.from_dict(yaml.safe_load(text))
    model = torchvision.models.resnet18(num_classes=3)
    vl.apply_lora(model, cfg, example_input=vl.models.loading.example_input_for(model, 128))
    ranks = {n: layer.adapter("default").rank for n, layer in vl.state.lora_layers(model)}
    assert ranks == dict.fromkeys(vl.expand_preset(torchvision.models.resnet18(), "preset:resnet-last-blocks"), 8)


def test_resnet_blocks_selects_every_blocks_convs_and_presets_without_a_count_refuse_one():
    model = torchvision.models.resnet18()
    every = vl.expand_preset(model, "preset:resnet-blocks")
    assert every == vl.expand_preset(model, "preset:resnet-last-blocks:8")  # resnet18 has 8 blocks
    assert every[0] == "layer1.0.conv1" and "conv1" not in every and "layer2.0.downsample.0" in every
    for target in ("preset:resnet-blocks:2", "preset:unet-attention:1"):
        with pytest.raises(vl.TargetError, match="takes no count"):
            vl.expand_preset(model, target)
