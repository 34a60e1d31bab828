"""Hydra: one shared body, M light heads, head m distilled from teacher member m (Tran et al., 2020,
"Hydra: Preserving Ensemble Diversity for Model Distillation").

    python hydra.py --config config/distillation/hydra_fmnist_frnrelu.yaml --save runs/hydra/fmnist

The student is a zoo ResNet (the model_* keys) up to its pooled feature, the body, shared by
`num_heads` heads; each head is light: Dense(head_width) -> the body's activation -> Dense(K)
(head_width 0: one Dense). Prediction: the M heads' logits are M members.

Each step, inside the one jitted step:
1. the student pipeline (RandAugment, crop, flip, mixup; data/augment.py) makes x̃, seen by the
   teachers and the student alike;
2. M teacher members, fresh diagonal-SWAG samples, member m from run m mod R: head m always
   learns from the same run (the paper ties each head to one ensemble member; the SWAG noise
   gives it that run's spread);
3. loss = mean over heads and (real) examples of max(T, T²)·KL(teacher_m ‖ head_m) at
   temperature `dist_temp` (models.losses, KD's per-member KL).
Optimizer, schedule and selection are KD's (utils.optim; warm-up then cosine; the validation
metric `select_metric`, default the heads' ensemble NLL). The export has kind "hydra".
Departure from the paper: no first phase training the body with a single head.
"""
import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from data.augment import configured_pipeline, eval_images
from models import losses
from models.resnet import network_name, resnet_from_config, resnet_from_spec, resnet_spec
from utils.checkpoints import load_export
from utils.config import StudentConfig
from utils.driver import load_teachers_checked, train_main
from utils.errors import UserError
from utils.method import Method, Run, register
from utils.optim import make_optimizer, warmup_cosine
from utils.predict import Predictor, count_params
from utils.teachers import sample_teacher_logits
from utils.trainer import (TrainState, init_variables, masked_mean, prediction_metrics,
                           steps_per_epoch)

KIND = "hydra"


@dataclasses.dataclass
class HydraConfig(StudentConfig):
    num_heads: int = 8  # M heads = M teacher members per step (member m from run m mod R)
    head_width: int = 64  # hidden units of each head; 0: a linear head
    optim_lr: float = 0.1
    optim_weight_decay: float = 1e-3
    warmup_factor: float = 0.01  # the warm-up's starting fraction of optim_lr
    warmup_steps: int = 0  # linear warm-up, in optimizer steps
    dist_temp: float = 1.0  # temperature of the teachers' and heads' softmax in the KD loss
    select_metric: Optional[str] = "nll"  # validation metric of the heads' ensemble; single_nll: head 0

    def validate(self):
        super().validate()
        checks = [("num_heads", self.num_heads >= 1, ">= 1"), ("head_width", self.head_width >= 0, ">= 0"),
                  ("warmup_factor", 0 <= self.warmup_factor <= 1, "in [0, 1]"),
                  ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                  ("dist_temp", self.dist_temp > 0, "> 0")]
        for key, ok, rule in checks:
            if not ok:
                raise UserError(f"config key {key} must be {rule}, got {getattr(self, key)}")


class Hydra(nn.Module):
    """A ResNet body and M heads on its pooled feature: logits [B, M, K]."""

    body: nn.Module  # a models.resnet.ResNet; its own classifier is unused
    num_heads: int
    head_width: int

    @nn.compact
    def __call__(self, images, train: bool = False):
        feature = self.body(images, train=train, return_features=True).pooled.astype(jnp.float32)
        heads, classes = self.num_heads, self.body.num_classes
        # The M heads as stacked weights: one einsum per layer for all heads.
        dense = lambda name, fan_in, fan_out: (  # noqa: E731
            self.param(f"{name}_kernel", nn.initializers.lecun_normal(batch_axis=(0,)),
                       (heads, fan_in, fan_out)),
            self.param(f"{name}_bias", nn.initializers.zeros, (heads, fan_out)))
        if self.head_width:
            kernel, bias = dense("hidden", feature.shape[-1], self.head_width)
            hidden = jnp.einsum("bd,mdh->bmh", feature, kernel) + bias
            activation = nn.swish if self.body.activation == "swish" else nn.relu
            kernel, bias = dense("out", self.head_width, classes)
            return jnp.einsum("bmh,mhk->bmk", activation(hidden), kernel) + bias
        kernel, bias = dense("out", feature.shape[-1], classes)
        return jnp.einsum("bd,mdk->bmk", feature, kernel) + bias


def hydra_loss_per_example(head_logits, teacher_logits, temperature: float):
    """Mean over heads of head m's KD loss to teacher member m: head_logits [B, M, K],
    teacher_logits [M, B, K] -> [B]."""
    per_head = jax.vmap(lambda student, teacher: losses.kd_loss_per_example(
        student, teacher[None], temperature), in_axes=(1, 0))(head_logits, teacher_logits)
    return jnp.mean(per_head, axis=0)


def ensemble_metrics(head_logits, labels):
    """Per-example acc/nll of the heads' ensemble (mean of softmaxes) and of head 0."""
    log_probs = jax.nn.log_softmax(head_logits)
    ensemble = jax.nn.logsumexp(log_probs, axis=1) - math.log(head_logits.shape[1])
    return {**prediction_metrics(ensemble, labels),
            **prediction_metrics(log_probs[:, 0], labels, "single_")}


def make_loss_fn(model, teacher_model, config: HydraConfig):
    def loss_fn(params, model_state, frozen, batch, key):
        augment_key, teacher_key = jax.random.split(key)
        images, labels = configured_pipeline(augment_key, batch, config)
        teacher_logits = sample_teacher_logits(teacher_model, frozen["teachers"], teacher_key,
                                               images, config.num_heads, tied_runs=True)
        head_logits, updates = model.apply({"params": params, **model_state}, images, train=True,
                                           mutable=list(model_state))
        loss = masked_mean(hydra_loss_per_example(head_logits, teacher_logits, config.dist_temp),
                           batch["mask"])
        metrics = {name: masked_mean(value, batch["mask"])
                   for name, value in ensemble_metrics(head_logits, labels).items()}
        return loss, (dict(updates), metrics)

    return loss_fn


def make_eval_fn(model):
    def eval_fn(state, frozen, batch, key):
        head_logits = model.apply({"params": state.params, **state.model_state},
                                  eval_images(batch["images"]))
        return ensemble_metrics(head_logits, batch["labels"])

    return eval_fn


def build(config: HydraConfig, dataset) -> Run:
    teachers = load_teachers_checked(config, dataset)
    body = resnet_from_config(config, dataset.num_classes, dataset.pixel_mean, dataset.pixel_std,
                              dtype=jnp.dtype(config.dtype))
    model = Hydra(body, config.num_heads, config.head_width)
    params, model_state = init_variables(model, jax.random.PRNGKey(config.seed), dataset.image_shape)
    steps = steps_per_epoch(len(dataset.train), config.optim_bs)
    schedule = warmup_cosine(config.optim_lr, config.optim_ne * steps, config.warmup_steps,
                             config.warmup_factor)
    optimizer = make_optimizer(config, schedule)

    def export(state, val):
        sidecar = {"kind": KIND, "body": resnet_spec(body), "num_heads": config.num_heads,
                   "head_width": config.head_width, "num_classes": dataset.num_classes,
                   "method": "Hydra", "teacher_dir": config.teacher_dir}
        return {"params": jax.device_get(state.params),
                "model_state": jax.device_get(state.model_state)}, sidecar

    return Run(state=TrainState.create(params, optimizer, model_state),
               loss_fn=make_loss_fn(model, teachers.model, config), eval_fn=make_eval_fn(model),
               optimizer=optimizer, lr_schedule=schedule, frozen={"teachers": teachers.moments},
               select_metric=config.select_metric, export=export,
               summary=f"Hydra: {config.num_heads} heads of width {config.head_width} on a "
                       f"{network_name(body)}; "
                       f"{teachers.num_runs} teacher runs")


def load_predictor(model_dir) -> Predictor:
    """A "hydra" export: its M heads are M members."""
    arrays, sidecar = load_export(model_dir, kind=KIND)
    model = Hydra(resnet_from_spec(sidecar["body"]), sidecar["num_heads"], sidecar["head_width"])
    variables = {"params": arrays["params"], **arrays.get("model_state", {})}

    def member_logits(variables, images, key):
        return model.apply(variables, images)

    used = {k: v for k, v in variables["params"].items()}
    used["body"] = {k: v for k, v in used["body"].items() if k != "classifier"}  # unused
    return Predictor(name=f"Hydra ({model.num_heads})", kind=KIND, member_logits=member_logits,
                     args=variables, num_members=model.num_heads, num_params=count_params(used),
                     sidecar=sidecar)


METHOD = register(Method(name="hydra", config_class=HydraConfig, build=build,
                         load_predictor=load_predictor, export_kinds=(KIND,),
                         config_files=("distillation/hydra_*",)))
main = train_main(METHOD)

if __name__ == "__main__":
    main()
