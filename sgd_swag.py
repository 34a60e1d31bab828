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

from data.datasets import load_dataset
from models.resnet import resnet_from_config, resnet_spec
from models.swag import find_swag_state, swag, swag_std
from utils.checkpoints import save_export
from utils.config import CommonConfig, parse_config, prepare_run_dir
from utils.errors import UserError, cli_main
from utils.teachers import TEACHER_KIND, ensemble_logits, members_from_runs, teacher_predictor
from utils.trainer import Trainer, TrainState, masked_mean


@dataclasses.dataclass
class SwagConfig(CommonConfig):
    seed: int = 2023
    optim: str = "sgd"
    optim_lr: float = 0.1
    optim_momentum: float = 0.9
    optim_weight_decay: float = 5e-4
    start_decay_epoch: int = 10  # end of the linear warm-up
    start_swa_epoch: int = 800  # end of the cosine, start of SWAG collection
    optim_swa_lr: float = 0.01
    swag: bool = True  # false: a plain cross-entropy network (no moments collected)
    freq: int = 1  # collect every freq-th update
    rank: int = 1  # < 2: diagonal SWAG (as the reference's rank 1); >= 2 also keeps deviations
    num_swag_samples: int = 3  # members of the in-script validation ensemble

    def validate(self):
        super().validate()
        if self.optim != "sgd":
            raise UserError(f"sgd_swag.py trains with optim sgd, got {self.optim!r}")
        if not 0 <= self.start_decay_epoch <= self.start_swa_epoch <= self.optim_ne:
            raise UserError("need 0 <= start_decay_epoch <= start_swa_epoch <= optim_ne, got "
                            f"{self.start_decay_epoch}, {self.start_swa_epoch}, {self.optim_ne}")
        if self.swag and self.model_style.upper().startswith("BN"):
            raise UserError("SWAG moments carry no BatchNorm statistics: use an FRN model_style "
                            "with swag: true, or swag: false for a BatchNorm network")
        if self.freq < 1 or self.num_swag_samples < 1:
            raise UserError("freq and num_swag_samples must be >= 1")


def learning_rate_schedule(config: SwagConfig, steps_per_epoch: int):
    warmup_steps = config.start_decay_epoch * steps_per_epoch
    cosine_steps = (config.start_swa_epoch - config.start_decay_epoch) * steps_per_epoch
    floor = config.optim_swa_lr / config.optim_lr
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.optim_lr, max(warmup_steps, 1)),
         optax.cosine_decay_schedule(config.optim_lr, max(cosine_steps, 1), alpha=floor),
         optax.constant_schedule(config.optim_swa_lr)],
        boundaries=[warmup_steps, warmup_steps + cosine_steps])


def make_optimizer(config: SwagConfig, schedule, steps_per_epoch: int):
    # Weight decay is L2 added to the gradient of every parameter, before momentum (reference).
    parts = [optax.add_decayed_weights(config.optim_weight_decay),
             optax.sgd(schedule, momentum=config.optim_momentum)]
    if config.swag:
        parts.append(swag(config.start_swa_epoch * steps_per_epoch, config.freq,
                          rank=config.rank if config.rank >= 2 else 0))
    return optax.chain(*parts)


def make_loss_fn(model):
    def loss_fn(params, model_state, frozen, batch, key):
        images = batch["images"].astype(jnp.float32) / 255.0  # teachers train without augmentation
        logits, updates = model.apply({"params": params, **model_state}, images, train=True,
                                      mutable=list(model_state))
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][:, None], 1)[:, 0]
        acc = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        metrics = {"nll": masked_mean(nll, batch["mask"]), "acc": masked_mean(acc, batch["mask"])}
        return metrics["nll"], (dict(updates), metrics)

    return loss_fn


def prediction_metrics(log_probs, labels):
    return {"acc": (jnp.argmax(log_probs, -1) == labels).astype(jnp.float32),
            "nll": -jnp.take_along_axis(log_probs, labels[:, None], 1)[:, 0]}


def make_eval_fn(model, config: SwagConfig):
    """The SWAG ensemble (mean of probabilities) and the SWA mean, once SWAG has collected;
    before that (or with swag: false) the live weights, reported under the same names."""

    def live(state, images, key):
        log_probs = jax.nn.log_softmax(model.apply({"params": state.params, **state.model_state}, images))
        return log_probs, log_probs

    def swag_ensemble(state, images, key):
        swag_state = find_swag_state(state.opt_state)
        moments = jax.tree.map(lambda x: x[None], {
            "mean": swag_state.mean, "std": swag_std(swag_state.mean, swag_state.params2)})
        members = members_from_runs(key, moments, jnp.zeros(config.num_swag_samples, jnp.int32))
        member_log_probs = jax.nn.log_softmax(ensemble_logits(model, members, images))
        ensemble = jax.nn.logsumexp(member_log_probs, 0) - jnp.log(config.num_swag_samples)
        swa = jax.nn.log_softmax(model.apply({"params": swag_state.mean}, images))
        return ensemble, swa

    def eval_fn(state, frozen, batch, key):
        images = batch["images"].astype(jnp.float32) / 255.0
        if config.swag:
            # lax.cond runs one branch: no ensemble forwards before SWAG has any snapshot.
            started = find_swag_state(state.opt_state).num_snapshots > 0
            ensemble, swa = jax.lax.cond(started, swag_ensemble, live, state, images, key)
        else:
            ensemble, swa = live(state, images, key)
        metrics = prediction_metrics(ensemble, batch["labels"])
        metrics.update({f"swa_{k}": v for k, v in prediction_metrics(swa, batch["labels"]).items()})
        return metrics

    return eval_fn


def export_teacher(run_dir, config, model, state, val_metrics):
    sidecar = {"kind": TEACHER_KIND if config.swag else "resnet", "model": resnet_spec(model),
               "data_name": config.data_name, "num_classes": model.num_classes, "seed": config.seed,
               "trained_by": "sgd_swag.py", "val": val_metrics}
    if config.swag:
        swag_state = find_swag_state(state.opt_state)
        sidecar["num_snapshots"] = int(swag_state.num_snapshots)
        arrays = {"mean": swag_state.mean, "params2": swag_state.params2}
        if config.rank >= 2:
            arrays["deviations"] = swag_state.deviations
    else:
        arrays = {"params": state.params, "model_state": state.model_state}
    save_export(os.path.join(run_dir, "model"), arrays, sidecar)


def load_predictor(model_dir, samples_per_run: int = 3, seed: int = 0):
    """Predict with one teacher run (its `model/` export): S SWAG samples."""
    return teacher_predictor(os.path.dirname(os.path.abspath(model_dir)), samples_per_run, seed)


@cli_main
def main(argv):
    config = parse_config(SwagConfig, argv)
    dataset = load_dataset(config.data_name, config.data_root, download=config.download,
                           num_train_examples=config.num_train_examples)
    run_dir = prepare_run_dir(config, "sgd_swag")
    model = resnet_from_config(config, dataset.num_classes, dataset.pixel_mean, dataset.pixel_std,
                               dtype=jnp.dtype(config.dtype))
    variables = jax.jit(model.init)(jax.random.PRNGKey(config.seed), dataset.train.images[:1] / 255.0)
    params, model_state = variables.pop("params"), dict(variables)
    trainer_steps = -(-len(dataset.train.images) // config.optim_bs)
    schedule = learning_rate_schedule(config, trainer_steps)
    optimizer = make_optimizer(config, schedule, trainer_steps)
    trainer = Trainer.for_run(run_dir, config, optimizer=optimizer, lr_schedule=schedule,
                              loss_fn=make_loss_fn(model), eval_fn=make_eval_fn(model, config),
                              select_metric=None)  # the teacher is its last state (SWAG)
    state = trainer.fit(TrainState.create(params, optimizer, model_state), dataset.train, dataset.val)
    # Test-set numbers come from evaluate.py; the sidecar records the final validation scores.
    if not os.path.exists(os.path.join(run_dir, "model")):
        export_teacher(run_dir, config, model, state, trainer.last_val)
    trainer.checkpoints.close()
    print(f"teacher run saved in {run_dir}/model")


if __name__ == "__main__":
    main()
