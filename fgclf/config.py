"""Typed run configuration: defaults < YAML (``--config``) < CLI flags.

Each concern has a dataclass; :class:`TrainClassifierConfig` nests them. Parsing goes through
jsonargparse, so ``--data.root X`` overrides ``data: {root: X}`` from a YAML file, unknown keys
and wrong types are errors, and ``--help`` lists every flag with its type and default. Parse
errors are raised as :class:`fgclf.errors.UserError` (one line) instead of argparse's usage dump.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from fgclf.errors import UserError


@dataclass
class AugmentConfig:
    """Train augmentation: a preset plus per-part overrides (``None`` = the preset's value).

    ``AugmentConfig()`` is the ``basic`` preset. Parts run in the order of the fields below.

    Args:
        preset: Named set of part values, one of :func:`list_augmentations`: ``none`` (the eval
            transform, takes no overrides), ``basic`` (random resized crop, hflip, light colour
            jitter), ``strong`` (basic + RandAugment + random erasing), ``randaugment``,
            ``trivialaugment``, ``autoaugment``, ``augmix`` (crop + hflip + that policy).
        scale: Random resized crop area range as fractions of the image, e.g. ``[0.35, 1.0]``
            (basic); ``[1.0, 1.0]`` keeps the whole image.
        ratio: Random resized crop aspect-ratio range (basic ``[0.75, 1.333]``).
        hflip: Probability of a horizontal flip (basic 0.5).
        vflip: Probability of a vertical flip (basic 0).
        rotation: Random rotation in degrees, uniform in ``[-rotation, rotation]``; corners are
            filled with the mean colour (basic 0 = off).
        auto_augment: Policy: a timm string (``rand-m9-mstd0.5-inc1``, ``augmix-m5-w4-d2``,
            ``original-mstd0.5``, ``v0``, ``3a``), ``trivialaugment`` / ``autoaugment``
            (torchvision TrivialAugmentWide / AutoAugment ImageNet policy) or ``none`` (basic).
        color_jitter: Brightness, contrast and saturation jitter strength (basic 0.2; 0 = off).
        gaussian_blur: Probability of a Gaussian blur, kernel ~10% of the image side, sigma
            uniform in ``[0.1, 2.0]`` (basic 0).
        gaussian_noise: Standard deviation of additive Gaussian pixel noise in ``[0, 1]`` pixel
            units, applied to every image before normalisation, clipped to ``[0, 1]`` (basic 0).
        random_erasing: Probability of erasing one rectangle (2-33% of the area) to the mean
            colour, after normalisation (basic 0).
    """

    preset: str = "basic"
    scale: Optional[tuple[float, float]] = None
    ratio: Optional[tuple[float, float]] = None
    hflip: Optional[float] = None
    vflip: Optional[float] = None
    rotation: Optional[float] = None
    auto_augment: Optional[str] = None
    color_jitter: Optional[float] = None
    gaussian_blur: Optional[float] = None
    gaussian_noise: Optional[float] = None
    random_erasing: Optional[float] = None


@dataclass
class DataConfig:
    """Where the images come from and how they are fed.

    Args:
        format: Dataset layout: ``toy`` (the embedded generated dataset, made on first use);
            a dataset as its authors ship it: ``cub`` (CUB-200-2011), ``nabirds``,
            ``stanford_cars``, ``fgvc_aircraft``, ``stanford_dogs``, ``flowers102``,
            ``oxford_pets`` (its files are found up to three folders below ``root``; a copy that
            differs from the official counts is named in a warning); ``imagefolder`` (class
            subfolders, with or without train/val/test subfolders); ``hf`` (HF ``datasets``: a
            local folder or a hub name); ``auto`` (detected from the files, and said).
        root: Dataset folder (or HF hub name). For ``toy`` it defaults to the fgclf cache.
        image_size: Training/eval crop size; null means the model's pretrained input size
            (for ``toy`` data, the images' own size).
        bbox_crop: Crop each image to its bounding box first (cub, nabirds, stanford_cars,
            fgvc_aircraft, stanford_dogs, toy). This crops the
            val and test images too, with their ground-truth boxes: an oracle that published
            "no annotation" CUB results do not use.
        label_level: ``fgvc_aircraft`` classes: ``variant`` (100, the default), ``family`` (70)
            or ``manufacturer`` (30).
        levels_file: A CSV giving each class coarser labels (header ``class,<level>,...``, one
            row per class name, e.g. CUB's order, family and genus): reported per level and
            trained with ``--model.hierarchy true``, like a dataset's own levels.
        merge_val: Train on train + the validation split the dataset ships (fgvc_aircraft,
            flowers102): FGVC-Aircraft's standard protocol (trainval / test). ``val_fraction``
            then carves validation from the merged split (0: none).
        val_fraction: Fraction of train held out (stratified, seeded) when the dataset has no
            validation split; 0 trains on all of it, without validation (no early stopping
            or plateau schedule; the last epoch is the one tested).
        test_fraction: Fraction of train held out as test when the dataset has no test split.
        num_folds: k-fold cross-validation: validate on fold ``fold`` of ``num_folds``
            stratified folds of train instead of a ``val_fraction`` hold-out (0: off). The
            test split is never touched.
        fold: Which fold (0-based) validates when ``num_folds`` > 0.
        split_seed: Seed of that validation split (kept apart from the training seed, so that
            repeated seeds compare on the same split).
        aug: Train augmentation: a preset (``aug.preset``: none, basic, strong, randaugment,
            trivialaugment, autoaugment, augmix) and parts that override it (``aug.rotation``,
            ``aug.gaussian_noise``, ``aug.random_erasing``, ...).
        progressive: Progressive resizing ``"EPOCH:SIZE,..."`` from epoch 0 (e.g.
            ``"0:224,10:336,20:448"``; fgclf/data/progressive.py): the training crop size by epoch;
            evaluation stays at ``image_size``; the batch size does not change (null: off).
        num_workers: DataLoader worker processes per training process.
        persistent_workers: Keep the train/eval workers alive between epochs (as timm does: saves
            their start-up every epoch, ``bench/fixed_cost.py``; exact resume still holds:
            augmentation is seeded per sample).
        prefetch_factor: Batches each worker loads ahead (null: torch's default, 2).
        cache: Read images through a cache of copies resized once to the evaluation resize size
            (``floor(crop / crop_pct)``; e.g. 512 for 448) and reused by later runs and seeds.
            Stored as JPEG 95 (images already that small are read from their originals):
            evaluation pixels within JPEG-95 error (~42 dB); train crops come from the copy.
        cache_dir: Folder of that cache (null: ``<fgclf cache>/resized``).
        decoder: Image decoder for training and evaluation: ``pil``, or ``torchvision``
            (``torchvision.io.decode_jpeg`` for plain JPEGs, PIL for the rest; the same pixels), or
            ``nvjpeg`` (a GPU: workers read file bytes, the GPU decodes, crops, flips, jitters and
            normalises each batch; other files are decoded by PIL in the workers; the basic
            augmentation parts only; fgclf/data/device_input.py).
        verify_images: ``full`` decodes every image before training so a corrupt file stops
            the run at once; ``header`` only opens them; ``none`` skips the check (files
            missing from disk are still reported). Files that passed before and are unchanged
            (size, mtime, ctime) are not decoded again (``<fgclf cache>/verified.db``; delete
            it to check everything).
        skip_bad_images: Drop unreadable images (listed in the run directory) instead of
            stopping.
        toy_num_classes: Classes of the generated toy dataset.
        toy_train_per_class: Train images per class of the toy dataset.
        toy_test_per_class: Test images per class of the toy dataset.
        toy_image_size: Side of the toy images in pixels.
        toy_seed: Seed of the toy dataset generator.
    """

    format: Literal["toy", "cub", "nabirds", "stanford_cars", "fgvc_aircraft", "stanford_dogs", "flowers102",
                    "oxford_pets", "imagefolder", "hf", "auto"] = "toy"
    root: Optional[str] = None
    image_size: Optional[int] = None
    bbox_crop: bool = False
    label_level: Optional[Literal["variant", "family", "manufacturer"]] = None
    merge_val: bool = False
    levels_file: Optional[str] = None
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    num_folds: int = 0
    fold: int = 0
    split_seed: int = 0
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    progressive: Optional[str] = None
    num_workers: int = 2
    persistent_workers: bool = True
    prefetch_factor: Optional[int] = None
    cache: bool = False
    cache_dir: Optional[str] = None
    decoder: str = "pil"
    verify_images: Literal["full", "header", "none"] = "full"
    skip_bad_images: bool = False
    toy_num_classes: int = 12
    toy_train_per_class: int = 30
    toy_test_per_class: int = 20
    toy_image_size: int = 96
    toy_seed: int = 0


@dataclass
class ModelConfig:
    """The network.

    Args:
        name: A timm model name (``resnet50.a1_in1k``), an offline pretrained name
            (``tf_efficientnet_lite0.pypi_in1k``) or ``file:DIR`` (an fgclf export).
        pretrained: Load pretrained weights (hub for timm names; offline for ``.pypi_in1k``).
        weights: Local weight file (.safetensors/.pth) to load instead of the hub's.
        drop_rate: Dropout before the classifier (null: the model's default).
        drop_path_rate: Stochastic depth rate (null: the model's default).
        attn_drop_rate: Attention-weight dropout of ViT-style models (null: the model's
            default; models without attention reject it).
        strategy: ``full`` trains every parameter; ``partial:N`` freezes the stem and the first
            N stages (timm's stage grouping); ``linear_probe`` freezes all but the head.
        freeze_bn: Keep BatchNorm running statistics frozen (eval mode) while training.
        unfreeze: Gradual unfreezing schedule ``"EPOCH:head|stageK|all,..."`` from epoch 0 (e.g.
            ``"0:head,2:stage3,4:all"``; fgclf/unfreeze.py): which parameters train by epoch
            (null: as the strategy says). With strategy ``full`` and no PEFT.
        head_init: ``zero`` starts a pretrained model's new classifier at zero (BiT's recipe);
            ``default`` keeps timm's random init. Models without pretrained weights always
            keep the default.
        hierarchy: One classifier head per label level (the dataset's coarser levels:
            fgvc_aircraft family and manufacturer, nabirds parent, oxford_pets species) on the
            pooled features; the loss adds ``hierarchy_weight`` times each coarser level's loss
            (method ``hierarchy``; with method plain only). Per-level metrics are reported for
            every run on such a dataset, with or without it.
        hierarchy_weight: Weight of each coarser level's loss.
        hierarchy_consistent: Make the fine prediction consistent with the coarse heads
            (``log p(fine) + sum log p(its coarse class)``).
        trust_remote_code: Allow ``hub:owner/repo:entry`` models that run downloaded code.
        kwargs: More keyword arguments for ``timm.create_model`` (e.g. ``{img_size: 64}``),
            recorded in the checkpoint so exports rebuild the same model.
    """

    name: str = "tf_efficientnet_lite0.pypi_in1k"
    pretrained: bool = True
    weights: Optional[str] = None
    drop_rate: Optional[float] = None
    drop_path_rate: Optional[float] = None
    attn_drop_rate: Optional[float] = None
    strategy: str = "full"
    freeze_bn: bool = False
    unfreeze: Optional[str] = None
    head_init: Literal["zero", "default"] = "zero"
    hierarchy: bool = False
    hierarchy_weight: float = 1.0
    hierarchy_consistent: bool = False
    trust_remote_code: bool = False
    kwargs: dict = field(default_factory=dict)


@dataclass
class LoraConfig:
    """PEFT adapter settings (used when ``--peft`` is not ``none``).

    Args:
        r: Adapter rank.
        alpha: Scaling numerator (``alpha / r`` scales the update).
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt; null picks the model family's default.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None


@dataclass
class LossConfig:
    """The training loss and explicit regularisers (options left null keep the loss's default).

    Args:
        name: ``ce``, ``label_smoothing`` (ce with 0.1 smoothing), ``focal`` or
            ``soft_target_ce`` (used with mixup/cutmix).
        label_smoothing: Smoothing of ``ce`` / ``label_smoothing`` (null: the loss default).
        gamma: Focusing parameter of ``focal`` (null: 2).
        alpha: Class weights of ``focal``: one value or one per class (null: none).
        class_balance: Weight classes from their train counts: ``effective`` (Cui et al.
            2019, with ``class_balance_beta``), ``inverse`` (1/count) or ``none``.
        class_balance_beta: Beta of the effective-number weighting.
        regularizer: Penalty added to the loss: ``l1``, ``l2`` or ``lp`` (with ``reg_p``;
            ``inf`` bounds the largest weight). Separate from ``optim.weight_decay``, which
            is the usual (decoupled, for AdamW) L2; use this for L1/sparsity or other p.
        reg_weight: Weight of that penalty.
        reg_p: The p of ``lp`` (>= 1 or ``inf``).
        confusion: A penalty on the batch's predictions that combines with any method:
            ``pairwise`` (Pairwise Confusion, Dubey et al. ECCV 2018: the squared distance between
            the class-probability vectors of neighbouring images of the batch, whatever their
            labels) or ``entropy`` (maximum entropy, Dubey et al. NeurIPS 2018: minus the mean
            entropy of the predictions). Works with every method and with mixup.
        confusion_weight: Weight of that penalty, required with it (the papers' lambda / gamma; the
            authors suggest 0.1-0.2 x the number of classes for ``pairwise``).
    """

    name: str = "ce"
    label_smoothing: Optional[float] = None
    gamma: Optional[float] = None
    alpha: Optional[Union[float, list[float]]] = None
    class_balance: Literal["none", "effective", "inverse"] = "none"
    class_balance_beta: float = 0.999
    regularizer: Optional[str] = None
    reg_weight: float = 0.0
    reg_p: Optional[Union[float, str]] = None
    confusion: Optional[Literal["pairwise", "entropy"]] = None
    confusion_weight: Optional[float] = None


@dataclass
class MethodConfig:
    """The fine-grained method (``fgclf.methods``): how the backbone is wrapped, what a training step
    computes and how a prediction is made. Options left null keep the method's default; setting an
    option of another method is an error.

    Args:
        name: ``plain`` (the backbone as it is), ``bcnn`` (bilinear pooling, Lin et al. 2015),
            ``cbp`` (compact bilinear pooling by Tensor Sketch, Gao et al. 2016), ``isqrt_cov``
            (covariance pooling with a Newton-Schulz matrix square root, Li et al. 2018),
            ``wsdan`` (attention cropping and dropping, Hu et al. 2019), ``cal``
            (counterfactual attention on WS-DAN, Rao et al. 2021), ``pmg`` (progressive
            multi-granularity jigsaw training, Du et al. 2020), ``transfg`` (ViT part
            selection and contrastive loss, He et al. 2022), ``api_net`` (attentive pairwise
            interaction on P x K batches, Zhuang et al. 2020), ``nts_net`` (navigated part
            proposals, Yang et al. 2018), ``pim`` (FPN, selector and graph combiner, Chou et al.
            2022) or ``herbs`` (PIM with high-temperature refinement and background suppression,
            Chou et al. 2023). ``hierarchy`` (one head per label level) is set by
            ``--model.hierarchy true``.
        reduce_dim: bcnn, cbp, isqrt_cov: channels of a 1x1 conv + BN + ReLU before pooling
            (bcnn/cbp default: none; isqrt_cov: 256).
        dropout: bcnn, cbp, isqrt_cov: dropout on the pooled feature (default 0); api_net: on the
            mutual vector and before the classifier (default 0.5); pim, herbs: in the combiner (0.1).
        sketch_dim: cbp: Tensor Sketch dimension (default 8192).
        seed: cbp: seed of the sketch's hashes and signs (default 0).
        iterations: isqrt_cov: Newton-Schulz iterations (default 5).
        num_maps: wsdan, cal: attention maps M (default 32).
        beta: wsdan, cal: rate of the feature-centre update (default 0.05).
        center_weight: wsdan, cal: weight of the feature-centre loss (default 1).
        crop_theta: wsdan, cal: the attention crop keeps where the picked map exceeds
            U(low, high) x its maximum (default [0.4, 0.6]).
        drop_theta: wsdan, cal: the attention drop erases where the picked map exceeds
            U(low, high) x its maximum (default [0.2, 0.5]).
        crop_padding: wsdan, cal: the crop box grows by this fraction of the image side (default 0.1).
        eval_crops: wsdan, cal: [theta, padding] of each crop around the mean attention map that
            inference averages with the raw view (wsdan [[0.1, 0.05]]; cal [[0.3, 0.1], [0.2, 0.1],
            [0.1, 0.05]]).
        granularities: pmg: jigsaw sizes n (n x n patches) of the three stage classifiers' steps,
            fine to coarse (default [8, 4, 2]).
        feature_size: pmg: width of the stage blocks and classifiers (default 512).
        steps: pmg: ``separate`` (one optimizer step per granularity and one for the whole image,
            as the paper; needs train.grad_accum_steps 1) or ``sum`` (the four losses, one step).
        inference: pmg: ``combined`` (the four classifiers' logits added, the paper's) or ``concat``.
        concat_weight: pmg: weight of the whole-image classifier's loss (default 2).
        slide_step: transfg: stride of the patch embedding (default 12: overlapping 16 px patches; the
            patch size: no overlap).
        contrastive_weight: transfg: weight of the contrastive loss on the class token (default 1).
        alpha: transfg: margin of that loss for pairs of different classes (default 0.4).
        samples_per_class: api_net: K images of each of P = train.batch_size / K classes per batch
            (default 4).
        hidden: api_net: width of the mutual-vector MLP (default 512).
        rank_margin: api_net: margin of the score-ranking loss (default 0.05).
        top_n: nts_net: parts kept after NMS (default 6).
        cat_num: nts_net: parts the final classifier sees with the image (default 4).
        fpn_size: pim, herbs: channels of the FPN (default 1536).
        select_fraction: pim, herbs: share of each stage's locations the selector keeps (default 2/9).
        lambda_b: pim, herbs: weight of the per-stage classifiers' loss (pim 0.5, herbs 0.3).
        lambda_s: pim, herbs: weight of the kept locations' classification loss (default 0).
        lambda_n: pim, herbs: weight of the dropped locations' suppression loss (default 5).
        lambda_c: pim, herbs: weight of the combiner's classification loss (default 1).
        image_size: pim, herbs: the image size the combiner is built for (default: the run's data.image_size).
        module: pim, herbs: false switches the plug-in off (the backbone's pooled features and a linear
            classifier: plain, for a paired ablation under the same options; default true).
        lambda_b0: herbs: weight of the high-temperature refinement loss (default 1.375).
        temperature: herbs: the refinement's temperature at epoch 0 (default 64).
        temperature_halving: herbs: the temperature halves every this many epochs (default 10).
        sqrt_eps: wsdan, cal: the eps of BAP's signed square root sign(x) sqrt(|x| + eps) (wsdan
            1e-12, cal 1e-6, as their official code). Its gradient near 0 is 1 / (2 sqrt(eps)): a
            larger eps (e.g. 1e-6 under bf16) trades fidelity for better-conditioned gradients.
    """

    name: str = "plain"
    reduce_dim: Optional[int] = None
    dropout: Optional[float] = None
    sketch_dim: Optional[int] = None
    seed: Optional[int] = None
    iterations: Optional[int] = None
    num_maps: Optional[int] = None
    beta: Optional[float] = None
    center_weight: Optional[float] = None
    crop_theta: Optional[tuple[float, float]] = None
    drop_theta: Optional[tuple[float, float]] = None
    crop_padding: Optional[float] = None
    eval_crops: Optional[list[tuple[float, float]]] = None
    sqrt_eps: Optional[float] = None
    granularities: Optional[list[int]] = None
    feature_size: Optional[int] = None
    steps: Optional[Literal["separate", "sum"]] = None
    inference: Optional[Literal["combined", "concat"]] = None
    concat_weight: Optional[float] = None
    slide_step: Optional[int] = None
    contrastive_weight: Optional[float] = None
    alpha: Optional[float] = None
    samples_per_class: Optional[int] = None
    hidden: Optional[int] = None
    rank_margin: Optional[float] = None
    top_n: Optional[int] = None
    cat_num: Optional[int] = None
    fpn_size: Optional[int] = None
    select_fraction: Optional[float] = None
    lambda_b: Optional[float] = None
    lambda_s: Optional[float] = None
    lambda_n: Optional[float] = None
    lambda_c: Optional[float] = None
    image_size: Optional[int] = None
    module: Optional[bool] = None
    lambda_b0: Optional[float] = None
    temperature: Optional[float] = None
    temperature_halving: Optional[int] = None


@dataclass
class MixupConfig:
    """Batch-level mixing (timm's Mixup/CutMix); the loss then sees soft targets.

    Args:
        alpha: Mixup Beta(alpha, alpha) (0: off).
        cutmix_alpha: CutMix Beta(alpha, alpha) (0: off).
        prob: Probability of mixing a batch.
        switch_prob: Probability of CutMix instead of Mixup when both are on.
    """

    alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (schedule lengths are in epochs).

    Args:
        name: Any timm optimizer name (``sgd``, ``momentum``, ``adam``, ``adamw``, ``lamb``...).
        lr: Peak learning rate.
        weight_decay: The optimizer's L2 / decoupled weight decay (never on norms and biases).
        momentum: Momentum for SGD-like optimizers.
        head_lr_scale: Multiplier of the lr of the new layers: the classifier head and a
            method's own layers (pooling reduction, attention), e.g. 10: new layers learn faster
            than the pretrained body.
        layer_decay: Layer-wise lr decay for timm models (null: off; e.g. 0.75).
        fused: torch's fused implementation (one kernel per step) of Adam, AdamW or SGD (CPU
            and GPU): the same update up to float rounding, several times faster optimizer steps
            (``bench/optimizer_step.py``). Other optimizers refuse it.
        scheduler: ``cosine``, ``cosine_restarts`` (SGDR), ``multistep``, ``plateau`` (drops
            the lr by ``gamma`` when the watched validation metric stalls) or ``constant``.
        step_on: Update the lr after every optimizer ``update`` (smooth) or every ``epoch``.
        warmup_epochs: Linear warmup length in epochs (fractions allowed), for every schedule.
        min_lr_ratio: Floor of the cosine schedules as a fraction of ``lr``.
        milestones: Epochs at which ``multistep`` multiplies the lr by ``gamma``.
        gamma: Decay factor of ``multistep`` and ``plateau``.
        restart_epochs: First cycle length of ``cosine_restarts``.
        restart_mult: Growth factor of each next ``cosine_restarts`` cycle.
        plateau_patience: Epochs without improvement before ``plateau`` drops the lr.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    head_lr_scale: float = 1.0
    layer_decay: Optional[float] = None
    fused: bool = False
    scheduler: str = "cosine"
    step_on: Literal["update", "epoch"] = "update"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [30, 60])
    gamma: float = 0.1
    restart_epochs: float = 10.0
    restart_mult: float = 1.0
    plateau_patience: int = 2


@dataclass
class TrainConfig:
    """The training loop.

    Args:
        epochs: Passes over the training set.
        batch_size: Global batch size per optimizer step before accumulation (split evenly
            across processes, so results do not depend on the process count).
        eval_batch_size: Global evaluation batch size (null: same as batch_size).
        grad_accum_steps: Micro-batches accumulated per optimizer update.
        clip_grad_norm: Clip the gradient norm to this value (null: no clipping).
        seed: Random seed, or ``random`` to draw one (printed and recorded in the run
            directory, so the run can be repeated exactly).
        output_dir: Run directory; null makes ``runs/<name>``.
        name: Run name; null builds one from data, model and time.
        early_stopping_metric: Validation metric watched for best checkpoint and early stop.
        early_stopping_patience: Epochs without improvement before stopping (0: never stop).
        early_stopping_min_delta: Smallest change that counts as an improvement.
        log_every: Log the running train loss every this many updates.
        checkpoint_every_steps: Also write ``last`` every this many updates (0: epoch ends).
            Resuming from such a mid-epoch checkpoint continues with the same batches but not
            the same random augmentations; epoch-end checkpoints resume exactly.
        max_nonfinite_steps: Consecutive updates with a nan/inf training loss that are tolerated
            (fp16 loss scaling skips their steps; otherwise they are applied); one more stops
            the run with an error naming them and the last good checkpoint (0: stop at the
            first). ``last`` is never written right after an applied non-finite step.
        mixed_precision: Override the accelerate config: ``no``, ``fp16`` or ``bf16``.
        progress: Show tqdm progress bars (main process only).
        tta_flip: Evaluate on the average of the image's and its mirror image's logits.
        tta: Test-time augmentation (fgclf/tta.py): ``none``, ``flip`` (as ``tta_flip``),
            ``five_crop`` (corners and centre, 0.875 of the side), ``ten_crop`` (and their mirror
            images) or ``multiscale`` (centre crops at 1, 0.875 and 0.75, each mirrored); the
            multi-view modes average probabilities. Validation and test use it; each view is one
            more forward pass (metrics.json records the views and the test evaluation's seconds).
        channels_last: Keep convolution weights (and so activations) in NHWC memory order,
            which oneDNN and cuDNN run faster for most CNNs (see bench/engine_overhead.py).
        compile: ``torch.compile`` the model (accelerate's dynamo plugin, inductor backend):
            a one-time compile, then faster steps on GPUs.
        sync_bn: Synchronise BatchNorm statistics over all processes (SyncBatchNorm), so that
            ``batch_size`` images, not ``batch_size / processes``, make each layer's statistics;
            a no-op on one process. Not with ``--parallel pipeline``.
        drop_last: Drop each epoch's last, incomplete training batch (as timm does). Then N
            processes train exactly as one process (otherwise accelerate fills the last batch of
            a multi-process run with samples from the start of the epoch, and a single process
            trains on a smaller last batch), and BatchNorm never normalises a batch of one image.
            ``--parallel pipeline`` always drops it.
        ema_decay: Keep an exponential moving average of the weights with this decay (timm's
            ModelEmaV3, updated after every optimizer update; 0: off; e.g. 0.9998). Both the raw
            and the averaged weights are validated each epoch and ``best`` takes whichever scores
            higher (metrics.json's ``best_weights`` says which; without a validation split,
            the average). DDP and ZeRO-1/2; not ZeRO-3, FSDP or a pipeline split.
        ema_warmup: Warm the EMA decay up as timm does (``1 - t ** (-2/3)`` at update ``t``, the
            first update a copy, capped at ``ema_decay``), so a run of a few thousand updates is not an average dominated by the
            starting weights.
        sam_rho: Sharpness-Aware Minimization with this neighbourhood radius (Foret et al. 2021;
            0: off; 0.05 is the paper's; two forward/backward passes per update).
        sam_adaptive: Adaptive SAM (Kwon et al. 2021; scale-invariant, use a larger rho, 0.5-2).
    """

    epochs: int = 5
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    grad_accum_steps: int = 1
    clip_grad_norm: Optional[float] = None
    seed: Union[int, Literal["random"]] = 42
    output_dir: Optional[str] = None
    name: Optional[str] = None
    early_stopping_metric: str = "top1"
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    log_every: int = 10
    checkpoint_every_steps: int = 0
    max_nonfinite_steps: int = 3
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = None
    progress: bool = True
    tta_flip: bool = False
    tta: Literal["none", "flip", "five_crop", "ten_crop", "multiscale"] = "none"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    drop_last: bool = True
    ema_decay: float = 0.0
    ema_warmup: bool = True
    sam_rho: float = 0.0
    sam_adaptive: bool = False


@dataclass
class SyntheticConfig:
    """Generated images added to the training split (from ``scripts/generate.py``).

    Args:
        dir: A generated dataset folder (``manifest.jsonl`` + class subfolders); null: none.
        ratio: Synthetic images per class as a multiple of that class's real training images
            (0.5 adds half as many); used when ``per_class`` is 0.
        per_class: A fixed number of synthetic images per class (0: use ``ratio``).
        only: Train on the synthetic images alone (Classification Accuracy Score: a classifier
            trained on generated images, tested on the real test split).
        seed: Seed of which synthetic images are picked when a class has more than needed.
    """

    dir: Optional[str] = None
    ratio: float = 1.0
    per_class: int = 0
    only: bool = False
    seed: int = 0


@dataclass
class PipelineConfig:
    """Pipeline parallelism (``--parallel pipeline``): the model split into stages, one per process.

    Args:
        stages: Number of stages (null: one per process; must equal the process count).
        microbatches: Microbatches per batch (``train.batch_size`` must be a multiple); more
            microbatches shrink the idle bubble ``(K - 1) / (M + K - 1)``.
        schedule: ``gpipe`` (all forwards, then all backwards) or ``1f1b`` (interleaved, less
            activation memory).
        balance: Cut the model into stages of equal measured forward+backward ``time``
            (throughput; measured on process 0 and shared), equal counted ``flops`` (the same on
            every process, but blind to memory-bound layers) or equal ``params`` (memory; in a
            ResNet it puts most of the work on stage 0).
    """

    stages: Optional[int] = None
    microbatches: int = 4
    schedule: Literal["gpipe", "1f1b"] = "gpipe"
    balance: Literal["time", "flops", "params"] = "time"


@dataclass
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015) from a trained teacher.

    Args:
        teacher: The teacher: a run directory, checkpoint folder or export trained on the same
            classes (any architecture and input size); null: no distillation.
        alpha: Weight of the soft-target term: ``(1 - alpha) * method loss + alpha * T^2 * KL``.
        temperature: Softmax temperature ``T`` of both models' logits in the KL term.
    """

    teacher: Optional[str] = None
    alpha: float = 0.5
    temperature: float = 4.0


@dataclass
class TrainClassifierConfig:
    """Everything ``scripts/train_classifier.py`` needs.

    Args:
        peft: PEFT method applied to the backbone (``none``, ``lora``, ``dora``, ...).
        parallel: ``data`` (one model copy per process: DDP, DeepSpeed, FSDP from the accelerate
            config) or ``pipeline`` (the model split into ``pp.stages`` stages, one per process).
        resume: Continue a run: ``last`` (this run directory's last checkpoint) or a
            checkpoint folder.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: str = "none"
    lora: LoraConfig = field(default_factory=LoraConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    parallel: Literal["data", "pipeline"] = "data"
    pp: PipelineConfig = field(default_factory=PipelineConfig)
    resume: Optional[str] = None


@dataclass
class GanConfig:
    """The generative model of ``scripts/train_gan.py``.

    Args:
        arch: ``cdcgan`` (class-conditional DCGAN), ``dcgan`` (unconditional: its images get
            labels only from a classifier) or ``diffusion`` (class-conditional DDPM on a
            ``diffusers`` UNet, sampled with DDIM; needs ``pip install fgclf[diffusion]``).
        image_size: Side of the generated images (GANs: a power of two >= 16); training images
            are resized and center-cropped to it.
        latent_dim: Size of the noise vector (the lab notes' ``encoding_dims``).
        base_width: Channels of the highest-resolution layer (doubling towards 4x4, at most 512);
            for diffusion the UNet's first block width.
        conditioning: How the cdcgan discriminator sees the class: ``projection`` or ``acgan``
            (an auxiliary classifier head).
        loss: GAN loss: ``hinge``, ``bce`` (non-saturating) or ``lsgan`` (least squares).
        aux_weight: Weight of the AC-GAN class loss.
        lr_g: Adam learning rate of the generator (of the UNet for diffusion).
        lr_d: Adam learning rate of the discriminator.
        beta1: Adam beta1 (DCGAN: 0.5).
        beta2: Adam beta2.
        d_steps: Discriminator updates per generator update.
        ema_decay: Exponential moving average of the generator weights and BatchNorm
            statistics (0: off), with timm's warmup (decay ``1 - (1 + step)^(-2/3)`` until it
            reaches this value, so short runs average too); grids, exports and ``generate.py``
            use the averaged generator.
        diffusion_steps: DDPM noise levels in training.
        sample_steps: DDIM steps when sampling.
    """

    arch: Literal["cdcgan", "dcgan", "diffusion"] = "cdcgan"
    image_size: int = 32
    latent_dim: int = 100
    base_width: int = 64
    conditioning: Literal["projection", "acgan"] = "projection"
    loss: str = "hinge"
    aux_weight: float = 1.0
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    d_steps: int = 1
    ema_decay: float = 0.999
    diffusion_steps: int = 1000
    sample_steps: int = 50


@dataclass
class GanTrainConfig:
    """The loop of ``scripts/train_gan.py``.

    Args:
        epochs: Passes over the training images.
        batch_size: Global batch size (split across processes).
        seed: Random seed (``random`` draws one and records it).
        output_dir: Run directory; null makes ``runs/<name>``.
        name: Run name; null builds one from data, arch and time.
        hflip: Mirror training images at random.
        log_every: Log the running losses every this many updates.
        sample_every: Write a sample grid every this many epochs (and after the last).
        grid_per_class: Samples per class (columns) in the grids.
        grid_classes: At most this many classes (rows) in the grids.
        mixed_precision: Override the accelerate config: ``no``, ``fp16`` or ``bf16``.
        progress: Show tqdm progress bars (main process only).
    """

    epochs: int = 20
    batch_size: int = 64
    seed: Union[int, Literal["random"]] = 42
    output_dir: Optional[str] = None
    name: Optional[str] = None
    hflip: bool = True
    log_every: int = 10
    sample_every: int = 1
    grid_per_class: int = 8
    grid_classes: int = 12
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = None
    progress: bool = True


@dataclass
class TrainGanConfig:
    """Everything ``scripts/train_gan.py`` needs.

    Args:
        resume: Continue a run: ``last`` (this run directory's last checkpoint) or a
            checkpoint folder.
    """

    data: DataConfig = field(default_factory=DataConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    train: GanTrainConfig = field(default_factory=GanTrainConfig)
    resume: Optional[str] = None


@dataclass
class GenerateConfig:
    """Everything ``scripts/generate.py`` needs.

    Args:
        generator: A ``train_gan.py`` run directory or its ``checkpoints/generator`` folder.
        output_dir: Folder for the generated dataset (must not exist unless ``overwrite``).
        per_class: Images generated per class (an unconditional generator makes
            ``per_class x classes`` images in all, labelled by the classifier).
        classes: Only these classes (names or 0-based indices); null: every class.
        seed: Seed of the input noise (image ``i`` of a run is reproducible from it).
        batch_size: Images per forward pass.
        sample_steps: DDIM steps for a diffusion generator (null: its trained default).
        classifier: A classifier to score the images: a ``train_classifier.py`` run directory
            or a ``checkpoints/best`` export. Required for an unconditional generator, whose
            images get the classifier's prediction as a pseudo-label.
        threshold: Keep an image only when the classifier gives its (conditioning or
            pseudo-) label at least this probability (0 keeps all).
        overwrite: Replace an existing output folder.
        device: ``cpu``, ``cuda``, ... (null: cuda when available).
    """

    generator: Optional[str] = None
    output_dir: Optional[str] = None
    per_class: int = 50
    classes: Optional[list[str]] = None
    seed: int = 0
    batch_size: int = 64
    sample_steps: Optional[int] = None
    classifier: Optional[str] = None
    threshold: float = 0.0
    overwrite: bool = False
    device: Optional[str] = None


@dataclass
class ExtractConfig:
    """Everything ``scripts/extract_features.py`` needs.

    Args:
        data: The dataset and its splits (as for ``train_classifier.py``; augmentation is
            ignored: features always use the eval transform).
        model: The backbone (``strategy``, ``head_init`` and dropout settings do not apply:
            the body runs in eval mode and the classifier is dropped).
        output_dir: Feature directory; null makes ``runs/features/<data>_<model>_<time>``.
        batch_size: Global batch size of the forward passes (split across processes).
        seed: Seed set before the model is built (reproducible random init without weights).
        mixed_precision: Override the accelerate config: ``no``, ``fp16`` or ``bf16``.
        progress: Show tqdm progress bars (main process only).
        overwrite: Replace the features of an existing feature directory.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    output_dir: Optional[str] = None
    batch_size: int = 64
    seed: int = 0
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = None
    progress: bool = True
    overwrite: bool = False


@dataclass
class ProbeTrainConfig:
    """The probe's training loop (one process; features are small).

    Args:
        epochs: Passes over the cached train features (full batch: one update each).
        batch_size: Minibatch size; 0 trains full-batch.
        seed: Seed of the head init and minibatch order.
        output_dir: Run directory; null makes ``runs/<name>``.
        name: Run name; null builds one from the backbone, head and time.
        early_stopping_metric: Validation metric watched for the best head and early stop
            (``loss`` is minimised, others such as ``top1`` maximised).
        early_stopping_patience: Epochs without improvement before stopping (0: never stop).
        early_stopping_min_delta: Smallest change that counts as an improvement.
        log_every: Print a progress line every this many epochs.
        progress: Print the progress lines at all.
    """

    epochs: int = 300
    batch_size: int = 0
    seed: int = 42
    output_dir: Optional[str] = None
    name: Optional[str] = None
    early_stopping_metric: str = "loss"
    early_stopping_patience: int = 30
    early_stopping_min_delta: float = 0.0
    log_every: int = 50
    progress: bool = True


def _probe_optim() -> OptimConfig:
    return OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4, scheduler="cosine")


@dataclass
class ProbeConfig:
    """Everything ``scripts/train_probe.py`` needs.

    Args:
        features: Feature directory written by ``scripts/extract_features.py``.
        head: ``linear`` or ``mlp`` (torch, trained with ``optim``), or ``sklearn``
            (scikit-learn LogisticRegression, L-BFGS, as a reference).
        hidden_dim: Hidden width of the ``mlp`` head.
        dropout: Dropout on the head's input (and hidden layer of ``mlp``).
        standardize: Scale every feature to zero mean, unit variance over the train split
            (stored in the head, which therefore takes raw features).
        sklearn_c: Inverse L2 strength ``C`` of the ``sklearn`` head.
        sklearn_max_iter: Iteration limit of the ``sklearn`` head.
        optim: Optimizer and lr schedule of the torch heads (schedule lengths in epochs).
        train: The loop.
    """

    features: Optional[str] = None
    head: Literal["linear", "mlp", "sklearn"] = "linear"
    hidden_dim: int = 512
    dropout: float = 0.0
    standardize: bool = True
    sklearn_c: float = 1.0
    sklearn_max_iter: int = 2000
    optim: OptimConfig = field(default_factory=_probe_optim)
    train: ProbeTrainConfig = field(default_factory=ProbeTrainConfig)


# ----------------------------------------------------------------------------- extraction
def build_parser(config_cls: type, *, prog: str, description: str):
    """A jsonargparse parser for ``config_cls`` with ``--config`` YAML support."""
    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter):
        def _fill_text(self, text, width, indent):  # keep the docstring's lines: its examples are commands
            return "".join(indent + line for line in text.splitlines(keepends=True))

    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False,
                            default_env=False, formatter_class=HelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="YAML file of settings; CLI flags given after it override it.")
    parser.add_class_arguments(config_cls, fail_untyped=True, sub_configs=True)
    return parser


def parse_config(config_cls: type, argv: Sequence[str] | None = None, *, prog: str = "fgclf",
                 description: str = ""):
    """Parse ``argv`` into an instance of ``config_cls``.

    Raises:
        UserError: unknown key, wrong type, YAML syntax error, missing ``--config`` file.
    """
    from jsonargparse import ArgumentError

    parser = build_parser(config_cls, prog=prog, description=description)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = parser.parse_args(argv)
    except ArgumentError as err:
        raise UserError(f"bad configuration: {err}") from None
    ns_dict = ns.as_dict()
    ns_dict.pop("config", None)
    config = from_dict(config_cls, ns_dict)
    data = getattr(config, "data", None)
    if getattr(data, "decoder", None) == "nvjpeg" and config_cls is not TrainClassifierConfig:
        raise UserError(f"--data.decoder nvjpeg is train_classifier.py's GPU input path; {prog} decodes on the "
                        "CPU: use --data.decoder pil or torchvision")
    return config


def from_dict(config_cls: type, values: dict) -> Any:
    """Build a (nested) dataclass from a plain dict, recursing into dataclass fields."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(config_cls)}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"unknown config key '{key}' for {config_cls.__name__}")
        default = hints[key].default_factory if hints[key].default_factory is not dataclasses.MISSING else None
        sub = default() if default is not None else None
        if dataclasses.is_dataclass(sub):
            if isinstance(value, dict):
                value = from_dict(type(sub), value)
            elif not isinstance(value, type(sub)):
                raise UserError(f"config section '{key}' must be a mapping of its settings, got {value!r}")
        kwargs[key] = value
    return config_cls(**kwargs)


def to_dict(config: Any) -> dict:
    """Plain nested dict of a config dataclass (for YAML/JSON)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path, *, extra: dict | None = None) -> None:
    """Write the resolved config (plus ``extra``: seed, versions, command line) as YAML."""
    from fgclf.utils import atomic_write_text

    data = to_dict(config)
    if extra:
        data["run"] = extra
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def load_config(config_cls: type, path: str | Path) -> Any:
    """Read a run directory's ``config.yaml`` back into ``config_cls`` (``run`` info dropped)."""
    data = yaml.safe_load(Path(path).read_text())
    data.pop("run", None)
    return from_dict(config_cls, data)
