"""The one driver: what every entry script does around its method, once.

    parse the config -> load the data -> build the method's Run -> prepare the run directory ->
    train (utils/trainer.py; resumes by itself) -> select on validation -> export -> close ->
    optional test table (utils/evaluation.py) -> close the logger

An entry script's `main` is `train_main(METHOD)`; its method lives in `build` (utils/method.py).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from utils.checkpoints import SIDECAR, RunLock, save_export
from utils.config import parse_config, prepare_run_dir, save_config
from utils.data_loading import check_input_size, load_data, shot_groups
from utils.errors import UserError, cli_main, first_line
from utils.evaluation import default_key, format_test_table, test_table
from utils.method import Method, Run
from utils.teachers import configured_teacher, load_teachers
from utils.trainer import Trainer


def load_teachers_checked(config, dataset):
    """The teacher ensemble of `config.teacher_dir`, checked against the data set."""
    # A set without labels of its own (cc3m) is distilled in the label space of eval_data_name.
    teachers = load_teachers(config.teacher_dir, config.eval_data_name or dataset.name,
                             dtype=jnp.dtype(config.dtype))
    if teachers.num_classes != dataset.num_classes:
        raise UserError(f"the teachers in {config.teacher_dir} predict {teachers.num_classes} "
                        f"classes, {dataset.name} has {dataset.num_classes}")
    members = getattr(config, "num_teachers", None)
    if members and members % teachers.num_runs:
        print(f"note: {members} teacher members over {teachers.num_runs} runs: some runs get one "
              f"member more each step (drawn at random per step)")
    return teachers


def validation_metrics(run: Run, dataset) -> list:
    """The names eval_fn returns, found by tracing it on one batch (nothing is computed)."""
    batch = {"images": np.zeros((1, *dataset.image_shape), np.uint8), "labels": np.zeros(1, np.int32),
             "mask": np.ones(1, bool)}
    shapes = jax.eval_shape(run.eval_fn, run.state, run.frozen, batch, jax.random.PRNGKey(0))
    return sorted(shapes)


def check_select_metric(run: Run, dataset):
    if run.select_metric is None:
        return
    names = validation_metrics(run, dataset)
    if run.select_metric not in names:
        raise UserError(f"select_metric {run.select_metric!r} is not a validation metric of this "
                        f"run; choose from {', '.join(names)}")


def default_test_predictors(method: Method, config):
    """The teacher ensemble (when the config names one) and the exported model."""
    def predictors(export_dir):
        teacher = ([configured_teacher(config)]
                   if getattr(config, "teacher_dir", None) else [])
        return teacher + [method.load_predictor(export_dir)]

    return predictors


def train(method: Method, config, mesh=None) -> str:
    """Train, select and export one run of `method`; returns the run directory."""
    dataset = load_data(config)
    if getattr(config, "model_arch", None):
        from models.zoo import build_model

        check_input_size(build_model(config.model_arch, 2), dataset.image_shape, "model_arch")
    run = method.build(config, dataset)
    if getattr(config, "train_on_val", False) and run.select_metric is not None:
        raise UserError("train_on_val trains on the validation images too, so nothing is left to "
                        "select on: set select_metric null (the last epoch is exported)")
    check_select_metric(run, dataset)
    # After every input check, so bad input leaves nothing; one process per run directory. The
    # config is written once a resumed run's checkpoint has been read (fit's on_start).
    run_dir = prepare_run_dir(config, method.name, write_config=False)
    lock = RunLock(run_dir)
    try:
        fit_and_export(method, config, run, dataset, run_dir, mesh)
    except KeyboardInterrupt:
        raise UserError(f"interrupted; the checkpoints in {run_dir} are kept: continue with "
                        f"python {method.script} --resume {run_dir}", exit_code=130) from None
    finally:
        lock.release()
    return run_dir


def out_of_memory(error: Exception, config) -> UserError:
    """The one line for a device allocation that failed (XLA's RESOURCE_EXHAUSTED)."""
    return UserError(f"out of memory ({first_line(error, 120)}): lower optim_bs (now "
                     f"{config.optim_bs}) or eval_bs (now {config.eval_bs}), or use a smaller model")


def fit_and_export(method: Method, config, run: Run, dataset, run_dir: str, mesh=None):
    """The trainer over the run (resuming when the directory holds a checkpoint), the export of
    the state selected on validation, and the optional test table."""
    trainer = Trainer.for_run(run_dir, config, optimizer=run.optimizer, lr_schedule=run.lr_schedule,
                              loss_fn=run.loss_fn, eval_fn=run.eval_fn, mesh=mesh,
                              select_metric=run.select_metric, select_mode=run.select_mode,
                              ema_decay=run.ema_decay,
                              num_epochs=run.num_epochs or config.optim_ne)
    if run.summary:
        print(run.summary)
    val = dataset.val if run.val is None else run.val
    val = val if val is not None and len(val) else None  # train_on_val: no validation
    state = trainer.fit(run.state, dataset.train, val, run.frozen,
                        on_start=lambda epoch: save_config(config, run_dir))

    # Export when there is none yet, or re-select and re-export when this call trained further.
    export_dir = os.path.join(run_dir, "model")
    exported = os.path.exists(os.path.join(export_dir, SIDECAR))
    if not exported or trainer.trained_epochs:
        selected, val_metrics = trainer.selected(state)
        arrays, sidecar = run.export(selected, val_metrics)
        save_export(export_dir, arrays, {**sidecar, "data_name": config.data_name,
                                         "seed": config.seed, "trained_by": method.script,
                                         "val": val_metrics}, replace=exported)
        if run.select_metric is not None:
            print(f"selected epoch {val_metrics.get('epoch')}: validation {run.select_metric} "
                  f"{val_metrics.get(run.select_metric)}")
    trainer.checkpoints.close()
    print(f"{method.name}: model saved in {export_dir}")

    if config.test_table:
        predictors = (run.test_predictors or default_test_predictors(method, config))(export_dir)
        rows = test_table(predictors, dataset.test, batch_size=config.eval_bs, mesh=trainer.mesh,
                          key=default_key(config.seed), shot_groups=shot_groups(config, dataset))
        print(format_test_table(rows, f"test set of {config.data_name} ({len(dataset.test)} images)"))
        trainer.logger.log({f"test/{name}/{k}": v for name, row in rows.items() for k, v in row.items()})
    trainer.logger.close()


def train_main(method: Method):
    """The entry script's main(argv): `python <script>.py --config FILE --key value ...`."""

    @cli_main
    def main(argv):
        config = parse_config(method.config_class, argv)
        try:
            return train(method, config)
        except jax.errors.JaxRuntimeError as error:
            if "RESOURCE_EXHAUSTED" in str(error):
                raise out_of_memory(error, config) from None
            raise

    return main
