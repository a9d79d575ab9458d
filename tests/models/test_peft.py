"""apply_peft / default_target_modules: trainable sets, hand-counted sizes, identity at init."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fgclf.errors import UserError
from fgclf.models import (
    apply_peft, count_parameters, create_model, default_target_modules, list_peft_methods,
    resolve_data_config,
)

ADAPTER_MARK = {"lora": "lora_", "dora": "lora_", "ia3": "ia3_l", "loha": "hada_", "lokr": "lokr_"}


def _x(size: int = 48) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _targeted(model: nn.Module, targets: list[str]) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]


def _lora_hand_count(model: nn.Module, targets: list[str], r: int) -> int:
    """LoRA adds A (r x in x kh x kw) and B (out x r) per targeted Linear/Conv2d."""
    total = 0
    for m in _targeted(model, targets):
        if isinstance(m, nn.Linear):
            total += r * m.in_features + m.out_features * r
        else:
            assert isinstance(m, nn.Conv2d) and m.groups == 1
            kh, kw = m.kernel_size
            total += r * m.in_channels * kh * kw + m.out_channels * r
    return total


def _head_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.get_classifier().parameters())


@pytest.mark.parametrize("name,size,expected", [
    ("test_vit", 32, ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]),
    ("test_efficientnet", 48, ["conv_pw", "conv_pwl"]),
    ("test_convnext", 64, ["mlp.fc1", "mlp.fc2"]),
    ("test_resnet", 48, None),  # full names of the convs inside layerN blocks
])
def test_lora_counts_trainables_and_identity_at_init(name, size, expected):
    kwargs = {"img_size": size} if name == "test_vit" else {}
    base = create_model(name, num_classes=4, **kwargs).eval()
    targets = default_target_modules(base)
    if expected is not None:
        assert targets == expected
    else:
        assert targets and all(t.startswith("layer") and ".conv" in t for t in targets)
        assert "conv1" not in targets  # the stem stays frozen
    reference = copy.deepcopy(base)
    hand = _lora_hand_count(base, targets, r=4) + _head_count(base)
    pm = apply_peft(base, r=4, alpha=8).eval()
    assert count_parameters(pm)["trainable"] == hand
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(pm(_x(size)), reference(_x(size)))  # B starts at zero
    assert resolve_data_config(pm) == resolve_data_config(reference)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "loha", "lokr"])
def test_backward_changes_only_trainable_params(method):
    torch.manual_seed(0)
    base = create_model("test_efficientnet", num_classes=3)
    reference = copy.deepcopy(base).eval()
    pm = apply_peft(base, method=method, r=4)
    with torch.no_grad():
        torch.testing.assert_close(pm.eval()(_x()), reference(_x()))  # every method starts as identity
    pm.train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(ADAPTER_MARK[method] in n or "modules_to_save" in n for n in trainable)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    target = torch.tensor([0, 2])
    for _ in range(2):  # two steps: LoRA's A only gets a gradient once B is non-zero
        opt.zero_grad()
        nn.functional.cross_entropy(pm(_x()), target).backward()
        opt.step()
    for n, p in pm.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), n


def test_lite0_default_lora_count_matches_hand_count():
    # VERIFIED.md: LoRA r=8 on conv_pw/conv_pwl + classifier: ~195k trainable of ~3.6M
    base = create_model("tf_efficientnet_lite0.pypi_in1k", num_classes=20, pretrained=False)
    targets = default_target_modules(base)
    assert targets == ["conv_pw", "conv_pwl"]
    hand = _lora_hand_count(base, targets, r=8) + 1280 * 20 + 20
    counts = count_parameters(apply_peft(base, r=8))
    assert counts["trainable"] == hand
    assert 190_000 < hand < 200_000 and 3_500_000 < counts["total"] < 3_700_000


def test_explicit_targets_and_errors():
    base = create_model("test_vit", num_classes=2, img_size=32)
    pm = apply_peft(copy.deepcopy(base), target_modules=["qkv"], r=2)
    assert count_parameters(pm)["trainable"] == _lora_hand_count(base, ["qkv"], 2) + _head_count(base)
    with pytest.raises(UserError, match=r"\['qkvv'\] match no Linear/Conv layer .* include: .*qkv"):
        apply_peft(copy.deepcopy(base), target_modules=["qkv", "qkvv"])
    with pytest.raises(UserError, match=r"unknown peft method 'lorra'; did you mean: lora"):
        apply_peft(copy.deepcopy(base), method="lorra")
    assert {"lora", "dora", "ia3"} <= set(list_peft_methods())


def test_fallback_targets_all_linear_but_the_classifier():
    class Tiny(nn.Module):
        pretrained_cfg = {"classifier": "head"}

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.body(x))

    model = Tiny()
    assert default_target_modules(model) == ["body.0", "body.2"]
    pm = apply_peft(model, r=2)
    assert count_parameters(pm)["trainable"] == 2 * (6 + 8) + 2 * (8 + 8) + (8 * 3 + 3)
    assert pm(torch.randn(4, 6)).shape == (4, 3)


def test_peft_export_merges_into_plain_model(tmp_path):
    from fgclf.models import save_pretrained

    pm = apply_peft(create_model("test_efficientnet", num_classes=3), r=4).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # make the adapter matter
    save_pretrained(pm, tmp_path / "e", model_name="test_efficientnet", num_classes=3, class_names=None)
    again = create_model(f"file:{tmp_path / 'e'}", num_classes=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(_x()), pm(_x()), rtol=1e-4, atol=1e-5)
    assert any("lora_" in n for n, _ in pm.named_parameters())  # the original keeps its adapters


def test_every_registered_method_is_tested():
    assert set(list_peft_methods()) == set(ADAPTER_MARK)


class _ReadsWeightDirectly(nn.Module):
    """A block whose parent calls F.linear on the child's weight (as torchvision's Swin attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 8)

    def forward(self, x):
        return nn.functional.linear(x, self.qkv.weight, self.qkv.bias)


class _Net(nn.Module):
    pretrained_cfg = {"input_size": (8,), "classifier": "head"}

    def __init__(self) -> None:
        super().__init__()
        self.block, self.fc = _ReadsWeightDirectly(), nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.fc(self.block(x)))


def test_adapters_that_never_run_are_refused():
    with pytest.raises(UserError, match="never run.*block.qkv"):
        apply_peft(_Net(), target_modules=["qkv"])
    pm = apply_peft(_Net(), target_modules=["fc"])  # a layer called through its forward is fine
    assert count_parameters(pm)["trainable"] == 8 * 8 + 8 * 8 + 2 * 8 + 2


def test_adapter_check_follows_a_vit_built_for_another_image_size():
    model = create_model("vit_tiny_patch16_224", num_classes=3, img_size=64)  # pretrained_cfg still says 224
    pm = apply_peft(model, r=2)
    assert pm(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
