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

- baseline_method KD: the per-member KL at temperature dist_temp, averaged over members.
- baseline_method ProxyEnDD: a Dirichlet student α = exp(z/T) + s_offset, loss recon − H/β per
  example; `endd_broadcast_bug: true` reproduces the reference's broadcast [Q6]. t_offset is
  accepted and unused, as in the reference [Q5].

Optimizer: SGD with momentum and L2 added to the gradient (utils/optim.sgd_l2), linear warm-up
from warmup_factor·lr over `warmup_steps` optimizer steps, then a cosine to 0 (warmup_cosine).
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
import os
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from data.augment import configured_pipeline
from data.datasets import load_dataset
from models import losses
from models.resnet import resnet_from_config, resnet_from_spec, resnet_spec
from utils.checkpoints import load_export, load_resnet, read_sidecar, save_export, save_resnet
from utils.config import StudentConfig, parse_config, prepare_run_dir
from utils.errors import UserError, cli_main
from utils.optim import sgd_l2, warmup_cosine
from utils.teachers import load_teachers, sample_teacher_logits
from utils.trainer import Trainer, TrainState, masked_mean

METHODS = ("KD", "ProxyEnDD")
PROXY_ENDD_KIND = "proxy_endd"
SELECT_METRICS = {"KD": ("nll", "acc"),
                  "ProxyEnDD": ("nll", "acc", "ens_nll", "ens_acc", "softmax_nll", "softmax_acc")}


@dataclasses.dataclass
class DistillConfig(StudentConfig):
    baseline_method: str = "KD"  # KD | ProxyEnDD
    seed: int = 2025
    teacher_dir: str = "checkpoints_teacher/fmnist"
    num_teachers: int = 30  # teacher members (SWAG samples) per step, balanced over the runs
    num_classes: Optional[int] = None  # taken from the data set; if given, it must match
    optim: str = "sgd"  # sgd (the reference) | adam (AdamW with optim_weight_decay)
    optim_lr: float = 0.1
    optim_momentum: float = 0.9
    optim_weight_decay: float = 1e-3
    warmup_factor: float = 0.01
    warmup_steps: int = 0  # optimizer steps, not epochs (as the reference)
    dist_temp: float = 1.0
    s_offset: float = 1.0  # ProxyEnDD: α = exp(z/T) + s_offset
    t_offset: float = 1.0  # ProxyEnDD: accepted and unused, as in the reference [Q5]
    eps: float = 1e-8  # ProxyEnDD: added inside every lnΓ and ψ
    endd_broadcast_bug: bool = False  # ProxyEnDD: reproduce the reference's [Q6] broadcast
    num_ensembles: int = 8  # ProxyEnDD: Dirichlet samples for the validation ensemble metrics
    select_metric: str = "nll"  # validation metric that picks the exported checkpoint

    def validate(self):
        super().validate()
        if self.baseline_method not in METHODS:
            raise UserError(f"baseline_method must be KD or ProxyEnDD, got {self.baseline_method!r}")
        if self.optim not in ("sgd", "adam"):
            raise UserError(f"optim must be sgd or adam, got {self.optim!r}")
        checks = [("num_teachers", self.num_teachers >= 1, ">= 1"),
                  ("optim_lr", self.optim_lr > 0, "> 0"),
                  ("optim_momentum", 0 <= self.optim_momentum < 1, "in [0, 1)"),
                  ("optim_weight_decay", self.optim_weight_decay >= 0, ">= 0"),
                  ("warmup_factor", 0 <= self.warmup_factor <= 1, "in [0, 1]"),
                  ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                  ("dist_temp", self.dist_temp > 0, "> 0"),
                  ("s_offset", self.s_offset >= 0, ">= 0"),
                  ("eps", self.eps >= 0, ">= 0"),
                  ("num_ensembles", self.num_ensembles >= 1, ">= 1")]
        for key, ok, rule in checks:
            if not ok:
                raise UserError(f"config key {key} must be {rule}, got {getattr(self, key)}")
        if self.num_classes is not None and self.num_classes < 2:
            raise UserError(f"num_classes must be >= 2, got {self.num_classes}")
        allowed = SELECT_METRICS[self.baseline_method]
        if self.select_metric not in allowed:
            raise UserError(f"select_metric for {self.baseline_method} must be one of "
                            f"{', '.join(allowed)}, got {self.select_metric!r}")


def make_optimizer(config, steps_per_epoch: int):
    """(optimizer, its learning-rate schedule) for optim_ne epochs of steps_per_epoch steps."""
    schedule = warmup_cosine(config.optim_lr, config.optim_ne * steps_per_epoch,
                             config.warmup_steps, config.warmup_factor)
    if config.optim == "sgd":
        return sgd_l2(schedule, config.optim_momentum, config.optim_weight_decay), schedule
    if config.optim_weight_decay == 0:
        return optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8), schedule
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=config.optim_weight_decay), schedule


def prediction_metrics(log_probs, labels, prefix: str = ""):
    """Per-example accuracy and NLL of log-probabilities [B, K]."""
    return {f"{prefix}acc": (jnp.argmax(log_probs, -1) == labels).astype(jnp.float32),
            f"{prefix}nll": -jnp.take_along_axis(log_probs, labels[:, None], 1)[:, 0]}


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
            loss = losses.kd_loss(logits, teacher_logits, temperature, mask=mask)
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
        images = batch["images"].astype(jnp.float32) / 255.0
        logits = model.apply({"params": state.params, **state.model_state}, images)
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


def export_student(run_dir, config: DistillConfig, model, state, val_metrics):
    directory = os.path.join(run_dir, "model")
    info = {"method": config.baseline_method, "data_name": config.data_name, "seed": config.seed,
            "trained_by": "kd_and_endd.py", "teacher_dir": config.teacher_dir,
            "num_teachers": config.num_teachers, "select_metric": config.select_metric,
            "val": val_metrics}
    params, model_state = jax.device_get(state.params), jax.device_get(state.model_state)
    if config.baseline_method == "KD":
        save_resnet(directory, model, params, model_state, **info)
    else:
        sidecar = {"kind": PROXY_ENDD_KIND, "model": resnet_spec(model),
                   "num_classes": model.num_classes, "s_offset": config.s_offset,
                   "dist_temp": config.dist_temp, **info}
        save_export(directory, {"params": params, "model_state": model_state}, sidecar)
    return directory


def load_data_and_teachers(config):
    dataset = load_dataset(config.data_name, config.data_root, download=config.download,
                           num_train_examples=config.num_train_examples)
    if config.num_classes is not None and config.num_classes != dataset.num_classes:
        raise UserError(f"num_classes is {config.num_classes} but {dataset.name} has "
                        f"{dataset.num_classes} classes")
    teachers = load_teachers(config.teacher_dir, dataset.name, dtype=jnp.dtype(config.dtype))
    if teachers.num_classes != dataset.num_classes:
        raise UserError(f"the teachers in {config.teacher_dir} predict {teachers.num_classes} "
                        f"classes, {dataset.name} has {dataset.num_classes}")
    if config.num_teachers % teachers.num_runs:
        print(f"note: {config.num_teachers} teacher members over {teachers.num_runs} runs: "
              f"some runs get one member more each step (drawn at random per step)")
    return dataset, teachers


@cli_main
def main(argv):
    config = parse_config(DistillConfig, argv)
    dataset, teachers = load_data_and_teachers(config)
    run_dir = prepare_run_dir(config, "kd_and_endd")
    model = resnet_from_config(config, dataset.num_classes, dataset.pixel_mean, dataset.pixel_std,
                               dtype=jnp.dtype(config.dtype))
    variables = jax.jit(model.init)(jax.random.PRNGKey(config.seed), dataset.train.images[:1] / 255.0)
    params, model_state = variables.pop("params"), dict(variables)
    steps_per_epoch = -(-len(dataset.train.images) // config.optim_bs)
    optimizer, schedule = make_optimizer(config, steps_per_epoch)
    trainer = Trainer.for_run(run_dir, config, optimizer=optimizer, lr_schedule=schedule,
                              loss_fn=make_loss_fn(model, teachers.model, config),
                              eval_fn=make_eval_fn(model, config),
                              select_metric=config.select_metric)
    state = trainer.fit(TrainState.create(params, optimizer, model_state), dataset.train,
                        dataset.val, frozen={"teachers": teachers.moments})
    if not os.path.exists(os.path.join(run_dir, "model")):
        best, val = trainer.selected(state)
        export_student(run_dir, config, model, best, val)
        print(f"best validation {config.select_metric} = {val.get(config.select_metric)} "
              f"(epoch {val.get('epoch')})")
    trainer.checkpoints.close()
    print(f"{config.baseline_method} student saved in {run_dir}/model")


# ---------------------------------------------------------------------------- prediction


def load_predictor(model_dir, num_members: int = 8, seed: int = 0, dirichlet_mean: bool = False):
    """A Predictor for a "resnet" export (KD student, or any plain cross-entropy network):
    M = 1, the softmax logits; or for a "proxy_endd" export: M = `num_members` Dirichlet
    samples p ~ Dir(α) per input as member logits log p (default 8; the key comes from
    utils.predict), or M = 1, log(α/α₀), with dirichlet_mean=True. `seed` is unused (the
    sampling key is the one utils.predict.predict passes)."""
    from utils.predict import Predictor, count_params

    del seed
    kind = read_sidecar(model_dir).get("kind")
    if kind == "resnet":
        model, variables, sidecar = load_resnet(model_dir)

        def member_logits(args, images, key):
            return model.apply(args, images)[:, None, :]

        return Predictor(name=sidecar.get("method", "ResNet"), kind=kind, member_logits=member_logits,
                         args=variables, num_members=1, num_params=count_params(variables["params"]),
                         sidecar=sidecar)
    if kind != PROXY_ENDD_KIND:
        raise UserError(f"{model_dir} holds a {kind!r}; kd_and_endd.py predicts with 'resnet' or "
                        f"'{PROXY_ENDD_KIND}' exports")
    if num_members < 1:
        raise UserError(f"num_members must be >= 1, got {num_members}")
    arrays, sidecar = load_export(model_dir, kind=PROXY_ENDD_KIND)
    model = resnet_from_spec(sidecar["model"])
    variables = {"params": arrays["params"], **arrays.get("model_state", {})}
    temperature, s_offset = float(sidecar["dist_temp"]), float(sidecar["s_offset"])

    def member_logits(args, images, key):
        logits = model.apply(args, images)
        if dirichlet_mean:
            return losses.dirichlet_mean_log_probs(logits, temperature, s_offset)[:, None, :]
        return proxy_endd_outputs(logits, key, num_members, temperature, s_offset)[1]

    members = 1 if dirichlet_mean else num_members
    return Predictor(name=f"ProxyEnDD ({members})" if not dirichlet_mean else "ProxyEnDD (mean)",
                     kind=kind, member_logits=member_logits, args=variables, num_members=members,
                     num_params=count_params(variables["params"]), sidecar=sidecar)


if __name__ == "__main__":
    main()
