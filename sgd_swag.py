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

`--num_runs R --save DIR` trains the R runs of seeds seed, ..., seed+R-1 together in one compiled
step into the teacher folder DIR (`DIR/seed<s>/model/`; train_together), with per-epoch
checkpoints and logs in DIR itself (the shared Trainer over the stacked runs); `--resume DIR` continues it.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import optax

from data.augment import eval_images, training_images
from models.resnet import resnet_from_config, resnet_spec
from models.swag import find_swag_state, swag, swag_std
from utils.checkpoints import SIDECAR, RunLock, resnet_export, save_export
from utils.config import CommonConfig, parse_config, prepare_run_dir, save_config
from utils.data_loading import load_data
from utils.driver import out_of_memory, train
from utils.errors import UserError, cli_main
from utils.method import Method, Run, register
from utils.optim import make_optimizer
from utils.teachers import TEACHER_KIND, ensemble_logits, members_from_runs, teacher_predictor
from utils.trainer import (Trainer, TrainState, init_variables, masked_mean, prediction_metrics,
                           run_of, stack_runs, steps_per_epoch)


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
    num_runs: int = 1  # > 1: MultiSWAG, runs of seeds seed, seed+1, ... trained together into <save>/seed<s>/
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
        if self.num_runs < 1:
            raise UserError(f"config key num_runs must be >= 1, got {self.num_runs}")


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
        # Teachers train without augmentation (a streamed batch: whatever its workers applied).
        images = training_images(batch, eval_images)
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
    params, model_state = init_variables(model, jax.random.PRNGKey(config.seed), dataset.image_shape)
    steps = steps_per_epoch(len(dataset.train), config.optim_bs)
    schedule = learning_rate_schedule(config, steps)
    optimizer = swag_optimizer(config, schedule, steps)
    # Test-set numbers come from evaluate.py (or --test_table true); the sidecar records the
    # selected (by default the last) state's validation scores.
    return Run(state=TrainState.create(params, optimizer, model_state),
               loss_fn=make_loss_fn(model), eval_fn=make_eval_fn(model, config),
               optimizer=optimizer, lr_schedule=schedule, select_metric=config.select_metric,
               export=lambda state, val: export_teacher(model, config, state))


def train_together(config: SwagConfig, dataset, num_runs: int, save_dir: str, vectorize=None,
                   mesh=None) -> list:
    """MultiSWAG runs trained together: R = num_runs runs of seeds config.seed, config.seed+1, ...
    (each its own initialisation, data order, step keys and SWAG moments) in one compiled step,
    vmapped over the runs on accelerators (the Trainer over runs; `vectorize`). Each run equals
    the single run of its seed; it is validated every eval_every epochs and after the last, and
    exported to `<save_dir>/seed<s>/model/` exactly as that run would be.

    `save_dir` is the teacher folder and also the job's run directory: `config.yaml`,
    `metrics.jsonl` (one record per epoch, keys `seed<s>/train/<metric>`, `seed<s>/val/<metric>`)
    and `checkpoints/` (the stacked states, leading axis R). Teacher discovery looks only for
    `<save_dir>/*/model/`, so these do not count as runs. Training continues from the latest
    checkpoint (bit for bit as if uninterrupted); a folder whose epochs are all done and whose
    runs are all exported is left untouched. Returns the run directories."""
    seeds = [config.seed + r for r in range(num_runs)]
    configs = [dataclasses.replace(config, seed=seed) for seed in seeds]
    runs = [build(c, dataset) for c in configs]
    run_dirs = [os.path.join(save_dir, f"seed{seed}") for seed in seeds]
    exported = [os.path.exists(os.path.join(d, "model", SIDECAR)) for d in run_dirs]
    finished = lambda epoch: epoch >= config.optim_ne and all(exported)
    trainer = Trainer.for_run(save_dir, config, optimizer=runs[0].optimizer, loss_fn=runs[0].loss_fn,
                              eval_fn=runs[0].eval_fn, lr_schedule=runs[0].lr_schedule, mesh=mesh,
                              select_metric=None, run_seeds=seeds, vectorize=vectorize)
    # The config is written once the checkpoint has been read (a failed resume writes nothing),
    # and not at all into a finished folder.
    on_start = lambda epoch: None if finished(epoch) else save_config(config, save_dir)
    try:
        val = dataset.val if len(dataset.val) else None  # train_on_val: no validation
        states = trainer.fit(stack_runs([run.state for run in runs]), dataset.train, val,
                             on_start=on_start)
        if not trainer.trained_epochs and all(exported):
            print(f"sgd_swag: {save_dir} is finished ({config.optim_ne} epochs, {num_runs} runs "
                  f"exported); nothing trained or overwritten")
            return run_dirs
        vals = trainer.last_val  # each run's, of the last epoch (from the checkpoint if it trained none)
        for r, (c, run, run_dir) in enumerate(zip(configs, runs, run_dirs)):
            if exported[r] and not trainer.trained_epochs:  # killed while exporting: the rest
                continue
            arrays, sidecar = run.export(run_of(states, r), vals[r])
            save_export(os.path.join(run_dir, "model"), arrays,
                        {**sidecar, "data_name": c.data_name, "seed": c.seed,
                         "trained_by": METHOD.script, "val": vals[r]}, replace=exported[r])
    finally:
        trainer.checkpoints.close()
        trainer.logger.close()
    return run_dirs


def load_predictor(model_dir, samples_per_run: int = 3, seed: int = 0):
    """Predict with one teacher run (its `model/` export): S SWAG samples."""
    return teacher_predictor(os.path.dirname(os.path.abspath(model_dir)), samples_per_run, seed)


METHOD = register(Method(name="sgd_swag", config_class=SwagConfig, build=build,
                         load_predictor=load_predictor, export_kinds=(TEACHER_KIND,),
                         config_files=("teacher/*",)))


def train_runs(config: SwagConfig) -> str:
    """--num_runs R > 1: the R runs trained together into the teacher folder, as the driver
    trains one run: a fresh --save must be empty, one process per folder, --resume continues."""
    dataset = load_data(config)
    save_dir = prepare_run_dir(config, METHOD.name, write_config=False)
    lock = RunLock(save_dir)
    try:
        train_together(config, dataset, config.num_runs, save_dir)
    except KeyboardInterrupt:
        raise UserError(f"interrupted; the checkpoints in {save_dir} are kept: continue with "
                        f"python {METHOD.script} --resume {save_dir}", exit_code=130) from None
    finally:
        lock.release()
    print(f"sgd_swag: {config.num_runs} runs saved in {save_dir}")
    return save_dir


@cli_main
def main(argv):
    """`python sgd_swag.py ...`: one run through the shared driver, or with --num_runs R > 1
    the R runs trained together (train_runs) into the teacher folder --save; `--resume DIR`
    continues either."""
    config = parse_config(SwagConfig, argv)
    try:
        return train(METHOD, config) if config.num_runs == 1 else train_runs(config)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" in str(error):
            raise out_of_memory(error, config) from None
        raise


if __name__ == "__main__":
    main()
