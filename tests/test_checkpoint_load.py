"""Loading the best weights into a sharded model: the PEFT adapter's keys as FSDP's loader needs them."""
from __future__ import annotations

import torch


def test_peft_adapter_keys_for_a_sharded_load_reproduce_set_peft_model_state_dict():
    """Under FSDP the adapter goes in through ``set_model_state_dict``, under the model's own names:
    loading the mapped dict with a plain ``load_state_dict`` gives the model that PEFT's loader gives."""
    import timm
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from fgclf.checkpoint import _peft_keys_for_load
    from fgclf.models import apply_peft

    def lora():
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=3)
        return apply_peft(model, method="lora", r=4, alpha=8, dropout=0.0, target_modules=None).eval()

    trained = lora()
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    adapter = get_peft_model_state_dict(trained)
    x = torch.randn(2, 3, 32, 32)

    mapped_into = lora()
    before = {k: v.clone() for k, v in mapped_into.state_dict().items()}
    mapped = _peft_keys_for_load(mapped_into, adapter)
    assert all(torch.equal(before[k], v) for k, v in mapped_into.state_dict().items())  # captured, not loaded
    assert mapped and set(mapped) <= set(before)
    result = mapped_into.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys

    reference = lora()
    set_peft_model_state_dict(reference, adapter)
    with torch.no_grad():
        want = trained(x)
        torch.testing.assert_close(reference(x), want)
        torch.testing.assert_close(mapped_into(x), want)
        assert not torch.allclose(lora()(x), want)  # the adapter matters
