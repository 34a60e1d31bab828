"""KD and ProxyEnDD students distilled from a MultiSWAG teacher ensemble (spec §4, §5).

    python kd_and_endd.py --config config/distillation/kd_fmnist_frnrelu.yaml --save runs/kd/fmnist
    python kd_and_endd.py --config config/distillation/endd_fmnist_frnrelu.yaml --save runs/endd/fmnist

Each step: the student pipeline (per-image RandAugment, crop, flip, then mixup over the batch;
data/augment.py) makes one batch of mixed images that the teachers and the student both see.
`num_teachers` teacher members are drawn inside the jitted step (utils/teachers.draw_members):
fresh diagonal-SWAG samples, balanced over the runs of `teacher_dir` (each run ⌊M/R⌋ or ⌈M/R⌉
times), all run in one compiled forward under stop_gradient. The teacher moments are passed to
the step as `frozen` arrays, not captured as constants, flattened to one vector per run so that
the SWAG noise of all layers is one RNG call (utils.teachers.sample_teacher_logits).

- baseline_method KD: kd_weight × the per-member KL at temperature dist_temp (× T² for T ≥ 1),
  averaged over members, plus ce_weight × the cross-entropy on the true labels (default 1 and 0:
  the KL alone; CRD's KD recipe is 0.9 and 0.1, RepDistiller's `-r 0.1 -a 0.9`).
- baseline_method ProxyEnDD: a Dirichlet student α = exp(z/T) + s_offset, loss recon − H/β per
  example; `endd_broadcast_bug: true` reproduces the reference's broadcast [Q6]. t_offset is
  accepted and unused, as in the reference [Q5].

Optimizer (utils/optim.make_optimizer): SGD with momentum and L2 added to the gradient.
`lr_schedule: cosine` (default): linear warm-up from warmup_factor·lr over `warmup_steps` optimizer
steps, then a cosine to 0; `step`: lr × lr_decay_rate for every epoch of lr_decay_epochs that the
1-based epoch is past, no warm-up (RepDistiller's adjust_learning_rate).
Losses are masked means over the real rows of a batch (the reference's are unmasked; its
training batches are never padded, so nothing changes there).

Model selection uses the validation split only: the checkpoint with the best `select_metric`
(default val nll; "acc"/"ens_acc" are maximised). This replaces the reference's rule "acc ≥ best
OR nll ≤ best" [Q4], which can move to a checkpoint that is worse on one of the two.

ProxyEnDD predictions: the point prediction is the Dirichlet mean α/α₀ (val acc/nll); ensemble
metrics use `num_ensembles` Dirichlet samples p ~ Dir(α), given as member "logits" log p
(clipped at −100). The reference evaluated softmax(z) [Q12]; that is logged as softmax_acc/nll.

The best student is exported to `<run>/model/`: KD as a "resnet" (utils.checkpoints.save_resnet,
which EDFM loads as its frozen backbone with load_resnet), ProxyEnDD as a "proxy_endd" (the same
ResNet arrays and spec plus s_offset and dist_temp). `load_predictor` reads both.
"""
import dataclasses
import math
from typing import List, Optional

import jax
import jax.numpy as jnp

from data.augment import configured_pipeline, eval_images
from models import losses
from models.resnet import resnet_from_config, resnet_from_spec
from utils.checkpoints import load_export, load_resnet, read_sidecar, resnet_export
from utils.config import StudentConfig
from utils.driver import load_teachers_checked, train_main
from utils.errors import UserError
from utils.method import Method, Run, register
from utils.predict import Predictor, count_params, resnet_predictor
from utils.optim import make_optimizer, step_lr_schedule, warmup_cosine
from utils.teachers import sample_teacher_logits
from utils.trainer import (TrainState, init_variables, masked_mean, prediction_metrics,
                           steps_per_epoch)

METHODS = ("KD", "ProxyEnDD")
PROXY_ENDD_KIND = "proxy_endd"


@dataclasses.dataclass
class DistillConfig(StudentConfig):
    baseline_method: str = "KD"  # KD | ProxyEnDD
    num_teachers: int = 30  # teacher members (SWAG samples) per step, balanced over the runs
    optim_lr: float = 0.1
    optim_weight_decay: float = 1e-3
    warmup_factor: float = 0.01  # the warm-up's starting fraction of optim_lr
    warmup_steps: int = 0  # optimizer steps, not epochs (as the reference)
    lr_schedule: str = "cosine"  # cosine (warm-up, then a cosine to 0) | step (CRD's, no warm-up)
    lr_decay_epochs: List[int] = dataclasses.field(  # step: lr × lr_decay_rate after each of these
        default_factory=lambda: [150, 180, 210])  # 1-based epochs (from epoch 151 on, ...)
    lr_decay_rate: float = 0.1  # step schedule factor
    dist_temp: float = 1.0  # temperature T of the distillation loss
    kd_weight: float = 1.0  # KD: weight of the KL term (CRD: 0.9)
    ce_weight: float = 0.0  # KD: weight of the cross-entropy on the true labels (CRD: 0.1)
    s_offset: float = 1.0  # ProxyEnDD: α = exp(z/T) + s_offset
    t_offset: float = 1.0  # ProxyEnDD: accepted and unused, as in the reference [Q5]
    eps: float = 1e-8  # ProxyEnDD: added inside every lnΓ and ψ
    endd_broadcast_bug: bool = False  # ProxyEnDD: reproduce the reference's [Q6] broadcast
    num_ensembles: int = 8  # ProxyEnDD: Dirichlet samples for the validation ensemble metrics
    select_metric: Optional[str] = "nll"

    UNUSED = ("t_offset",)

    def validate(self):
        super().validate()
        if self.baseline_method not in METHODS:
            raise UserError(f"baseline_method must be KD or ProxyEnDD, got {self.baseline_method!r}")
        checks = [("num_teachers", self.num_teachers >= 1, ">= 1"),
                  ("warmup_factor", 0 <= self.warmup_factor <= 1, "in [0, 1]"),
                  ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                  ("lr_schedule", self.lr_schedule in ("cosine", "step"), "cosine or step"),
                  ("lr_decay_rate", self.lr_decay_rate > 0, "> 0"),
                  ("lr_decay_epochs", all(e >= 1 for e in self.lr_decay_epochs), "epochs >= 1"),
                  ("kd_weight", self.kd_weight >= 0, ">= 0"),
                  ("ce_weight", self.ce_weight >= 0, ">= 0"),
                  ("dist_temp", self.dist_temp > 0, "> 0"),
                  ("s_offset", self.s_offset >= 0, ">= 0"),
                  ("eps", self.eps >= 0, ">= 0"),
                  ("num_ensembles", self.num_ensembles >= 1, ">= 1")]
        for key, ok, rule in checks:
            if not ok:
                raise UserError(f"config key {key} must be {rule}, got {getattr(self, key)}")
        if self.baseline_method == "ProxyEnDD" and (self.ce_weight != 0 or self.kd_weight != 1):
            raise UserError(f"ce_weight and kd_weight are KD's loss weights; ProxyEnDD takes "
                            f"ce_weight 0 and kd_weight 1, got {self.ce_weight} and {self.kd_weight}")
        if self.ce_weight and self.mixup_alpha > 0:
            # mixup gives only the dominant label of a mixed image, not its mixed target
            raise UserError(f"ce_weight > 0 needs the true labels: set mixup_alpha 0 "
                            f"(now {self.mixup_alpha})")
        if self.lr_schedule == "step" and self.warmup_steps:
            raise UserError(f"lr_schedule step has no warm-up (CRD's has none): set warmup_steps 0 "
                            f"(now {self.warmup_steps})")


def kd_objective(logits, teacher_logits, labels, mask, config: DistillConfig):
    """kd_weight · KL(p_T^τ ‖ p_S^τ)·τ² averaged over the members, plus ce_weight · CE on the
    labels, both masked means over the batch: at one member, CRD's γ·CE + α·loss_div."""
    loss = config.kd_weight * losses.kd_loss(logits, teacher_logits, config.dist_temp, mask=mask)
    if config.ce_weight:  # a Python branch: the default graph (KL alone) stays as it was
        log_probs = jax.nn.log_softmax(logits)
        cross_entropy = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
        loss = loss + config.ce_weight * masked_mean(cross_entropy, mask)
    return loss


def learning_rate_schedule(config: DistillConfig, steps: int):
    """The step-indexed LR of `lr_schedule`, `steps` optimizer steps per epoch."""
    if config.lr_schedule == "step":
        return step_lr_schedule(config.optim_lr, steps, 0, config.lr_decay_epochs,
                                config.lr_decay_rate)
    return warmup_cosine(config.optim_lr, config.optim_ne * steps, config.warmup_steps,
                         config.warmup_factor)


def make_loss_fn(model, teacher_model, config: DistillConfig):
    """`frozen["teachers"]` holds the stacked teacher moments (utils.teachers)."""
    temperature = config.dist_temp

    def loss_fn(params, model_state, frozen, batch, key):
        augment_key, teacher_key = jax.random.split(key)
        images, labels = configured_pipeline(augment_key, batch, config)
        teacher_logits = sample_teacher_logits(teacher_model, frozen["teachers"], teacher_key,
                                               images, config.num_teachers)
        logits, updates = model.apply({"params": params, **model_state}, images, train=True,
                                      mutable=list(model_state))
        mask = batch["mask"]
        if config.baseline_method == "KD":
            loss = kd_objective(logits, teacher_logits, labels, mask, config)
            log_probs = jax.nn.log_softmax(logits)
        else:
            loss = losses.proxy_endd_loss(logits, teacher_logits, temperature=temperature,
                                          s_offset=config.s_offset, eps=config.eps,
                                          broadcast_bug=config.endd_broadcast_bug, mask=mask)
            log_probs = losses.dirichlet_mean_log_probs(logits, temperature, config.s_offset)
        teacher_log_probs = (jax.nn.logsumexp(jax.nn.log_softmax(teacher_logits), 0)
                             - math.log(config.num_teachers))
        # Against mixup's dominant labels, as the reference logs them.
        per_example = {**prediction_metrics(log_probs, labels),
                       **prediction_metrics(teacher_log_probs, labels, "teacher_")}
        metrics = {name: masked_mean(value, mask) for name, value in per_example.items()}
        return loss, (dict(updates), metrics)

    return loss_fn


def proxy_endd_outputs(logits, key, num_samples: int, temperature: float, s_offset: float):
    """(log Dirichlet mean [B, K], log p of num_samples Dirichlet draws [B, S, K])."""
    mean = losses.dirichlet_mean_log_probs(logits, temperature, s_offset)
    samples = losses.dirichlet_sample_log_probs(key, logits, num_samples, temperature, s_offset)
    return mean, jnp.moveaxis(samples, 0, 1)


def make_eval_fn(model, config: DistillConfig):
    def eval_fn(state, frozen, batch, key):
        logits = model.apply({"params": state.params, **state.model_state},
                             eval_images(batch["images"]))
        labels = batch["labels"]
        if config.baseline_method == "KD":
            return prediction_metrics(jax.nn.log_softmax(logits), labels)
        mean, samples = proxy_endd_outputs(logits, key, config.num_ensembles, config.dist_temp,
                                           config.s_offset)
        ensemble = jax.nn.logsumexp(samples, 1) - math.log(config.num_ensembles)
        return {**prediction_metrics(mean, labels),
                **prediction_metrics(ensemble, labels, "ens_"),
                **prediction_metrics(jax.nn.log_softmax(logits), labels, "softmax_")}

    return eval_fn


def export_student(model, config: DistillConfig, state):
    """(arrays, sidecar): KD as a "resnet" (EDFM's backbone, load_resnet), ProxyEnDD as a
    "proxy_endd" (the same arrays plus s_offset and dist_temp)."""
    arrays, sidecar = resnet_export(model, jax.device_get(state.params),
                                    jax.device_get(state.model_state))
    sidecar.update({"method": config.baseline_method, "teacher_dir": config.teacher_dir,
                    "num_teachers": config.num_teachers, "select_metric": config.select_metric})
    if config.baseline_method == "ProxyEnDD":
        sidecar.update({"kind": PROXY_ENDD_KIND, "s_offset": config.s_offset,
                        "dist_temp": config.dist_temp})
    return arrays, sidecar


def build(config: DistillConfig, dataset) -> Run:
    teachers = load_teachers_checked(config, dataset)
    model = resnet_from_config(config, dataset.num_classes, dataset.pixel_mean, dataset.pixel_std,
                               dtype=jnp.dtype(config.dtype))
    params, model_state = init_variables(model, jax.random.PRNGKey(config.seed), dataset.image_shape)
    steps = steps_per_epoch(len(dataset.train), config.optim_bs)
    schedule = learning_rate_schedule(config, steps)
    optimizer = make_optimizer(config, schedule)
    return Run(state=TrainState.create(params, optimizer, model_state),
               loss_fn=make_loss_fn(model, teachers.model, config),
               eval_fn=make_eval_fn(model, config), optimizer=optimizer, lr_schedule=schedule,
               frozen={"teachers": teachers.moments}, select_metric=config.select_metric,
               export=lambda state, val: export_student(model, config, state))


# ---------------------------------------------------------------------------- prediction


def load_predictor(model_dir, num_members: int = 8, seed: int = 0, dirichlet_mean: bool = False,
                   softmax_logits: bool = False):
    """A Predictor for a "resnet" export (KD student, or any plain cross-entropy network):
    M = 1, the softmax logits; or for a "proxy_endd" export: M = `num_members` Dirichlet
    samples p ~ Dir(α) per input as member logits log p (default 8; the key comes from
    utils.predict), or M = 1, log(α/α₀), with dirichlet_mean=True, or M = 1, the network's
    logits z themselves (softmax(z), what the reference reports and selects on) with
    softmax_logits=True. `seed` is unused (the sampling key is the one utils.predict.predict
    passes)."""
    del seed
    kind = read_sidecar(model_dir).get("kind")
    if kind == "resnet":
        model, variables, sidecar = load_resnet(model_dir)
        return resnet_predictor(model, variables, sidecar, sidecar.get("method", "ResNet"))
    if kind != PROXY_ENDD_KIND:
        raise UserError(f"{model_dir} holds a {kind!r}; kd_and_endd.py predicts with 'resnet' or "
                        f"'{PROXY_ENDD_KIND}' exports")
    if num_members < 1:
        raise UserError(f"num_members must be >= 1, got {num_members}")
    arrays, sidecar = load_export(model_dir, kind=PROXY_ENDD_KIND)
    model = resnet_from_spec(sidecar["model"])
    variables = {"params": arrays["params"], **arrays.get("model_state", {})}
    temperature, s_offset = float(sidecar["dist_temp"]), float(sidecar["s_offset"])

    if dirichlet_mean and softmax_logits:
        raise UserError("choose one of dirichlet_mean and softmax_logits")

    def member_logits(args, images, key):
        logits = model.apply(args, images)
        if softmax_logits:
            return logits[:, None, :]
        if dirichlet_mean:
            return losses.dirichlet_mean_log_probs(logits, temperature, s_offset)[:, None, :]
        return proxy_endd_outputs(logits, key, num_members, temperature, s_offset)[1]

    members = 1 if dirichlet_mean or softmax_logits else num_members
    name = ("ProxyEnDD (mean)" if dirichlet_mean else "ProxyEnDD (softmax z)" if softmax_logits
            else f"ProxyEnDD ({members})")
    return Predictor(name=name,
                     kind=kind, member_logits=member_logits, args=variables, num_members=members,
                     num_params=count_params(variables["params"]), sidecar=sidecar)


METHOD = register(Method(name="kd_and_endd", config_class=DistillConfig, build=build,
                         load_predictor=load_predictor, export_kinds=("resnet", PROXY_ENDD_KIND),
                         config_files=("distillation/kd_*", "distillation/endd_*")))
main = train_main(METHOD)

if __name__ == "__main__":
    main()
