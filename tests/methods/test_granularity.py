"""PMG: the jigsaw is a permutation of patches, inference adds the four classifiers, and a batch takes
four optimizer steps (one per granularity, then the whole image) exactly as the official loop does."""
from __future__ import annotations

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from fgclf.methods import StepContext, create_method
from fgclf.methods.granularity import jigsaw


def _unjigsaw(images: torch.Tensor, n: int, order: torch.Tensor) -> torch.Tensor:
    return jigsaw(images, n, torch.argsort(order))  # the inverse permutation puts every patch back


def test_jigsaw_is_a_permutation_of_patches_that_unshuffling_restores():
    x = torch.randn(2, 3, 35, 42)  # not divisible: the last rows/columns stay in place
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    puzzled = jigsaw(x, 4, order)
    assert torch.equal(_unjigsaw(puzzled, 4, order), x)
    assert torch.equal(puzzled[..., 32:, :], x[..., 32:, :]) and torch.equal(puzzled[..., :, 40:], x[..., :, 40:])
    for k, src in enumerate(order.tolist()):  # patch `src` of the image is at position k of the puzzle
        (r, c), (sr, sc) = divmod(k, 4), divmod(src, 4)
        assert torch.equal(puzzled[..., 8 * r:8 * r + 8, 10 * c:10 * c + 10], x[..., 8 * sr:8 * sr + 8, 10 * sc:10 * sc + 10])
    assert torch.equal(jigsaw(x, 1, torch.zeros(1, dtype=torch.long)), x)
    assert torch.equal(jigsaw(x, 4, torch.arange(16)), x)


def _pmg(**options):
    torch.manual_seed(0)
    method = create_method("pmg", feature_size=16, **options)
    return method, method.build(timm.create_model("test_efficientnet_gn", num_classes=3), 3)


def test_inference_adds_the_four_classifiers_logits_or_uses_the_concatenated_one():
    _, model = _pmg()
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        parts = model(x, return_parts=True)
        torch.testing.assert_close(model(x), sum(parts))
        model.combined = False
        torch.testing.assert_close(model(x), parts[3])


def test_a_batch_takes_four_optimizer_steps_as_the_official_loop():
    """The engine's sub-steps = jigsaw 8, 4, 2 (classifiers 1-3), then the whole image (x2), each with
    its own SGD step, with the permutations the StepContext draws; the schedule counts one update."""
    from fgclf.engine import FitOptions, TrainState, train_one_epoch
    from fgclf.optim import create_scheduler
    from fgclf.runtime import create_accelerator

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 64, 64, generator=g), torch.arange(8) % 3
    method, ref = _pmg()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ctx = StepContext(seed=4)
    ctx.start_batch(0, 0)
    for k, n in enumerate((8, 4, 2, None)):
        images = x if n is None else jigsaw(x, n, ctx.shared_randperm(n * n))
        outputs = ref.train()(images, return_parts=True)
        loss = torch.nn.functional.cross_entropy(outputs[k], y) * (2.0 if n is None else 1.0)
        loss = loss + 0.0 * sum(o.sum() for i, o in enumerate(outputs) if i != k)
        opt.zero_grad()
        loss.backward()
        opt.step()

    acc = create_accelerator(log_with=None)
    method, model = _pmg()
    opt2 = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = create_scheduler(opt2, name="constant", epochs=1, updates_per_epoch=1)
    model, opt2, loader = acc.prepare(model, opt2, DataLoader(TensorDataset(x, y), batch_size=8))
    state = TrainState()
    record = train_one_epoch(acc, model, loader, opt2, sched, method, state=state,
                             options=FitOptions(progress=False, log_every=0, seed=4))
    assert state.global_step == 1 and sched.state_dict()["updates"] == 1
    assert set(record) >= {"train/jigsaw_8", "train/jigsaw_4", "train/jigsaw_2", "train/concat"}
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_sum_mode_is_one_step_on_the_four_losses():
    method, model = _pmg(steps="sum")
    assert method.substeps == 1
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    ctx = StepContext(seed=2)
    ctx.start_batch(0, 0)
    out = method.training_step(model.train(), (x, y), ctx)
    terms = out.terms
    torch.testing.assert_close(out.loss.detach(), terms["jigsaw_8"] + terms["jigsaw_4"] + terms["jigsaw_2"]
                               + terms["concat"])


def test_without_classes_the_model_gives_its_pooled_features():
    """``num_classes=0`` (feature extraction, ``create_model(..., num_classes=0)`` of an export)."""
    _, model = _pmg()
    model.reset_classifier(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.eval().forward_head(model.forward_features(x), pre_logits=True)
    assert feats.shape == (2, 3 * 32) and isinstance(model.get_classifier(), torch.nn.Identity)
