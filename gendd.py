"""GenDD: Generative Distribution Distillation (spec `gendd_method.md`).

Knowledge distillation posed as conditional diffusion: a diffusion head learns the distribution
of the (frozen) teacher's pooled feature given the student's pooled feature, and the teacher's own
linear classifier reads the sampled features out. Two stages, one config:

    # stage 1: student backbone -> P -> frozen teacher classifier, cross-entropy
    python gendd.py --config config/distillation/gendd_fmnist_res8x2_res8.yaml --gendd_stage 1 \
        --save runs/gendd/fmnist_s1
    # stage 2: GenDD, starting from the stage-1 export
    python gendd.py --config config/distillation/gendd_fmnist_res8x2_res8.yaml --gendd_stage 2 \
        --init_from runs/gendd/fmnist_s1 --save runs/gendd/fmnist_s2

Stage 1 (spec §1, "classifier reuse"): f_s = student(x) (BatchNorm in train mode), logits =
W·P(f_s) + b with the teacher's classifier (W, b) frozen; P is the identity when the widths match
and a Dense otherwise. Only the backbone and P train (the student's own fc is frozen, unused).

Stage 2 (GenDD), per step:
    f_s = student(x);  probe = fc_s(stop_gradient(f_s))        # fc_s: a linear probe
    z = LayerNorm_affine(f_s)                                   # the "projector"
    target = (1 - s)·f_t + s·W[y]          (soft labels q: (1 - s)·f_t + s·qᵀW)   no gradient
    z, target = m·(z, target) + (1 - m)·(z, target)[π],  m ~ Beta(beta, beta)   (repr mixup)
    tokens: target [B, D] -> [B·K, td] (image-major, token-minor), M copies of each -> N rows
    loss = mean_N diffusion loss(token | z, k) + CE(probe, y)
The backbone learns only through the diffusion loss (via z); the CE term trains only fc_s. With
`unsupervised: true` there is no label: no CE, fc_s frozen, soft labels q = softmax(teacher).

Prediction: sample `num_sampling` features per image (DDPM respaced to `num_sampling_steps`,
classifier-free guidance `cfg_scale`, `temperature`), then the teacher's classifier. The exported
predictor returns one member per sampled feature, logits_m = W·feature_m + b; since the classifier
is linear, the mean of the member logits equals the spec's W·mean(features) + b exactly.

Departures from the reference (spec §9), on purpose:
- [Q1] the CIFAR stage-2 step schedule reaches the base LR at the end of warm-up and keeps it
  until the first decay epoch (the reference stays at 0.98·lr because no branch resets it).
- [Q2] the stage-1 per-epoch cosine starts at the peak in epoch 1 (0-based cosine), so its last
  epoch does not train with LR 0.
- [Q3] weight decay is off for the diffusion head *and* the projector LayerNorm (the reference's
  "ln" name match missed the projector, which it decayed); the backbone (BatchNorm included) and
  fc_s are decayed, as in the reference.
- [Q6] the best checkpoint (exported) is selected on validation data, never on the test set.
- The network standardizes its input with the data set's registered pixel statistics (CIFAR:
  (0.49, 0.48, 0.44)/(0.2, 0.2, 0.2)), not the reference's CIFAR-100 constants.
- The N = B·M·K diffusion rows are ordered image-major (each image's M copies of its K tokens
  together), not the B·K block tiled M times: the same rows and loss, and the row axis then
  shards with the batch (with the tiled order every device ran the whole head).
- Optional, off by default: `x0_clip` clips x̂0 at every sampling step (the reference never
  clips; after short training its first respaced step multiplies ε̂'s error by ~300).
Kept as in the reference: per-row condition dropout with a zero null condition [Q4], the
image-style discretized likelihood at t = 0 [Q5], a single token when D = token_dim [Q10].
"""
import dataclasses
import os
from typing import ClassVar, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data.augment import augment_batch, eval_images, training_images
from data.datasets import Split
from models import diffusion as gd
from models.resnet import resnet_from_config, resnet_from_spec, resnet_spec
from models.vector_field import DiffusionMLP
from utils.checkpoints import find_export, load_export, read_sidecar
from utils.config import CommonConfig
from utils.data_loading import check_input_size
from utils.driver import train_main
from utils.errors import UserError
from utils.method import Method, Run, Sweep, register
from utils.optim import make_optimizer, step_lr_schedule
from utils.predict import Predictor, count_params
from utils.trainer import TrainState, init_variables, masked_mean, prediction_metrics, steps_per_epoch

KIND = "gendd"
LAYERNORM_EPS = 1e-5  # the projector LayerNorm (PyTorch's default eps)


@dataclasses.dataclass
class GenDDConfig(CommonConfig):
    # Student: any zoo member (model_* keys). GenDD's CIFAR nets are BN-ReLU with bias-free convs.
    model_style: str = "BN-ReLU"
    model_depth: int = 32
    model_width: int = 1
    model_nobias: bool = True
    # Stages and inputs
    gendd_stage: int = 2  # 1: classifier reuse (pretrain); 2: GenDD
    teacher_dir: Optional[str] = None  # a teacher export: kind "resnet", or one swag_teacher run
    init_from: Optional[str] = None  # student weights: a gendd (stage-1) or resnet export / run dir
    # Augmentation (both networks see the same augmented images)
    crop_padding: int = 4  # zero-pad random crop: shifts of up to this many pixels; 0: none
    flip: bool = True  # random horizontal flip
    # Soft labels, made by the streaming path's workers (the BEiT recipes): contraction and the
    # probe's cross-entropy take them (spec §3)
    mixup_alpha: float = 0.0  # stream: mixup Beta(α, α); 0: none
    cutmix_alpha: float = 0.0  # stream: cutmix Beta(α, α); 0: none (both > 0: one of them per batch)
    label_smoothing: float = 0.0  # stream: label smoothing of the soft labels
    STREAM_SOFT_LABELS: ClassVar[bool] = True
    # Stage-2 optimisation: AdamW, β2 cosine from beta2_min up to adam_beta2
    optim: str = "adamw"
    optim_bs: int = 64
    optim_ne: int = 240
    optim_lr: float = 1e-3
    optim_weight_decay: float = 5e-2
    beta2_min: Optional[float] = 0.95  # null: constant adam_beta2
    lr_schedule: str = "step"  # step (CIFAR) | cos (ImageNet / CC3M)
    warmup_epochs: int = 50  # linear warm-up epochs of stage 2
    lr_decay_epochs: List[int] = dataclasses.field(  # step schedule: lr × lr_decay_rate at each
        default_factory=lambda: [150, 180, 210])
    lr_decay_rate: float = 0.1  # step schedule factor
    min_lr: float = 0.0  # floor of the cos schedule
    reference_lr_quirks: bool = False  # the reference's [Q1] step LR (stuck at the last warm-up value until the first decay) and [Q2] stage-1 cosine (ends at 0)
    # Stage-1 optimisation: AdamW(adam_beta1, adam_beta2), per-epoch cosine without warm-up
    stage1_lr: float = 3e-3  # stage-1 learning rate
    stage1_ne: int = 50  # stage-1 epochs
    stage1_weight_decay: float = 5e-2  # stage-1 AdamW weight decay
    # GenDD
    smooth: Optional[float] = None  # distribution contraction s; null: 0.9, or 0 when unsupervised (the reference's scripts)
    unsupervised: bool = False  # no labels: no probe CE, probe frozen, soft labels from the teacher
    beta: float = 1.0  # representation mixup Beta(beta, beta); 0 disables it
    projector_weight_decay: bool = False  # decay the projector LayerNorm too, as the reference's grouping does [Q3]
    token_dim: int = 64  # td: the teacher feature is split into D/td tokens
    diffusion_batch_mul: int = 30  # M
    cond_drop_prob: float = 0.2  # probability of dropping a row's condition (classifier-free guidance)
    head_width: int = 1024  # hidden units of the diffusion MLP
    head_depth: int = 3  # residual blocks of the diffusion MLP
    num_diffusion_steps: int = 1000  # T of the cosine noise schedule
    # Prediction
    num_sampling_steps: int = 100  # respaced DDPM steps at prediction
    cfg_scale: Optional[float] = 2.0  # null or 1.0: no guidance
    temperature: float = 1.0  # scale of the sampling noise
    # A departure: an undertrained ε̂ is amplified ~300x at the cosine schedule's first respaced step.
    x0_clip: Optional[float] = None  # clip each step's x̂0 to [-x0_clip, x0_clip]; null: not (reference)
    num_sampling: int = 5  # sampled features per image of the exported predictor
    val_num_sampling: int = 1  # ... during validation
    num_val_examples: Optional[int] = None  # validate on the first N validation images only
    select_metric: Optional[str] = "acc"

    def __post_init__(self):
        if self.smooth is None:  # the reference's scripts: 0.9 with labels, 0 without
            self.smooth = 0.0 if self.unsupervised else 0.9

    def validate(self):
        super().validate()
        if self.gendd_stage not in (1, 2):
            raise UserError(f"gendd_stage must be 1 or 2, got {self.gendd_stage}")
        if self.teacher_dir is None:
            raise UserError("gendd.py needs teacher_dir: a teacher export (sgd_swag.py with "
                            "swag: false, or a KD student) or one swag_teacher run")
        if self.optim not in ("adam", "adamw"):
            raise UserError(f"gendd.py trains with optim adamw, got {self.optim!r}")
        if self.gendd_stage == 1 and self.unsupervised:
            raise UserError("stage 1 trains on labels; unsupervised GenDD starts at gendd_stage 2")
        if not 0.0 <= self.smooth <= 1.0:
            raise UserError(f"smooth must be in [0, 1], got {self.smooth}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise UserError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.beta < 0:
            raise UserError(f"beta must be >= 0, got {self.beta}")
        if self.lr_schedule not in ("step", "cos"):
            raise UserError(f"lr_schedule must be step or cos, got {self.lr_schedule!r}")
        if not 0 <= self.warmup_epochs <= self.optim_ne:
            raise UserError(f"need 0 <= warmup_epochs <= optim_ne, got {self.warmup_epochs}")
        if self.beta2_min is not None and not 0.0 <= self.beta2_min <= self.adam_beta2 < 1.0:
            raise UserError(f"need 0 <= beta2_min <= adam_beta2 < 1, got {self.beta2_min}, "
                            f"{self.adam_beta2}")
        positive = ["token_dim", "diffusion_batch_mul", "head_width", "head_depth",
                    "num_diffusion_steps", "num_sampling_steps", "num_sampling",
                    "val_num_sampling", "stage1_ne"]
        for key in positive:
            if getattr(self, key) < 1:
                raise UserError(f"config key {key} must be >= 1, got {getattr(self, key)}")
        if self.num_sampling_steps > self.num_diffusion_steps:
            raise UserError(f"num_sampling_steps ({self.num_sampling_steps}) cannot exceed "
                            f"num_diffusion_steps ({self.num_diffusion_steps})")
        if self.num_val_examples is not None and self.num_val_examples < 1:
            raise UserError(f"num_val_examples must be >= 1, got {self.num_val_examples}")
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise UserError(f"config key {key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.unsupervised and (self.mixup_alpha or self.cutmix_alpha or self.label_smoothing):
            raise UserError("unsupervised GenDD has no labels to mix or smooth: set mixup_alpha, "
                            "cutmix_alpha and label_smoothing to 0")
        if self.x0_clip is not None and self.x0_clip <= 0:
            raise UserError(f"x0_clip must be > 0 (or null: no clipping), got {self.x0_clip}")


# ---------------------------------------------------------------------------------------------
# The method's maths (pure functions, jittable)
# ---------------------------------------------------------------------------------------------
def contract(features, kernel, smooth: float, labels=None, probs=None):
    """Distribution contraction (spec §3): (1 - s)·f_t + s·anchor, with no gradient.

    `kernel` is the teacher classifier's Flax Dense kernel [D, C], so the class-y row of the
    PyTorch weight W [C, D] is kernel[:, y]. Hard labels [B]: anchor = W[y]; soft labels
    probs [B, C]: anchor = qᵀW. The bias is not used.
    """
    features = jax.lax.stop_gradient(features)
    if smooth == 0.0:
        return features
    if (labels is None) == (probs is None):
        raise ValueError("contract needs exactly one of labels and probs")
    anchor = kernel.T[labels] if probs is None else probs @ kernel.T
    return jax.lax.stop_gradient((1.0 - smooth) * features + smooth * anchor)


def repr_mixup(key, z, target, beta: float, mask=None):
    """One m ~ Beta(beta, beta) and one permutation π per batch: x <- m·x + (1 - m)·x[π] for both
    the condition z and the target (gradients flow through z and z[π]). Off when beta <= 0, and
    (as image mixup in data/augment.py) on a batch that holds padding rows."""
    if beta <= 0:
        return z, target
    k_m, k_perm = jax.random.split(key)
    m = jax.random.beta(k_m, beta, beta).astype(z.dtype)
    perm = jax.random.permutation(k_perm, z.shape[0])
    mixed_z = m * z + (1.0 - m) * z[perm]
    mixed_t = m * target + (1.0 - m) * target[perm]
    if mask is None:
        return mixed_z, mixed_t
    apply = jnp.all(mask)
    return jnp.where(apply, mixed_z, z), jnp.where(apply, mixed_t, target)


def split_tokens(features, token_dim: int):
    """[B, D] -> [B·K, td]: token k of image b is row b·K + k, features[b, k·td:(k+1)·td]."""
    b, d = features.shape
    if d % token_dim:
        raise ValueError(f"feature size {d} is not a multiple of token_dim {token_dim}")
    return features.reshape(b * (d // token_dim), token_dim)


def merge_tokens(tokens, num_tokens: int):
    """[B·K, td] -> [B, K·td], the inverse of `split_tokens`."""
    n, td = tokens.shape
    return tokens.reshape(n // num_tokens, num_tokens * td)


def diffusion_rows(target, z, mask, token_dim: int, mul: int):
    """The N = B·M·K diffusion rows of a batch (spec §2, in another order).

    Returns x0 [N, td], cond [N, d_s], token ids [N] and the row mask [N], image-major: image b's
    M copies of its K tokens are rows b·M·K to (b+1)·M·K − 1 (copy-major, token-minor). The
    reference tiles the whole B·K block M times instead. The rows are the same and each draws its
    own timestep and noise, so the loss is too; in this order a device's images keep their rows,
    where with the tiled order XLA ran the whole head (most of the step) on every device of a
    data-parallel mesh.
    """
    num_tokens = target.shape[-1] // token_dim
    image_rows = lambda a: jnp.repeat(a, mul * num_tokens, axis=0)  # [B, ...] -> [B·M·K, ...]
    x0 = split_tokens(jnp.repeat(target, mul, axis=0), token_dim)
    token_ids = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), target.shape[0] * mul)
    return x0, image_rows(z), token_ids, image_rows(mask)


def sample_features(head: DiffusionMLP, head_params, sampler, key, z, *, num_samples: int,
                    cfg_scale: Optional[float] = 2.0, temperature: float = 1.0,
                    x0_clip: Optional[float] = None):
    """Sampled teacher features [B, n, D] given conditions z [B, d_s] (spec §4-5).

    Each image's condition is repeated n × K times (rows image-, then sample-, then
    token-major); every token is sampled by ancestral DDPM over `sampler` (a respaced process),
    with classifier-free guidance as one network call on a doubled batch [cond; zeros], and the
    K tokens are concatenated back into a D-vector.
    """
    b = z.shape[0]
    num_tokens, token_dim = head.num_tokens, head.token_dim
    cond = jnp.repeat(z, num_samples * num_tokens, axis=0)
    tokens = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), b * num_samples)
    shape = (cond.shape[0], token_dim)
    # p_sample gives every row the same timestep: the head embeds one scalar instead of N rows.
    apply = lambda x, t, c, k: head.apply({"params": head_params}, x, t[0], c, k)
    if cfg_scale is None or cfg_scale == 1.0:
        model_fn = lambda x, t: apply(x, t, cond, tokens)
    else:
        cond2 = jnp.concatenate([cond, jnp.zeros_like(cond)], axis=0)
        tokens2 = jnp.concatenate([tokens, tokens], axis=0)
        model_fn = gd.cfg_model_fn_doubled(lambda x, t: apply(x, t, cond2, tokens2), cfg_scale)
    x = gd.p_sample_loop(sampler, model_fn, key, shape, temperature, x0_clip=x0_clip)
    return merge_tokens(x, num_tokens).reshape(b, num_samples, num_tokens * token_dim)


def projector_apply(projector_params, features):
    return nn.LayerNorm(epsilon=LAYERNORM_EPS, use_fast_variance=False).apply(
        {"params": projector_params}, features)


def linear(params, features):
    return features @ params["kernel"] + params["bias"]


def logit_metrics(logits, labels, prefix: str = "", soft_labels=None):
    """Per-example accuracy and cross-entropy of logits [B, K]; with soft labels [B, K] the
    cross-entropy is against them (the accuracy stays against the hard labels)."""
    log_probs = jax.nn.log_softmax(logits)
    metrics = prediction_metrics(log_probs, labels, prefix)
    if soft_labels is not None:
        metrics[f"{prefix}nll"] = -jnp.sum(soft_labels * log_probs, axis=-1)
    return metrics


# ---------------------------------------------------------------------------------------------
# Schedules and the optimizer
# ---------------------------------------------------------------------------------------------
def cosine_lr_schedule(base_lr: float, min_lr: float, steps_per_epoch: int, warmup_epochs: int,
                       num_epochs: int):
    """ImageNet / CC3M stage 2, per 0-based epoch e: base·(e+1)/warmup while e < warmup, then
    min + (base - min)·½(1 + cos(π(e - warmup + 1)/(E - warmup)))."""

    def schedule(step):
        epoch = jnp.asarray(step) // steps_per_epoch
        warm = base_lr * (epoch + 1) / max(warmup_epochs, 1)
        frac = (epoch - warmup_epochs + 1) / max(num_epochs - warmup_epochs, 1)
        cos = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(epoch < warmup_epochs, warm, cos).astype(jnp.float32)

    return schedule


def stage1_lr_schedule(base_lr: float, steps_per_epoch: int, num_epochs: int,
                       reference: bool = False):
    """Stage 1, per 0-based epoch e: base·½(1 + cos(πe/E)): the peak in the first epoch, a
    positive rate in the last ([Q2] fixed); `reference`: the reference's 1-based e, below the
    peak in the first epoch and 0 in the last."""

    def schedule(step):
        epoch = jnp.asarray(step) // steps_per_epoch + (1 if reference else 0)
        return (base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / num_epochs))).astype(jnp.float32)

    return schedule


def beta2_schedule(beta2_min: float, beta2_max: float, total_steps: int):
    """β2(p) = max − ½(max − min)(1 + cos πp), p = step/(total_steps − 1): min at the first step,
    max at the last."""

    def schedule(step):
        p = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1), 0.0, 1.0)
        return beta2_max - 0.5 * (beta2_max - beta2_min) * (1.0 + jnp.cos(jnp.pi * p))

    return schedule


def decay_mask_of(params, projector_decay: bool = False):
    """Weight decay for the student (backbone incl. BatchNorm, fc_s) and stage-1's P; none for
    the diffusion head, nor for the projector LayerNorm ([Q3] fixed) unless `projector_decay`
    (the reference's grouping, whose "ln" match misses the projector)."""
    undecayed = ("head",) if projector_decay else ("head", "projector")
    return {name: jax.tree.map(lambda _: name not in undecayed, sub) for name, sub in params.items()}


def frozen_mask_of(params, freeze_student_fc: bool):
    """The student's own fc is frozen in stage 1 (unused) and in unsupervised stage 2."""
    mask = jax.tree.map(lambda _: False, params)
    if freeze_student_fc:
        mask["student"]["classifier"] = jax.tree.map(lambda _: True, params["student"]["classifier"])
    return mask


# ---------------------------------------------------------------------------------------------
# Loading teachers and student weights
# ---------------------------------------------------------------------------------------------
def load_teacher(teacher_dir: str, data_name: Optional[str] = None,
                 num_classes: Optional[int] = None):
    """(model, variables, sidecar) of a single teacher: a "resnet" export (a KD student, a plain
    cross-entropy network from sgd_swag.py with swag: false) or one swag_teacher run, whose SWA
    mean is used. The network must have a "classifier" Dense over its pooled feature."""
    model_dir = find_export(teacher_dir, "teacher_dir")
    sidecar = read_sidecar(model_dir)
    kind = sidecar.get("kind")
    if kind == "resnet":
        arrays, sidecar = load_export(model_dir, kind="resnet")
        model = resnet_from_spec(sidecar["model"])
        variables = {"params": arrays["params"], **arrays.get("model_state", {})}
    elif kind == "swag_teacher":
        arrays, sidecar = load_export(model_dir, kind="swag_teacher")
        model = resnet_from_spec(sidecar["model"])
        if model.norm == "bn":
            raise UserError(f"{model_dir}: a BatchNorm swag_teacher has no statistics for its SWA "
                            f"mean; train the teacher with swag: false")
        variables = {"params": arrays["mean"]}
    else:
        raise UserError(f"{model_dir} holds a {kind!r}; GenDD's teacher must be a 'resnet' or a "
                        f"'swag_teacher' export")
    if "classifier" not in variables["params"]:
        raise UserError(f"{model_dir}: the teacher has no 'classifier' layer")
    if data_name is not None and sidecar.get("data_name", data_name) != data_name:
        raise UserError(f"teacher {model_dir} was trained on {sidecar['data_name']}, not {data_name}")
    if num_classes is not None and model.num_classes != num_classes:
        raise UserError(f"teacher {model_dir} has {model.num_classes} classes but the data set "
                        f"has {num_classes}")
    return model, variables, sidecar


def load_student_weights(path: str, student, like_variables):
    """(params, model_state) of a student export (gendd stage 1 or 2, or a resnet) whose
    architecture is the configured student's (`like_variables`: its variables or their shapes);
    stage 1's P is not loaded (spec §1)."""
    model_dir = find_export(path, "init_from")
    arrays, sidecar = load_export(model_dir)
    kind = sidecar.get("kind")
    if kind == KIND:
        spec, saved = sidecar["student"], arrays["student"]
    elif kind == "resnet":
        spec, saved = sidecar["model"], arrays
    else:
        raise UserError(f"init_from {model_dir} holds a {kind!r}, expected a gendd or resnet export")
    expected = resnet_spec(student)
    differ = sorted(k for k in set(spec) | set(expected) if spec.get(k) != expected.get(k))
    if differ:
        raise UserError(f"init_from {model_dir}: its student differs from the configured one in "
                        f"{', '.join(f'{k} ({spec.get(k)} vs {expected.get(k)})' for k in differ)}")
    variables = {"params": saved["params"], **saved.get("model_state", {})}
    shapes = lambda tree: jax.tree.map(np.shape, tree)
    if shapes(variables) != shapes(dict(like_variables)):
        raise UserError(f"init_from {model_dir}: the student's arrays do not match its spec")
    params = variables.pop("params")
    return params, variables


# ---------------------------------------------------------------------------------------------
# Losses and evaluation
# ---------------------------------------------------------------------------------------------
def _augment(config, key, batch):
    return training_images(batch, lambda images_u8: augment_batch(
        key, images_u8, randaugment=False, crop_padding=config.crop_padding, flip=config.flip))


def _student_train(student, params, model_state, images):
    out, updates = student.apply({"params": params["student"], **model_state}, images, train=True,
                                 return_features=True, mutable=list(model_state))
    return out, dict(updates)


def _project(params, features):
    return linear(params["proj"], features) if "proj" in params else features


def make_stage1_loss_fn(student, config):
    def loss_fn(params, model_state, frozen, batch, key):
        images = _augment(config, key, batch)
        out, model_state = _student_train(student, params, model_state, images)
        logits = linear(frozen["classifier"], _project(params, out.pooled))
        per_example = logit_metrics(logits, batch["labels"], soft_labels=batch.get("soft_labels"))
        metrics = {name: masked_mean(value, batch["mask"]) for name, value in per_example.items()}
        return metrics["nll"], (model_state, metrics)

    return loss_fn


def make_stage2_loss_fn(student, teacher, head, diffusion, config):
    def loss_fn(params, model_state, frozen, batch, key):
        k_aug, k_mix, k_drop, k_diff = jax.random.split(key, 4)
        images = _augment(config, k_aug, batch)
        mask, labels = batch["mask"], batch["labels"]
        out, model_state = _student_train(student, params, model_state, images)
        f_s = out.pooled
        teacher_out = teacher.apply(frozen["teacher"], images, return_features=True)
        f_t = jax.lax.stop_gradient(teacher_out.pooled)
        soft_labels = batch.get("soft_labels")  # from the streaming workers' mixing
        if config.unsupervised:
            probs = jax.nn.softmax(jax.lax.stop_gradient(teacher_out.logits))
            target = contract(f_t, frozen["classifier"]["kernel"], config.smooth, probs=probs)
        elif soft_labels is not None:
            target = contract(f_t, frozen["classifier"]["kernel"], config.smooth, probs=soft_labels)
        else:
            target = contract(f_t, frozen["classifier"]["kernel"], config.smooth, labels=labels)
        z = projector_apply(params["projector"], f_s)
        z, target = repr_mixup(k_mix, z, target, config.beta, mask)
        x0, cond, token_ids, row_mask = diffusion_rows(target, z, mask, config.token_dim,
                                                       config.diffusion_batch_mul)
        model_fn = lambda x, t: head.apply({"params": params["head"]}, x, t, cond, token_ids,
                                           train=True, rngs={"dropout": k_drop})
        losses = gd.training_losses(diffusion, model_fn, k_diff, x0)
        diff_loss = masked_mean(losses["loss"], row_mask)
        metrics = {"diff_loss": diff_loss, "mse": masked_mean(losses["mse"], row_mask),
                   "vb": masked_mean(losses["vb"], row_mask)}
        loss = diff_loss
        if not config.unsupervised:  # unlabeled: no probe, no labels to score it on
            probe_logits = linear(params["student"]["classifier"], jax.lax.stop_gradient(f_s))
            probe = logit_metrics(probe_logits, labels, "probe_", soft_labels)
            metrics.update({name: masked_mean(value, mask) for name, value in probe.items()})
            loss = loss + metrics["probe_nll"]
        return loss, (model_state, metrics)

    return loss_fn


def _eval_common(student, teacher, state, frozen, batch):
    images = eval_images(batch["images"])
    out = student.apply({"params": state.params["student"], **state.model_state}, images,
                        return_features=True)
    teacher_out = teacher.apply(frozen["teacher"], images, return_features=True)
    return images, out, teacher_out


def make_stage1_eval_fn(student, teacher):
    def eval_fn(state, frozen, batch, key):
        _, out, teacher_out = _eval_common(student, teacher, state, frozen, batch)
        logits = linear(frozen["classifier"], _project(state.params, out.pooled))
        labels = batch["labels"]
        return {**logit_metrics(logits, labels),
                "teacher_acc": logit_metrics(teacher_out.logits, labels)["acc"]}

    return eval_fn


def make_stage2_eval_fn(student, teacher, head, sampler, config):
    def eval_fn(state, frozen, batch, key):
        _, out, teacher_out = _eval_common(student, teacher, state, frozen, batch)
        labels = batch["labels"]
        z = projector_apply(state.params["projector"], out.pooled)
        features = sample_features(head, state.params["head"], sampler, key, z,
                                   num_samples=config.val_num_sampling, cfg_scale=config.cfg_scale,
                                   temperature=config.temperature, x0_clip=config.x0_clip)
        mean_feature = jnp.mean(features, axis=1)
        logits = linear(frozen["classifier"], mean_feature)
        probe_logits = out.logits
        if config.unsupervised:
            probs = jax.nn.softmax(teacher_out.logits)
            target = contract(teacher_out.pooled, frozen["classifier"]["kernel"], config.smooth,
                              probs=probs)
        else:
            target = contract(teacher_out.pooled, frozen["classifier"]["kernel"], config.smooth,
                              labels=labels)
        return {**logit_metrics(logits, labels), **logit_metrics(probe_logits, labels, "probe_"),
                "teacher_acc": logit_metrics(teacher_out.logits, labels)["acc"],
                "feature_mse": jnp.mean(jnp.square(mean_feature - target), axis=-1)}

    return eval_fn


# ---------------------------------------------------------------------------------------------
# Export and prediction
# ---------------------------------------------------------------------------------------------
def head_fields(head: DiffusionMLP) -> dict:
    return {"token_dim": head.token_dim, "num_tokens": head.num_tokens, "width": head.width,
            "depth": head.depth, "time_embed_dim": head.time_embed_dim}


def export_gendd(config, student, teacher_sidecar, params, model_state, classifier, head,
                 selected_epoch):
    """(arrays, sidecar) of kind "gendd": arrays {student: {params, model_state},
    teacher_classifier, and projector + head (stage 2) or proj (stage 1, when P is a Dense)}."""
    arrays = {"student": {"params": params["student"]},
              "teacher_classifier": {"kernel": classifier["kernel"], "bias": classifier["bias"]}}
    if model_state:
        arrays["student"]["model_state"] = model_state
    sidecar = {"kind": KIND, "gendd_stage": config.gendd_stage, "student": resnet_spec(student),
               "num_classes": student.num_classes,
               "feature_dim": int(np.shape(classifier["kernel"])[0]),
               "teacher_dir": os.path.abspath(config.teacher_dir),
               "teacher_kind": teacher_sidecar.get("kind"), "teacher_model": teacher_sidecar["model"],
               "selected_epoch": selected_epoch}
    if config.gendd_stage == 1:
        if "proj" in params:
            arrays["proj"] = params["proj"]
    else:
        arrays["projector"], arrays["head"] = params["projector"], params["head"]
        sidecar.update({"head": head_fields(head), "num_diffusion_steps": config.num_diffusion_steps,
                        "num_sampling_steps": config.num_sampling_steps,
                        "cfg_scale": config.cfg_scale, "temperature": config.temperature,
                        "x0_clip": config.x0_clip,
                        "num_sampling": config.num_sampling, "smooth": config.smooth,
                        "unsupervised": config.unsupervised})
    return arrays, sidecar


def load_predictor(model_dir, num_members: Optional[int] = None,
                   num_sampling_steps: Optional[int] = None, cfg_scale: Optional[float] = None,
                   temperature: Optional[float] = None, probe: bool = False,
                   average_features: bool = False):
    """Predict with a GenDD export: member logits [B, M, K].

    Stage 2: M = num_members (default: the sidecar's num_sampling) sampled teacher features per
    image, each read out by the frozen teacher classifier, logits_m = W·feature_m + b. As the
    classifier is linear, the mean of the M member logits is exactly the reference's prediction
    W·mean_m(feature_m) + b; `average_features=True` returns that one member [B, 1, K] (the
    method's own prediction; the M members give the spread). `num_sampling_steps`, `cfg_scale`
    (1.0: no guidance) and `temperature` default to the sidecar's. `probe=True` (or a stage-1 export) gives the
    deterministic single member: the linear probe fc_s(f_s) (stage 2) or W·P(f_s) + b (stage 1).
    """
    model_dir = find_export(model_dir, "model_dir")
    arrays, sidecar = load_export(model_dir, kind=KIND)
    student = resnet_from_spec(sidecar["student"])
    student_vars = {"params": arrays["student"]["params"],
                    **arrays["student"].get("model_state", {})}
    stage = sidecar["gendd_stage"]

    def features_of(args, images):
        return student.apply(args["student"], images, return_features=True)

    if stage == 1 or probe:
        if stage == 1:
            args = {"student": student_vars, "classifier": arrays["teacher_classifier"],
                    "proj": arrays.get("proj")}
            name = "GenDD stage 1"

            def member_logits(args, images, key):
                pooled = features_of(args, images).pooled
                if args["proj"] is not None:
                    pooled = linear(args["proj"], pooled)
                return linear(args["classifier"], pooled)[:, None, :]
        else:
            args = {"student": student_vars}
            name = "GenDD probe"

            def member_logits(args, images, key):
                return features_of(args, images).logits[:, None, :]

        return Predictor(name=name, kind=KIND, member_logits=member_logits, args=args,
                         num_members=1, num_params=count_params(args), sidecar=sidecar)

    num_members = num_members or sidecar["num_sampling"]
    steps = num_sampling_steps or sidecar["num_sampling_steps"]
    cfg = sidecar["cfg_scale"] if cfg_scale is None else cfg_scale
    temp = sidecar["temperature"] if temperature is None else temperature
    head = DiffusionMLP(**sidecar["head"])
    sampler = gd.make_cosine_diffusion(sidecar["num_diffusion_steps"], steps)
    args = {"student": student_vars, "projector": arrays["projector"], "head": arrays["head"],
            "classifier": arrays["teacher_classifier"]}

    def member_logits(args, images, key):
        z = projector_apply(args["projector"], features_of(args, images).pooled)
        features = sample_features(head, args["head"], sampler, key, z, num_samples=num_members,
                                   cfg_scale=cfg, temperature=temp,
                                   x0_clip=sidecar.get("x0_clip"))
        if average_features:
            features = features.mean(1, keepdims=True)
        return linear(args["classifier"], features)  # [B, M, K], or [B, 1, K] averaged

    # Parameters used at prediction time: the student without its fc, the projector, the head,
    # the teacher's classifier.
    used = {**args, "student": {**student_vars, "params": {
        k: v for k, v in student_vars["params"].items() if k != "classifier"}}}
    name = f"GenDD (mean of {num_members})" if average_features else f"GenDD ({num_members})"
    return Predictor(name=name, kind=KIND, member_logits=member_logits, args=args,
                     num_members=1 if average_features else num_members,
                     num_params=count_params(used), sidecar=sidecar)


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------
def build(config: GenDDConfig, dataset) -> Run:
    """One stage of GenDD as a Run (stage 1: classifier reuse; stage 2: GenDD)."""
    teacher, teacher_vars, teacher_sidecar = load_teacher(config.teacher_dir,
                                                          config.eval_data_name or config.data_name,
                                                          dataset.num_classes)
    check_input_size(teacher, dataset.image_shape, "the teacher")
    classifier = teacher_vars["params"]["classifier"]
    feature_dim = int(np.shape(classifier["kernel"])[0])
    if config.gendd_stage == 2 and feature_dim % config.token_dim:
        raise UserError(f"the teacher's feature size {feature_dim} is not a multiple of "
                        f"token_dim {config.token_dim}")

    student = resnet_from_config(config, dataset.num_classes, dataset.pixel_mean,
                                 dataset.pixel_std, dtype=jnp.dtype(config.dtype))
    k_student, k_proj, k_head = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    if config.init_from:  # shapes suffice: no initialisation to compile
        sample = jnp.zeros((1, *dataset.image_shape), jnp.float32)
        student_params, model_state = load_student_weights(
            config.init_from, student, jax.eval_shape(student.init, k_student, sample))
    else:
        student_params, model_state = init_variables(student, k_student, dataset.image_shape)
    student_dim = int(np.shape(student_params["classifier"]["kernel"])[0])
    params = {"student": student_params}
    steps = steps_per_epoch(len(dataset.train), config.optim_bs)
    frozen = {"teacher": teacher_vars, "classifier": classifier}

    head = None
    if config.gendd_stage == 1:
        if student_dim != feature_dim:
            params["proj"] = nn.Dense(feature_dim).init(k_proj, jnp.zeros((1, student_dim)))["params"]
        num_epochs = config.stage1_ne
        lr = stage1_lr_schedule(config.stage1_lr, steps, num_epochs, config.reference_lr_quirks)
        optimizer = make_optimizer(
            dataclasses.replace(config, optim_weight_decay=config.stage1_weight_decay), lr,
            decay_mask=decay_mask_of(params), frozen_mask=frozen_mask_of(params, True))
        loss_fn = make_stage1_loss_fn(student, config)
        eval_fn = make_stage1_eval_fn(student, teacher)
    else:
        head = DiffusionMLP(token_dim=config.token_dim,
                            num_tokens=feature_dim // config.token_dim, width=config.head_width,
                            depth=config.head_depth, cond_drop_prob=config.cond_drop_prob,
                            num_timesteps=config.num_diffusion_steps)
        rows = jnp.zeros((1, config.token_dim))
        params["projector"] = nn.LayerNorm(epsilon=LAYERNORM_EPS).init(
            k_proj, jnp.zeros((1, student_dim)))["params"]
        params["head"] = jax.jit(head.init)(k_head, rows, jnp.zeros((1,), jnp.int32),
                                            jnp.zeros((1, student_dim)),
                                            jnp.zeros((1,), jnp.int32))["params"]
        diffusion = gd.make_cosine_diffusion(config.num_diffusion_steps)
        sampler = gd.make_cosine_diffusion(config.num_diffusion_steps, config.num_sampling_steps)
        num_epochs = config.optim_ne
        if config.lr_schedule == "step":
            lr = step_lr_schedule(config.optim_lr, steps, config.warmup_epochs,
                                  config.lr_decay_epochs, config.lr_decay_rate, config.reference_lr_quirks)
        else:
            lr = cosine_lr_schedule(config.optim_lr, config.min_lr, steps,
                                    config.warmup_epochs, num_epochs)
        b2 = None if config.beta2_min is None else beta2_schedule(
            config.beta2_min, config.adam_beta2, num_epochs * steps)
        optimizer = make_optimizer(config, lr, b2=b2,
                                   decay_mask=decay_mask_of(params, config.projector_weight_decay),
                                   frozen_mask=frozen_mask_of(params, config.unsupervised))
        loss_fn = make_stage2_loss_fn(student, teacher, head, diffusion, config)
        eval_fn = make_stage2_eval_fn(student, teacher, head, sampler, config)

    val = dataset.val
    if config.num_val_examples is not None:
        if not isinstance(val, Split):
            raise UserError("num_val_examples applies to on-device sets; a streamed set validates on "
                            "its whole val split")
        val = Split(val.images[:config.num_val_examples], val.labels[:config.num_val_examples])

    def export(state, val_metrics):  # the selected state (best validation accuracy by default)
        return export_gendd(config, student, teacher_sidecar, state.params, state.model_state,
                            classifier, head, val_metrics.get("epoch", num_epochs))

    return Run(state=TrainState.create(params, optimizer, model_state), loss_fn=loss_fn,
               eval_fn=eval_fn, optimizer=optimizer, lr_schedule=lr, frozen=frozen,
               select_metric=config.select_metric, num_epochs=num_epochs, val=val, export=export)


def sweeps(options: dict, settings: dict) -> list:
    """evaluate.py's sweeps of a GenDD student: quality against the respaced sampling steps and
    against the guidance scale. `settings` may replace the lists: sampling_steps, cfg_scales."""
    unknown = set(settings) - {"sampling_steps", "cfg_scales"}
    if unknown:
        raise UserError(f"GenDD sweeps take sampling_steps, cfg_scales; got {', '.join(sorted(unknown))}")
    steps = settings.get("sampling_steps", [5, 10, 25, 50])
    scales = settings.get("cfg_scales", [1.0, 1.5, 2.0, 3.0])
    return [Sweep("sampling steps", "sampling steps",
                  tuple((s, {"num_sampling_steps": s}) for s in steps)),
            Sweep("guidance", "cfg_scale", tuple((c, {"cfg_scale": c}) for c in scales))]


METHOD = register(Method(name="gendd", config_class=GenDDConfig, build=build,
                         load_predictor=load_predictor, export_kinds=(KIND,),
                         config_files=("distillation/gendd_*",), sweeps=sweeps))
main = train_main(METHOD)

if __name__ == "__main__":
    main()
