"""Every method through the engine: 2 gloo processes = 1 process, exact resume, PEFT, bf16 and accumulation.

The backbone is a GroupNorm model and the methods' own BatchNorm layers are synchronised over the
processes (``--train.sync_bn``, :class:`fgclf.models.GlobalBatchNorm` on CPU), so nothing but the
method's code can make 2 processes differ from 1. Images are 64 px: a 2 x 2 feature map, so that
WS-DAN/CAL crops and drops differ from the image.
"""
from __future__ import annotations

import os
import socket

import pytest
import timm
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from fgclf.methods import StepParts, create_method

OPTIONS = {"plain": {}, "bcnn": {"reduce_dim": 8}, "cbp": {"reduce_dim": 8, "sketch_dim": 64},
           "isqrt_cov": {"reduce_dim": 8}, "wsdan": {"num_maps": 4}, "cal": {"num_maps": 4},
           "pmg": {"feature_size": 16}, "transfg": {"slide_step": 12}, "api_net": {"hidden": 16},
           "nts_net": {"top_n": 3, "cat_num": 2}, "pim": {"fpn_size": 16, "image_size": 64},
           "herbs": {"fpn_size": 16, "image_size": 64},
           "hierarchy": {"levels": {"pair": {"names": ["ab", "c"], "of": [0, 0, 1]}}, "consistent": True}}
BACKBONES = {"transfg": ("test_vit", {"img_size": 64})}  # the others: a GroupNorm EfficientNet
# PMG compares one batch of 16 (its four optimizer steps): its classifiers' BatchNorm1d layers normalise
# 8 vectors per process over many steps, and the rounding of the global statistics then grows past 2e-5
# (the parameter sums still agree to 1e-5 after two batches).
# WS-DAN/CAL compare one update of the global batch 16: their crops and drops are thresholded masks,
# so from the second update on a rounding-level difference of the weights (BatchNorm sums over 2
# processes, gradient averaging) can move a box by a pixel. And their published signed square root
# (eps 1e-12 / 1e-6) has gradients up to 1 / (2 sqrt(eps)): a 1e-6 relative change of the input moves
# WS-DAN's stem gradient by ~5 % here; with eps 1e-4 the same computation is well conditioned.
ONE_UPDATE = ("wsdan", "cal", "pmg", "nts_net")  # NTS-Net: NMS picks boxes by score (a discrete choice)
LR = {"plain": 0.01, "bcnn": 0.01, "cbp": 0.01, "isqrt_cov": 0.01, "wsdan": 1e-3, "cal": 1e-3, "pmg": 0.01,
      "transfg": 0.01, "api_net": 0.01, "nts_net": 0.01, "pim": 0.01, "herbs": 0.01,
      "hierarchy": 0.01}  # x100 logits: gentler
# API-Net, PIM and HERBS without dropout: its masks are drawn per process (as dropout is in any DDP run)
DISTRIBUTED = {**OPTIONS, "wsdan": {"num_maps": 4, "sqrt_eps": 1e-4}, "cal": {"num_maps": 4, "sqrt_eps": 1e-4},
               "api_net": {"hidden": 16, "dropout": 0.0}, "pim": {"fpn_size": 16, "image_size": 64, "dropout": 0.0},
               "herbs": {"fpn_size": 16, "image_size": 64, "dropout": 0.0}}
CLASSES = 3


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(16, 3, 64, 64, generator=g), torch.arange(16) % CLASSES)


def _build(name: str, *, sync: bool = False, penalty: bool = False, options: dict = OPTIONS):
    from fgclf.losses import create_logit_penalty
    from fgclf.models import convert_sync_batchnorm

    torch.manual_seed(0)
    parts = StepParts(logit_penalty=create_logit_penalty("pairwise", weight=1.0) if penalty else None)
    method = create_method(name, parts=parts, **options[name])
    arch, kwargs = BACKBONES.get(name, ("test_efficientnet_gn", {}))
    model = method.build(timm.create_model(arch, num_classes=CLASSES, **kwargs), CLASSES)
    if sync:
        model = convert_sync_batchnorm(model, "cpu")
    return method, model


def _train(name: str, *, epochs: int = 1, sync: bool = False) -> tuple[dict, dict]:
    """``epochs`` epochs of 2 updates (global batch 8; WS-DAN/CAL: 1 of 16) through ``train_one_epoch``."""
    from fgclf.engine import FitOptions, TrainState, train_one_epoch
    from fgclf.optim import create_optimizer, create_scheduler
    from fgclf.runtime import create_accelerator

    acc = create_accelerator(log_with=None)
    method, model = _build(name, sync=sync, penalty=name == "bcnn", options=DISTRIBUTED)
    # SGD: AdamW's m / sqrt(v) turns the rounding of near-zero gradients into whole lr-sized steps
    opt = create_optimizer(model, name="momentum", lr=LR[name], weight_decay=0.01)
    batch = 16 if name in ONE_UPDATE else 8
    sched = create_scheduler(opt, name="cosine", epochs=epochs, updates_per_epoch=16 // batch)
    model, opt, loader = acc.prepare(model, opt, DataLoader(_data(), batch_size=batch))
    state, records = TrainState(), []
    for _ in range(epochs):
        records.append(train_one_epoch(acc, model, loader, opt, sched, method, state=state,
                                       options=FitOptions(progress=False, log_every=0, seed=7)))
        state.epoch += 1
        state.step_in_epoch = 0
    weights = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    return weights, records[-1]


def _worker(rank: int, port: int, names: list[str], queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    out = {}
    for name in names:
        weights, record = _train(name, sync=True)
        out[name] = ({k: v.numpy() for k, v in weights.items()}, record["train_loss"])
    from accelerate import PartialState

    PartialState().wait_for_everyone()
    queue.put((rank, out))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_every_method_on_two_processes_equals_one_process():
    names = list(OPTIONS)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, names, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for name in names:
        _reset_accelerate()
        weights, record = _train(name)
        for rank in (0, 1):
            theirs, loss = results[rank][name]
            assert loss == pytest.approx(record["train_loss"], rel=1e-5), name
            for key, value in weights.items():  # weights, BN statistics and WS-DAN's feature centres
                torch.testing.assert_close(torch.from_numpy(theirs[key]), value, atol=2e-5, rtol=1e-4,
                                           msg=lambda m, name=name, key=key: f"{name}: {key}: {m}")
    _reset_accelerate()


# the default suite resumes the methods with random draws, centres, sub-steps or a batch sampler;
# the rest run in `make test-slow` (suite time)
SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", [pytest.param("bcnn", marks=SLOW), pytest.param("cbp", marks=SLOW),
                                  pytest.param("isqrt_cov", marks=SLOW), "wsdan", pytest.param("cal", marks=SLOW),
                                  "pmg", pytest.param("transfg", marks=SLOW), "api_net", "nts_net",
                                  pytest.param("pim", marks=SLOW), "herbs", "hierarchy"])
def test_resume_after_an_epoch_equals_the_uninterrupted_run(tmp_path, name):
    """``fit`` stopped after epoch 1 (``last`` written) and resumed into fresh objects ends where the
    uninterrupted 2-epoch run ends: weights, BatchNorm statistics, feature centres, random crops."""
    from fgclf.checkpoint import Checkpointer
    from fgclf.engine import FitOptions, TrainState, fit
    from fgclf.optim import create_optimizer, create_scheduler
    from fgclf.runtime import create_accelerator

    class Stop(Exception):
        pass

    def run(out, *, stop_after: int = 0, resume: bool = False) -> dict:
        _reset_accelerate()
        acc = create_accelerator(log_with=None)
        method, model = _build(name)
        opt = create_optimizer(model, name="adamw", lr=1e-3)
        sched = create_scheduler(opt, name="cosine", epochs=2, updates_per_epoch=2)
        model, opt, train = acc.prepare(model, opt, DataLoader(_data(), batch_size=8, shuffle=True))
        arch, kwargs = BACKBONES.get(name, ("test_efficientnet_gn", {}))
        meta = {"model_name": arch, "num_classes": CLASSES, "class_names": list("abc"),
                "model_kwargs": kwargs, "peft": None, "method": method.metadata()}
        ck = Checkpointer(acc, out, meta=meta)
        ck.track_states(scheduler=sched)
        state = ck.load_last() if resume else TrainState()

        def maybe_stop(st) -> None:
            if st.epoch == stop_after:
                raise Stop
        try:
            fit(acc, model, train, None, opt, sched, method, state=state, checkpointer=ck, run_dir=out,
                num_classes=CLASSES, options=FitOptions(epochs=2, progress=False, seed=3,
                                                        epoch_callbacks=(maybe_stop,) if stop_after else ()))
        except Stop:
            pass
        return {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}

    whole = run(tmp_path / "whole")
    run(tmp_path / "part", stop_after=1)
    resumed = run(tmp_path / "part", resume=True)
    _reset_accelerate()
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=1e-6, msg=key)


@pytest.mark.parametrize("name", [n for n in OPTIONS if n != "plain"])
def test_peft_trains_only_the_adapters_and_the_methods_own_layers(name):
    from fgclf.models import apply_peft

    method, model = _build(name)
    new = set(model.new_modules)
    targets = None if name in BACKBONES else ["conv_pw", "conv_pwl"]  # the ViT: its default qkv/proj/fc1/fc2
    peft_model = apply_peft(model, method="lora", r=2, target_modules=targets)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or any(f".{m}." in n for m in new) for n in trainable), sorted(trainable)
    layers = {m for m in new if any(p.numel() for p in getattr(model, m).parameters())}
    assert all(any(f".{m}.modules_to_save." in n for n in trainable) for m in layers), sorted(trainable)
    x, y = _data().tensors[0][:4], torch.tensor([0, 1, 2, 0])
    out = method.training_step(peft_model.train(), (x, y), __import__("fgclf.methods", fromlist=["x"]).StepContext())
    out.loss.backward()
    frozen = [n for n, p in peft_model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen


def _accumulated(name: str, accum: int, batch: int, precision: str = "no", **options):
    from fgclf.engine import FitOptions, TrainState, train_one_epoch
    from fgclf.optim import create_scheduler
    from fgclf.runtime import create_accelerator

    _reset_accelerate()
    acc = create_accelerator(log_with=None, mixed_precision=precision, grad_accum_steps=accum)
    torch.manual_seed(0)
    method = create_method(name, **options)
    model = method.build(timm.create_model("test_efficientnet_gn", num_classes=CLASSES), CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = create_scheduler(opt, name="constant", epochs=1, updates_per_epoch=1)
    model, opt, loader = acc.prepare(model, opt, DataLoader(_data(), batch_size=batch))
    state = TrainState()
    record = train_one_epoch(acc, model, loader, opt, sched, method, state=state,
                             options=FitOptions(progress=False, log_every=0))
    weights = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    _reset_accelerate()
    return state, record, weights


def test_gradient_accumulation_equals_the_big_batch():
    """B-CNN without its BatchNorm reduction has a per-image loss: two accumulated micro-batches of 8
    make the same SGD update as one batch of 16."""
    state, _, accumulated = _accumulated("bcnn", 2, 8)
    assert state.global_step == 1 and state.step_in_epoch == 2
    _, _, big = _accumulated("bcnn", 1, 16)
    for key, value in big.items():
        torch.testing.assert_close(accumulated[key], value, atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["bcnn", "wsdan"])
def test_bf16_autocast_with_accumulation_steps_once_per_two_batches(name):
    state, record, weights = _accumulated(name, 2, 8, "bf16", **OPTIONS[name])
    assert state.global_step == 1 and state.step_in_epoch == 2 and torch.isfinite(torch.tensor(record["train_loss"]))
    torch.manual_seed(0)
    fresh = create_method(name, **OPTIONS[name]).build(timm.create_model("test_efficientnet_gn",
                                                                         num_classes=CLASSES), CLASSES)
    assert not torch.equal(weights["fg_head.weight"], fresh.state_dict()["fg_head.weight"])


@pytest.mark.parametrize("name", list(OPTIONS))
def test_an_export_rebuilds_the_method_and_its_inference(tmp_path, name):
    """``save_pretrained`` records the method; ``create_model("file:...")`` rebuilds it, with its buffers
    (Tensor Sketch hashes, feature centres) and its eval-mode inference (WS-DAN/CAL crops)."""
    from fgclf.models import create_model, save_pretrained

    method, model = _build(name)
    if hasattr(model, "feature_center"):
        model.feature_center.normal_()
    arch, kwargs = BACKBONES.get(name, ("test_efficientnet_gn", {}))
    save_pretrained(model.eval(), tmp_path, model_name=arch, num_classes=CLASSES, model_kwargs=kwargs,
                    class_names=list("abc"), extra={"method": method.metadata()})
    loaded = create_model(f"file:{tmp_path}", num_classes=CLASSES).eval()
    assert type(loaded) is type(model)
    x = _data().tensors[0][:4]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("name", list(OPTIONS))
def test_bf16_weights_and_inputs_as_deepspeed_casts_them(name):
    """DeepSpeed bf16/fp16 casts the weights and fgclf the inputs (no autocast): every method's step,
    inference and picture work in that dtype (float32 pooling inside is cast back)."""
    from fgclf.methods import StepContext

    method, model = _build(name)
    model = model.to(torch.bfloat16).train()
    x, y = _data().tensors[0][:8], torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ctx = StepContext(cast=torch.bfloat16, seed=1)
    for substep in range(method.substeps):
        ctx.substep = substep
        out = method.training_step(model, (x, y), ctx)
        assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
        out.loss.backward()
    with torch.no_grad():
        assert model.eval()(x.to(torch.bfloat16)).shape == (8, CLASSES)


@pytest.mark.parametrize("name", [n for n in OPTIONS if n not in ("plain", "hierarchy")])  # hierarchy: below
def test_a_new_class_count_resets_every_classifier_of_the_method(name):
    """``reset_classifier`` (an export fine-tuned on other classes: ``file:`` with another num_classes)
    gives every classifier of the method the new count, so its training step runs on the new labels."""
    from fgclf.methods import StepContext

    method, model = _build(name)
    model.reset_classifier(5)
    x, y = _data().tensors[0][:10], torch.arange(10) % 5
    ctx = StepContext(seed=0)
    for substep in range(method.substeps):
        ctx.substep = substep
        out = method.training_step(model.train(), (x, y), ctx)
        assert out.logits.shape == (10, 5) and torch.isfinite(out.loss)
    assert model.eval()(x).shape == (10, 5)


@pytest.mark.parametrize("name", ["wsdan", "cal", "transfg", "nts_net", "pim", "herbs"])
def test_a_methods_picture_is_drawn_in_eval_mode_and_training_resumes(tmp_path, name):
    """``draw`` (called by train_classifier every epoch) writes a PNG of the 8 test images, runs its
    forward pass in eval mode (BatchNorm statistics untouched) and leaves the model training."""
    from PIL import Image

    method, model = _build(name)
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    images = _data().tensors[0][:8]
    method.draw(None, model, images, tmp_path / "picture.png")
    assert model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    with Image.open(tmp_path / "picture.png") as picture:
        assert picture.format == "PNG" and min(picture.size) > 64
