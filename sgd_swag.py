"""MultiSWAG teachers: one SGD + SWAG run (spec §3). Run it with several seeds for MultiSWAG.

    python sgd_swag.py --config config/teacher/fmnist_frnrelu_sgd_swag.yaml --seed 1 \
        --save checkpoints_teacher/fmnist/seed1

Schedule in optimizer steps k (S steps per epoch): linear warm-up 0 → optim_lr until
start_decay_epoch·S, cosine optim_lr → optim_swa_lr until start_swa_epoch·S, then constant
optim_swa_lr while SWAG collects the parameters after every `freq`-th update. No augmentation.
Each epoch validates the SWA mean and a `num_swag_samples`-member SWAG ensemble. The run ends by
exporting `<save>/model/`: the SWAG moments and a sidecar (architecture, data, seed, metrics) that
`utils/teachers.py` loads. `swag: false` trains a plain cross-entropy network instead (exported as
a `resnet`), e.g. a GenDD teacher.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import optax

from data.augment import eval_images
from models.resnet import resnet_from_config, resnet_spec
from models.swag import find_swag_state, swag, swag_std
from utils.checkpoints import resnet_export
from utils.config import CommonConfig
from utils.driver import train_main
from utils.errors import UserError
from utils.method import Method, Run, register
from utils.optim import make_optimizer
from utils.teachers import TEACHER_KIND, ensemble_logits, members_from_runs, teacher_predictor
from utils.trainer import (TrainState, init_variables, masked_mean, prediction_metrics,
                           steps_per_epoch)


@dataclasses.dataclass
class SwagConfig(CommonConfig):
    seed: int = 2023
    start_decay_epoch: int = 10  # end of the linear warm-up
    start_swa_epoch: int = 800  # end of the cosine, start of SWAG collection
    optim_swa_lr: float = 0.01  # constant learning rate while SWAG moments are collected
    swag: bool = True  # false: a plain cross-entropy network (no moments collected)
    freq: int = 1  # collect every freq-th update
    rank: int = 1  # < 2: diagonal SWAG (as the reference's rank 1); >= 2 also keeps deviations
    num_swag_samples: int = 3  # members of the in-script validation ensemble
    # select_metric null: the teacher is the run's last state (its SWAG moments)

    def validate(self):
        super().validate()
        if self.optim != "sgd":
            raise UserError(f"sgd_swag.py trains with optim sgd, got {self.optim!r}")
        if not 0 <= self.start_decay_epoch <= self.start_swa_epoch <= self.optim_ne:
            raise UserError("need 0 <= start_decay_epoch <= start_swa_epoch <= optim_ne, got "
                            f"{self.start_decay_epoch}, {self.start_swa_epoch}, {self.optim_ne}")
        if self.swag and (self.model_style.upper().startswith("BN") or self.model_arch):
            raise UserError("SWAG moments carry no BatchNorm statistics: use an FRN model_style "
                            "with swag: true, or swag: false for a BatchNorm network (every "
                            "model_arch of the zoo)")
        if self.freq < 1 or self.num_swag_samples < 1:
            raise UserError("freq and num_swag_samples must be >= 1")
        if self.optim_swa_lr <= 0:
            raise UserError(f"config key optim_swa_lr must be > 0, got {self.optim_swa_lr}")


def learning_rate_schedule(config: SwagConfig, steps_per_epoch: int):
    warmup_steps = config.start_decay_epoch * steps_per_epoch
    cosine_steps = (config.start_swa_epoch - config.start_decay_epoch) * steps_per_epoch
    floor = config.optim_swa_lr / config.optim_lr
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.optim_lr, max(warmup_steps, 1)),
         optax.cosine_decay_schedule(config.optim_lr, max(cosine_steps, 1), alpha=floor),
         optax.constant_schedule(config.optim_swa_lr)],
        boundaries=[warmup_steps, warmup_steps + cosine_steps])


def swag_optimizer(config: SwagConfig, schedule, steps_per_epoch: int):
    """SGD (L2 on the gradient, momentum: utils.optim) followed by SWAG's moment collection."""
    sgd = make_optimizer(config, schedule)
    if not config.swag:
        return sgd
    return optax.chain(sgd, swag(config.start_swa_epoch * steps_per_epoch, config.freq,
                                 rank=config.rank if config.rank >= 2 else 0))


def make_loss_fn(model):
    def loss_fn(params, model_state, frozen, batch, key):
        images = eval_images(batch["images"])  # teachers train without augmentation
        logits, updates = model.apply({"params": params, **model_state}, images, train=True,
                                      mutable=list(model_state))
        per_example = prediction_metrics(jax.nn.log_softmax(logits), batch["labels"])
        metrics = {name: masked_mean(value, batch["mask"]) for name, value in per_example.items()}
        return metrics["nll"], (dict(updates), metrics)

    return loss_fn


def make_eval_fn(model, config: SwagConfig):
    """The SWAG ensemble (mean of probabilities) and the SWA mean, once SWAG has collected;
    before that (or with swag: false) the live weights, reported under the same names."""

    def live(state, images, key):
        log_probs = jax.nn.log_softmax(model.apply({"params": state.params, **state.model_state}, images))
        return log_probs, log_probs

    def swag_ensemble(state, images, key):
        swag_state = find_swag_state(state.opt_state)
        moments = {"mean": swag_state.mean, "std": swag_std(swag_state.mean, swag_state.params2)}
        if config.rank >= 2:  # sampled as the exported teacher is: diagonal plus low rank
            moments["deviations"] = swag_state.deviations
        moments = jax.tree.map(lambda x: x[None], moments)
        members = members_from_runs(key, moments, jnp.zeros(config.num_swag_samples, jnp.int32))
        member_log_probs = jax.nn.log_softmax(ensemble_logits(model, members, images))
        ensemble = jax.nn.logsumexp(member_log_probs, 0) - jnp.log(config.num_swag_samples)
        swa = jax.nn.log_softmax(model.apply({"params": swag_state.mean}, images))
        return ensemble, swa

    def eval_fn(state, frozen, batch, key):
        images = eval_images(batch["images"])
        if config.swag:
            # lax.cond runs one branch: no ensemble forwards before SWAG has any snapshot.
            started = find_swag_state(state.opt_state).num_snapshots > 0
            ensemble, swa = jax.lax.cond(started, swag_ensemble, live, state, images, key)
        else:
            ensemble, swa = live(state, images, key)
        return {**prediction_metrics(ensemble, batch["labels"]),
                **prediction_metrics(swa, batch["labels"], "swa_")}

    return eval_fn


def export_teacher(model, config: SwagConfig, state):
    """(arrays, sidecar): the SWAG moments (kind swag_teacher; utils/teachers.py loads them), or
    with swag: false the network itself (kind resnet)."""
    if not config.swag:
        return resnet_export(model, state.params, state.model_state)
    swag_state = find_swag_state(state.opt_state)
    arrays = {"mean": swag_state.mean, "params2": swag_state.params2}
    if config.rank >= 2:
        arrays["deviations"] = swag_state.deviations
    return arrays, {"kind": TEACHER_KIND, "model": resnet_spec(model),
                    "num_classes": model.num_classes, "num_snapshots": int(swag_state.num_snapshots)}


def build(config: SwagConfig, dataset) -> Run:
    model = resnet_from_config(config, dataset.num_classes, dataset.pixel_mean, dataset.pixel_std,
                               dtype=jnp.dtype(config.dtype))
    params, model_state = init_variables(model, jax.random.PRNGKey(config.seed), dataset.train.images)
    steps = steps_per_epoch(len(dataset.train), config.optim_bs)
    schedule = learning_rate_schedule(config, steps)
    optimizer = swag_optimizer(config, schedule, steps)
    # Test-set numbers come from evaluate.py (or --test_table true); the sidecar records the
    # selected (by default the last) state's validation scores.
    return Run(state=TrainState.create(params, optimizer, model_state),
               loss_fn=make_loss_fn(model), eval_fn=make_eval_fn(model, config),
               optimizer=optimizer, lr_schedule=schedule, select_metric=config.select_metric,
               export=lambda state, val: export_teacher(model, config, state))


def load_predictor(model_dir, samples_per_run: int = 3, seed: int = 0):
    """Predict with one teacher run (its `model/` export): S SWAG samples."""
    return teacher_predictor(os.path.dirname(os.path.abspath(model_dir)), samples_per_run, seed)


METHOD = register(Method(name="sgd_swag", config_class=SwagConfig, build=build,
                         load_predictor=load_predictor, export_kinds=(TEACHER_KIND,),
                         config_files=("teacher/*",)))
main = train_main(METHOD)

if __name__ == "__main__":
    main()
