"""FED: a noise-injected generator distilled from a MultiSWAG ensemble by MMD (spec §6).

    python fed.py --config config/distillation/fed_fmnist_frnrelu.yaml --save runs/fed/fmnist

The generator is the zoo ResNet with `noise_std` > 0 (models/resnet.py): Gaussian noise is
concatenated to the standardized image and added, with learned scales, before each stage and
after pooling; it draws its noise from the 'noise' rng. Each step:

1. the student pipeline (per-image RandAugment, crop, flip, mixup; data/augment.py) gives one
   batch of mixed images that the teachers and the generator both see;
2. each image is repeated `num_teachers` (M) times, copies adjacent, and every copy gets its own
   noise, giving M student members s_{m,b} = softmax(logits);
3. M teacher members are fresh diagonal-SWAG samples balanced over the runs of `teacher_dir`
   (utils/teachers.sample_teacher_logits: one compiled forward, no gradient), t_{m,b} = softmax;
4. each member is flattened over the batch (S_m, T_m ∈ R^{B·K}) and the loss is the biased
   (V-statistic) squared MMD between {S_m} and {T_m} with the kernel
   k(a, b) = Σ_{h ∈ bandwidth_range} exp(−‖a − b‖²/(2h)) (models/losses.rbf_mmd2).
   Padded rows of a short last batch are zeroed in both sets, so they add no distance.

The generator's noise, the SWAG noise and the augmentation use separate keys (the reference
reused one key for the input noise and the SWAG noise, spec §9.9).

Optimizer: Adam (0.9, 0.999, eps 1e-8; AdamW if optim_weight_decay > 0) with a constant rate
multiplied by each scale of `optim_boundaries_and_scales` (epoch → multiplier) from that epoch on.
Validation uses `num_ensembles` generator samples per image (default 8; the reference used 1,
[Q12]): acc/nll of one sample and ens_acc/ens_nll of the mean of the samples' probabilities;
the exported checkpoint is the best by `select_metric` on validation (default ens_nll), not the
reference's OR rule [Q4]. The export `<run>/model/` has kind "fed".
"""
import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from data.augment import configured_pipeline, eval_images
from models import losses
from models.resnet import resnet_from_config, resnet_from_spec, resnet_spec
from utils.checkpoints import load_export
from utils.config import StudentConfig
from utils.driver import load_teachers_checked, train_main
from utils.errors import UserError
from utils.method import Method, Run, register
from utils.predict import Predictor, count_params
from utils.optim import epoch_piecewise, make_optimizer
from utils.teachers import sample_teacher_logits
from utils.trainer import (TrainState, init_variables, masked_mean, prediction_metrics,
                           steps_per_epoch)

FED_KIND = "fed"


@dataclasses.dataclass
class FedConfig(StudentConfig):
    num_teachers: int = 8  # student copies and teacher SWAG samples per step
    num_ensembles: int = 8  # generator samples per image at validation (the reference: 1)
    optim: str = "adam"  # adam (the reference) | sgd (momentum, L2 added to the gradient)
    optim_bs: int = 64
    optim_ne: int = 250
    optim_lr: float = 1e-3
    optim_weight_decay: float = 0.0
    optim_boundaries_and_scales: dict[int, float] = dataclasses.field(  # {epoch: lr × factor from it}
        default_factory=lambda: {175: 0.33, 225: 0.33, 275: 0.33, 350: 0.33, 400: 0.33})
    noise_std: float = 0.1  # σ of the generator's injected noise
    kernel: str = "rbf"  # MMD kernel: rbf (the reference's only one)
    bandwidth_range: list[float] = dataclasses.field(  # the MMD's RBF bandwidths (kernels summed)
        default_factory=lambda: [2.0, 10.0, 20.0, 50.0])
    select_metric: Optional[str] = "ens_nll"

    def validate(self):
        super().validate()
        if self.kernel != "rbf":
            raise UserError(f"kernel must be rbf, got {self.kernel!r}")
        if self.model_arch is not None:
            raise UserError("fed.py's generator is the noise-injected ResNet of the model_* keys: "
                            "model_arch must be null")
        checks = [("num_teachers", self.num_teachers >= 1, ">= 1"),
                  ("num_ensembles", self.num_ensembles >= 1, ">= 1"),
                  ("noise_std", self.noise_std > 0, "> 0 (the generator needs its noise)")]
        for key, ok, rule in checks:
            if not ok:
                raise UserError(f"config key {key} must be {rule}, got {getattr(self, key)}")
        if not self.bandwidth_range or min(self.bandwidth_range) <= 0:
            raise UserError(f"bandwidth_range must be a non-empty list of positive numbers, "
                            f"got {self.bandwidth_range}")
        for epoch, scale in self.optim_boundaries_and_scales.items():
            if epoch < 0 or scale <= 0:
                raise UserError(f"optim_boundaries_and_scales maps epochs >= 0 to multipliers > 0, "
                                f"got {epoch}: {scale}")


def generator_logits(model, variables, images, key, num_samples: int, train: bool = False):
    """Logits [B, S, K] of S generator samples per image (copies adjacent, own noise each);
    with train=True also the updated model state."""
    batch = images.shape[0]
    copies = jnp.repeat(images, num_samples, axis=0)
    if train:
        logits, updates = model.apply(variables, copies, train=True, rngs={"noise": key},
                                      mutable=[c for c in variables if c != "params"])
    else:
        logits, updates = model.apply(variables, copies, rngs={"noise": key}), None
    return logits.reshape(batch, num_samples, -1), updates


def flatten_members(probs, mask):
    """[M, B, K] -> [M, B·K], padded rows zeroed."""
    probs = probs * mask.astype(probs.dtype)[None, :, None]
    return probs.reshape(probs.shape[0], -1)


def make_loss_fn(model, teacher_model, config: FedConfig):
    """`frozen["teachers"]` holds the stacked teacher moments (utils.teachers)."""
    num_members = config.num_teachers
    bandwidths = tuple(float(h) for h in config.bandwidth_range)

    def loss_fn(params, model_state, frozen, batch, key):
        augment_key, noise_key, teacher_key = jax.random.split(key, 3)
        images, labels = configured_pipeline(augment_key, batch, config)
        logits, updates = generator_logits(model, {"params": params, **model_state}, images,
                                           noise_key, num_members, train=True)
        student_probs = jnp.moveaxis(jax.nn.softmax(logits), 1, 0)  # [M, B, K]
        teacher_logits = sample_teacher_logits(teacher_model, frozen["teachers"], teacher_key,
                                               images, num_members)
        teacher_probs = jax.nn.softmax(teacher_logits)  # [M, B, K]
        mask = batch["mask"]
        loss = losses.rbf_mmd2(flatten_members(student_probs, mask),
                               flatten_members(teacher_probs, mask), bandwidths)
        log_mean = lambda log_probs: jax.nn.logsumexp(log_probs, 0) - math.log(num_members)
        per_example = {
            **prediction_metrics(log_mean(jnp.moveaxis(jax.nn.log_softmax(logits), 1, 0)), labels),
            **prediction_metrics(log_mean(jax.nn.log_softmax(teacher_logits)), labels, "teacher_")}
        metrics = {name: masked_mean(value, mask) for name, value in per_example.items()}
        return loss, (dict(updates), metrics)

    return loss_fn


def make_eval_fn(model, config: FedConfig):
    def eval_fn(state, frozen, batch, key):
        logits, _ = generator_logits(model, {"params": state.params, **state.model_state},
                                     eval_images(batch["images"]), key, config.num_ensembles)
        log_probs = jax.nn.log_softmax(logits)  # [B, S, K]
        ensemble = jax.nn.logsumexp(log_probs, 1) - math.log(config.num_ensembles)
        return {**prediction_metrics(log_probs[:, 0], batch["labels"]),
                **prediction_metrics(ensemble, batch["labels"], "ens_")}

    return eval_fn


def export_generator(model, config: FedConfig, state):
    sidecar = {"kind": FED_KIND, "model": resnet_spec(model), "num_classes": model.num_classes,
               "method": "FED", "teacher_dir": config.teacher_dir,
               "num_teachers": config.num_teachers, "bandwidth_range": list(config.bandwidth_range),
               "select_metric": config.select_metric}
    return {"params": jax.device_get(state.params),
            "model_state": jax.device_get(state.model_state)}, sidecar


def build(config: FedConfig, dataset) -> Run:
    teachers = load_teachers_checked(config, dataset)
    model = resnet_from_config(config, dataset.num_classes, dataset.pixel_mean, dataset.pixel_std,
                               noise_std=config.noise_std, dtype=jnp.dtype(config.dtype))
    params_key, noise_key = jax.random.split(jax.random.PRNGKey(config.seed))
    params, model_state = init_variables(model, {"params": params_key, "noise": noise_key},
                                         dataset.image_shape)
    steps = steps_per_epoch(len(dataset.train), config.optim_bs)
    schedule = epoch_piecewise(config.optim_lr, steps, config.optim_boundaries_and_scales)
    optimizer = make_optimizer(config, schedule)
    return Run(state=TrainState.create(params, optimizer, model_state),
               loss_fn=make_loss_fn(model, teachers.model, config),
               eval_fn=make_eval_fn(model, config), optimizer=optimizer, lr_schedule=schedule,
               frozen={"teachers": teachers.moments}, select_metric=config.select_metric,
               export=lambda state, val: export_generator(model, config, state))


def load_predictor(model_dir, num_members: int = 8, seed: int = 0):
    """A Predictor for a "fed" export: `num_members` generator samples per input (default 8),
    each with its own noise from the key utils.predict passes (`seed` is unused)."""
    del seed
    if num_members < 1:
        raise UserError(f"num_members must be >= 1, got {num_members}")
    arrays, sidecar = load_export(model_dir, kind=FED_KIND)
    model = resnet_from_spec(sidecar["model"])
    variables = {"params": arrays["params"], **arrays.get("model_state", {})}

    def member_logits(args, images, key):
        return generator_logits(model, args, images, key, num_members)[0]

    return Predictor(name=f"FED ({num_members})", kind=FED_KIND, member_logits=member_logits,
                     args=variables, num_members=num_members,
                     num_params=count_params(variables["params"]), sidecar=sidecar)


METHOD = register(Method(name="fed", config_class=FedConfig, build=build,
                         load_predictor=load_predictor, export_kinds=(FED_KIND,),
                         config_files=("distillation/fed_*",)))
main = train_main(METHOD)

if __name__ == "__main__":
    main()
