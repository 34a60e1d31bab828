"""EDFM: ensemble distribution distillation by flow matching (spec §2, §7).

    python edfm.py --config config/distillation/edfm_fmnist_frnrelu.yaml --save runs/edfm/fmnist

A frozen KD backbone (`pretrained_resnet`, written by kd_and_endd.py) maps an image to its pooled
feature; a small AdaLN MLP (models/vector_field.py) is trained by flow matching to carry Gaussian
noise of std `noise_var` to the centred logits of one teacher member, conditioned on that feature.
Sampling the ODE M times per image gives M "members" whose distribution imitates the teacher
ensemble's.

Per training step, all inside the one jitted step:
1. the student augmentation pipeline (RandAugment, crop, flip, mixup) makes x̃;
2. one teacher member: a random run and a fresh diagonal-SWAG sample (`draw_members` with M=1,
   so every run is distilled, fixing [Q3]); its logits are centred, ℓ − mean_k ℓ;
3. the backbone's pooled feature of the same x̃, under stop_gradient: the backbone is passed in
   `frozen` and is never differentiated (fixes the wasted backward pass of [Q15]);
4. the flow-matching loss of models/flow_matching.py (time density ∝ b^t, path std `noise_var`,
   sum over classes of |v − u|^p, masked mean over the batch).
Only the head is trained: SGD with coupled L2 (`optim_base: sgd`) or AdamW (`adam`), a cosine
schedule, optionally an EMA of the head (created after the backbone is loaded, fixing [Q7]).
Each epoch validates a `num_ensembles`-member ensemble (mean of member softmaxes) and a single
member; the best epoch by validation NLL is exported to `<run>/model/` (kind "edfm": head and
backbone arrays, a sidecar with everything `load_predictor` needs). The run ends with a test-set
table: teacher ensemble, KD backbone, EDFM.
"""
import dataclasses
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data.augment import configured_pipeline
from data.datasets import load_dataset
from models.flow_matching import METHODS, flow_matching_loss, num_function_evals, solve
from models.resnet import resnet_from_spec, resnet_spec
from models.vector_field import AdaLNMLP
from utils import metrics as metrics_lib
from utils.checkpoints import SIDECAR, load_export, load_resnet, save_export
from utils.config import StudentConfig, parse_config, prepare_run_dir
from utils.errors import UserError, cli_main
from utils.optim import sgd_l2, warmup_cosine
from utils.predict import Predictor, count_params, predict
from utils.teachers import load_teachers, sample_teacher_logits, teacher_predictor
from utils.trainer import Trainer, TrainState, make_mesh

EDFM_KIND = "edfm"
HEAD_FIELDS = ("hidden_size", "time_embed_dim", "num_blocks", "noise_var", "droprate", "time_scale")


@dataclasses.dataclass
class EdfmConfig(StudentConfig):
    data_subname: Optional[str] = None  # the reference's c10/c100 tag; accepted, not used
    teacher_dir: str = "checkpoints_teacher/fmnist"
    pretrained_resnet: str = "checkpoints_teacher/kd/fmnist"  # a KD run directory or its model/
    # Head (models.vector_field.AdaLNMLP)
    hidden_size: int = 256
    time_embed_dim: int = 32
    num_blocks: int = 4
    num_classes: Optional[int] = None  # checked against the data set when given
    droprate: float = 0.0
    time_scale: float = 1000.0
    # Optimisation (head only)
    optim_base: str = "sgd"  # sgd (coupled L2, heavy-ball momentum) | adam (AdamW)
    optim_lr: float = 1e-4
    optim_weight_decay: float = 5e-4
    optim_momentum: float = 0.9
    warmup_steps: int = 0  # linear warm-up from warmup_factor·lr, in optimizer steps
    warmup_factor: float = 0.01
    ema_decay: float = 0.0  # 0: no EMA (the reference's default)
    mse_power: float = 2.0
    # Flow matching
    noise_var: float = 4.0  # the base noise's standard deviation (the reference's name)
    train_time_trunc: float = 1e-3
    train_time_exp_base: float = 3.0
    sample_time_exp_base: float = 0.5
    sample_num_steps: int = 7
    sample_solver: str = "heun_exp"
    num_ensembles: int = 32  # members at validation and in the test table
    # Evaluation
    eval_every: int = 1  # epochs between validations (the last epoch always validates)
    test_table: bool = True  # end with a test-set table: teacher ensemble, KD backbone, EDFM
    teacher_samples_per_run: int = 3  # SWAG samples per teacher run in the test table
    eval_batch_size: int = 500

    def validate(self):
        super().validate()
        if self.optim_base not in ("sgd", "adam"):
            raise UserError(f"optim_base must be sgd or adam, got {self.optim_base!r}")
        if self.sample_solver not in METHODS:
            raise UserError(f"sample_solver must be one of {', '.join(METHODS)}, got {self.sample_solver!r}")
        for key in ("hidden_size", "time_embed_dim", "num_blocks", "sample_num_steps",
                    "num_ensembles", "eval_every", "teacher_samples_per_run", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"config key {key} must be >= 1, got {getattr(self, key)}")
        if self.time_embed_dim % 2:
            raise UserError(f"time_embed_dim must be even, got {self.time_embed_dim}")
        if self.num_classes is not None and self.num_classes < 2:
            raise UserError(f"num_classes must be >= 2 (or null), got {self.num_classes}")
        checks = {"noise_var": self.noise_var > 0, "train_time_exp_base": self.train_time_exp_base > 0,
                  "sample_time_exp_base": self.sample_time_exp_base > 0, "mse_power": self.mse_power > 0,
                  "time_scale": self.time_scale > 0, "optim_lr": self.optim_lr > 0,
                  "train_time_trunc": 0 <= self.train_time_trunc < 1, "droprate": 0 <= self.droprate < 1,
                  "ema_decay": 0 <= self.ema_decay < 1,
                  "optim_weight_decay": self.optim_weight_decay >= 0, "warmup_steps": self.warmup_steps >= 0,
                  "optim_momentum": 0 <= self.optim_momentum < 1}
        for key, ok in checks.items():
            if not ok:
                raise UserError(f"config key {key} is out of range: {getattr(self, key)}")


# ------------------------------------------------------------------------------------ pieces
def make_head(num_classes: int, hidden_size: int = 256, time_embed_dim: int = 32, num_blocks: int = 4,
              noise_var: float = 4.0, droprate: float = 0.0, time_scale: float = 1000.0) -> AdaLNMLP:
    """The vector field; its s_noise follows `noise_var` (the reference hard-coded 4, [Q11])."""
    return AdaLNMLP(num_classes=num_classes, hidden_size=hidden_size, time_embed_dim=time_embed_dim,
                    num_blocks=num_blocks, s_noise=noise_var, time_scale=time_scale, droprate=droprate)


def backbone_features(backbone, variables, images):
    """The frozen backbone's pooled feature (GAP of its last feature map), no gradient."""
    out = backbone.apply(jax.lax.stop_gradient(variables), images, return_features=True)
    return jax.lax.stop_gradient(out.pooled.astype(jnp.float32))


def step_keys(key):
    """The step key's purposes: augmentation, teacher draw, dropout, flow (time and noise)."""
    augment, teacher, dropout, flow = jax.random.split(key, 4)
    return {"augment": augment, "teacher": teacher, "dropout": dropout, "flow": flow}


def teacher_targets(teacher_model, moments, key, images):
    """Centred logits ℓ − mean_k ℓ of ONE teacher member: a run drawn at random by this key and a
    fresh diagonal-SWAG sample of it (utils.teachers.sample_teacher_logits with M=1)."""
    logits = sample_teacher_logits(teacher_model, moments, key, images, 1)[0].astype(jnp.float32)
    return logits - jnp.mean(logits, axis=-1, keepdims=True)


def sample_member_logits(velocity, condition, key, num_members: int, num_classes: int, *,
                         noise_std: float, solver: str = "heun_exp", num_steps: int = 7,
                         exp_base: float = 0.5, **solve_options):
    """Member logits [B, M, K]: the condition [B, C] is repeated M times (rows b·M .. b·M+M−1
    belong to input b), x0 = noise_std·ξ, and the ODE dx/dt = velocity(x, condition_rows, t) is
    solved from t=0 to 1 for all B·M rows at once (`models.flow_matching.solve`)."""
    batch = condition.shape[0]
    rows = jnp.repeat(condition, num_members, axis=0)
    x0 = noise_std * jax.random.normal(key, (batch * num_members, num_classes), jnp.float32)
    x1 = solve(lambda x, t: velocity(x, rows, t), x0, solver, num_steps, exp_base=exp_base,
               **solve_options)
    return x1.reshape(batch, num_members, num_classes)


def make_loss_fn(head, backbone, teacher_model, config: EdfmConfig):
    """frozen = {"teacher": the stacked SWAG moments, "backbone": the backbone's variables}."""

    def loss_fn(params, model_state, frozen, batch, key):
        keys = step_keys(key)
        images, _ = configured_pipeline(keys["augment"], batch, config)
        target = teacher_targets(teacher_model, frozen["teacher"], keys["teacher"], images)
        condition = backbone_features(backbone, frozen["backbone"], images)

        def velocity(x_t, t):
            return head.apply({"params": params}, x_t, condition, t, train=True,
                              rngs={"dropout": keys["dropout"]})

        loss = flow_matching_loss(velocity, keys["flow"], target, config.noise_var,
                                  exp_base=config.train_time_exp_base, trunc=config.train_time_trunc,
                                  power=config.mse_power, mask=batch["mask"])
        return loss, (model_state, {})

    return loss_fn


def ensemble_metrics(member_logits, labels):
    """Per-example acc/nll of the ensemble (mean of member softmaxes) and of member 0."""
    log_probs = jax.nn.log_softmax(member_logits, axis=-1)  # [B, M, K]
    ensemble = jax.nn.logsumexp(log_probs, axis=1) - jnp.log(member_logits.shape[1])
    single = log_probs[:, 0]
    pick = lambda lp: -jnp.take_along_axis(lp, labels[:, None], 1)[:, 0]
    correct = lambda lp: (jnp.argmax(lp, -1) == labels).astype(jnp.float32)
    return {"acc": correct(ensemble), "nll": pick(ensemble),
            "single_acc": correct(single), "single_nll": pick(single)}


def make_eval_fn(head, backbone, num_classes: int, config: EdfmConfig):
    def eval_fn(state, frozen, batch, key):
        images = batch["images"].astype(jnp.float32) / 255.0
        condition = backbone_features(backbone, frozen["backbone"], images)
        velocity = lambda x, c, t: head.apply({"params": state.eval_params}, x, c, t)
        logits = sample_member_logits(velocity, condition, key, config.num_ensembles, num_classes,
                                      noise_std=config.noise_var, solver=config.sample_solver,
                                      num_steps=config.sample_num_steps,
                                      exp_base=config.sample_time_exp_base)
        return ensemble_metrics(logits, batch["labels"])

    return eval_fn


def make_optimizer(config: EdfmConfig, total_steps: int):
    schedule = warmup_cosine(config.optim_lr, total_steps, config.warmup_steps, config.warmup_factor)
    if config.optim_base == "sgd":
        return sgd_l2(schedule, config.optim_momentum, config.optim_weight_decay), schedule
    return optax.adamw(schedule, weight_decay=config.optim_weight_decay), schedule


# ---------------------------------------------------------------------------- backbone I/O
def find_export(path: str, what: str = "pretrained_resnet") -> str:
    """The export directory of `path`: path itself or path/model (a run directory)."""
    for directory in (path, os.path.join(path, "model")):
        if os.path.exists(os.path.join(directory, SIDECAR)):
            return directory
    raise UserError(f"{what} {path}: no exported model there (expected {path}/{SIDECAR} or "
                    f"{path}/model/{SIDECAR}); train a KD backbone with kd_and_endd.py")


def load_backbone(path: str, data_name: Optional[str], num_classes: Optional[int], dtype=jnp.float32):
    """(model, variables, sidecar, export_dir) of the frozen KD backbone, checked against the data."""
    directory = find_export(path)
    model, variables, sidecar = load_resnet(directory, dtype=dtype)
    if model.noise_std > 0:
        raise UserError(f"pretrained_resnet {directory} is a noise-injected (FED) network, not a KD ResNet")
    if data_name is not None and sidecar.get("data_name") not in (None, data_name):
        raise UserError(f"pretrained_resnet {directory} was trained on {sidecar['data_name']}, "
                        f"not {data_name}")
    if num_classes is not None and model.num_classes != num_classes:
        raise UserError(f"pretrained_resnet {directory} has {model.num_classes} classes, "
                        f"the data {num_classes}")
    return model, variables, sidecar, directory


def split_variables(variables):
    variables = dict(variables)
    return variables.pop("params"), variables


def feature_dim(backbone, variables, image_shape) -> int:
    out = jax.eval_shape(lambda v, x: backbone.apply(v, x, return_features=True), variables,
                         jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    return int(out.pooled.shape[-1])


def export_edfm(export_dir, config: EdfmConfig, num_classes: int, head_params, backbone,
                backbone_variables, backbone_dir, backbone_sidecar, val_metrics):
    params, model_state = split_variables(backbone_variables)
    backbone_arrays = {"params": params}
    if jax.tree.leaves(model_state):
        backbone_arrays["model_state"] = model_state
    sidecar = {
        "kind": EDFM_KIND, "trained_by": "edfm.py",
        "head": {name: getattr(config, name) for name in HEAD_FIELDS},
        "backbone": {"model": resnet_spec(backbone), "source": os.path.abspath(backbone_dir),
                     "method": backbone_sidecar.get("method"), "seed": backbone_sidecar.get("seed")},
        "sampler": {"sample_num_steps": config.sample_num_steps,
                    "sample_time_exp_base": config.sample_time_exp_base,
                    "sample_solver": config.sample_solver, "num_ensembles": config.num_ensembles},
        "data_name": config.data_name, "num_classes": num_classes, "seed": config.seed,
        "teacher_dir": os.path.abspath(config.teacher_dir), "val": val_metrics,
    }
    save_export(export_dir, {"head": jax.tree.map(np.asarray, head_params),
                             "backbone": jax.tree.map(np.asarray, backbone_arrays)}, sidecar)


# ---------------------------------------------------------------------------- prediction API
def load_predictor(model_dir, num_members: int = 32, num_steps: Optional[int] = None,
                   solver: str = "heun_exp", seed: int = 0, **solve_options) -> Predictor:
    """An EDFM export (`<run>/model/`, or the run directory) as a Predictor.

    member_logits(args, images, key) -> [B, M, K] in one compiled call: the backbone once, then
    the head over all B·M rows. `num_steps` defaults to the training config's sample_num_steps;
    `solver` is any method of models.flow_matching.solve (heun_exp: S steps, 2(S−1)+1 head
    evaluations; euler, heun, midpoint; adaptive, with solve_options such as rtol/atol).
    """
    directory = find_export(str(model_dir), "model_dir")
    arrays, sidecar = load_export(directory, kind=EDFM_KIND)
    if solver not in METHODS:
        raise UserError(f"solver must be one of {', '.join(METHODS)}, got {solver!r}")
    if num_members < 1:
        raise UserError(f"num_members must be >= 1, got {num_members}")
    sampler = sidecar["sampler"]
    num_steps = int(sampler["sample_num_steps"] if num_steps is None else num_steps)
    if num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {num_steps}")
    num_classes = int(sidecar["num_classes"])
    head = make_head(num_classes, **sidecar["head"])
    backbone = resnet_from_spec(sidecar["backbone"]["model"])
    backbone_arrays = arrays["backbone"]
    args = {"head": arrays["head"],
            "backbone": {"params": backbone_arrays["params"], **backbone_arrays.get("model_state", {})}}
    noise_std = float(sidecar["head"]["noise_var"])
    exp_base = float(sampler["sample_time_exp_base"])

    def member_logits(args, images, key):
        key = jax.random.fold_in(key, seed)
        condition = backbone_features(backbone, args["backbone"], images)
        velocity = lambda x, c, t: head.apply({"params": args["head"]}, x, c, t)
        return sample_member_logits(velocity, condition, key, num_members, num_classes,
                                    noise_std=noise_std, solver=solver, num_steps=num_steps,
                                    exp_base=exp_base, **solve_options)

    sidecar = dict(sidecar, predictor={"num_members": num_members, "num_steps": num_steps,
                                       "solver": solver,
                                       "head_evals": None if solver == "adaptive"
                                       else num_function_evals(solver, num_steps)})
    return Predictor(name=f"EDFM ({num_members})", kind=EDFM_KIND, member_logits=member_logits,
                     args=args, num_members=num_members, num_params=count_params(args), sidecar=sidecar)


def predict_member_logits(model_dir_or_predictor, images_u8, num_members: int = 32, *,
                          batch_size: int = 500, key=None, **options) -> np.ndarray:
    """Convenience: member logits [N, M, K] of uint8 images [N, H, W, C]. Given a Predictor,
    its own number of members is used and `num_members`/`options` are ignored."""
    predictor = model_dir_or_predictor
    if not isinstance(predictor, Predictor):
        predictor = load_predictor(predictor, num_members=num_members, **options)
    return predict(predictor, np.asarray(images_u8), batch_size=batch_size, key=key)


def resnet_predictor(model, variables, sidecar, name: str = "KD backbone") -> Predictor:
    """A plain zoo network (here the KD backbone with its own classifier) as a 1-member Predictor."""
    def member_logits(variables, images, key):
        return model.apply(variables, images)[:, None, :]

    return Predictor(name=name, kind="resnet", member_logits=member_logits, args=variables,
                     num_members=1, num_params=count_params(variables), sidecar=sidecar)


# ----------------------------------------------------------------------------- test table
def table_row(member_logits, labels, teacher_probs=None) -> dict:
    probs = metrics_lib.ensemble_probs(member_logits)
    row = {"acc": metrics_lib.accuracy(probs, labels), "nll": metrics_lib.nll(probs, labels),
           "ece": metrics_lib.ece(probs, labels)}
    row["kl_to_teacher"] = (metrics_lib.kl_to_teacher(teacher_probs, probs) if teacher_probs is not None
                            else float("nan"))
    return row


def evaluate_table(predictors, split, *, batch_size: int, mesh, seed: int) -> dict:
    """{name: {acc, nll, ece, kl_to_teacher, time_s}} on a split; the first predictor is the
    teacher whose ensemble the KL column compares with."""
    rows, teacher_probs = {}, None
    for i, predictor in enumerate(predictors):
        start = time.perf_counter()
        logits = predict(predictor, split.images, batch_size=batch_size, mesh=mesh,
                         key=jax.random.PRNGKey(seed + 7))
        row = table_row(logits, split.labels, teacher_probs)
        row["time_s"] = round(time.perf_counter() - start, 2)  # compile included
        if i == 0:
            teacher_probs = metrics_lib.ensemble_probs(logits)
            row["kl_to_teacher"] = 0.0
        rows[predictor.name] = row
    return rows


def format_table(rows: dict, title: str) -> str:
    width = max(len(name) for name in rows) + 2
    lines = [title, f"{'model':<{width}}{'acc':>8}{'nll':>8}{'ece':>8}{'KL(T||S)':>10}{'time_s':>8}"]
    for name, r in rows.items():
        lines.append(f"{name:<{width}}{r['acc']:>8.4f}{r['nll']:>8.4f}{r['ece']:>8.4f}"
                     f"{r['kl_to_teacher']:>10.4f}{r.get('time_s', float('nan')):>8.1f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
@cli_main
def main(argv):
    config = parse_config(EdfmConfig, argv)
    dataset = load_dataset(config.data_name, config.data_root, download=config.download,
                           num_train_examples=config.num_train_examples)
    num_classes = dataset.num_classes
    if config.num_classes is not None and config.num_classes != num_classes:
        raise UserError(f"num_classes {config.num_classes} does not match {config.data_name} "
                        f"({num_classes} classes)")
    dtype = jnp.dtype(config.dtype)
    teachers = load_teachers(config.teacher_dir, data_name=config.data_name, dtype=dtype)
    if teachers.num_classes != num_classes:
        raise UserError(f"teachers in {config.teacher_dir} have {teachers.num_classes} classes, "
                        f"{config.data_name} has {num_classes}")
    backbone, backbone_variables, backbone_sidecar, backbone_dir = load_backbone(
        config.pretrained_resnet, config.data_name, num_classes, dtype=dtype)
    if (backbone.depth, backbone.width) != (config.model_depth, config.model_width):
        print(f"note: the backbone is a ResNet-{backbone.depth}x{backbone.width} (from its sidecar); "
              f"model_depth/model_width {config.model_depth}/{config.model_width} are not used")
    run_dir = prepare_run_dir(config, "edfm")

    # The head and its train state are built after the backbone is loaded (fixes [Q7]); the
    # backbone and the teachers go in `frozen`, so only the head is trained (and EMA-averaged).
    head = make_head(num_classes, **{name: getattr(config, name) for name in HEAD_FIELDS})
    cond_dim = feature_dim(backbone, backbone_variables, dataset.image_shape)
    head_params = jax.jit(head.init)(jax.random.PRNGKey(config.seed), jnp.zeros((1, num_classes)),
                                     jnp.zeros((1, cond_dim)), jnp.zeros((1,)))["params"]
    steps_per_epoch = -(-len(dataset.train.images) // config.optim_bs)
    optimizer, schedule = make_optimizer(config, steps_per_epoch * config.optim_ne)
    frozen = {"teacher": teachers.moments, "backbone": backbone_variables}
    mesh = make_mesh()
    trainer = Trainer.for_run(run_dir, config, optimizer=optimizer, lr_schedule=schedule,
                              loss_fn=make_loss_fn(head, backbone, teachers.model, config),
                              eval_fn=make_eval_fn(head, backbone, num_classes, config),
                              mesh=mesh, select_metric="nll", ema_decay=config.ema_decay)
    state = TrainState.create(head_params, optimizer, {}, ema=config.ema_decay > 0)
    print(f"EDFM head: {count_params(head_params):,} parameters on a frozen "
          f"ResNet-{backbone.depth}x{backbone.width} ({cond_dim}-d feature); "
          f"{teachers.num_runs} teacher runs; {steps_per_epoch} steps/epoch")
    state = trainer.fit(state, dataset.train, dataset.val, frozen)

    export_dir = os.path.join(run_dir, "model")
    if not os.path.exists(os.path.join(export_dir, SIDECAR)):
        best, val = trainer.selected(state)  # the best epoch by validation NLL
        print(f"selected epoch {val.get('epoch')}: validation NLL {val.get('nll', float('nan')):.4f}")
        export_edfm(export_dir, config, num_classes, best.eval_params, backbone, backbone_variables,
                    backbone_dir, backbone_sidecar, val)
    trainer.checkpoints.close()
    print(f"EDFM model saved in {export_dir}")

    if config.test_table:
        predictors = [
            teacher_predictor(config.teacher_dir, config.teacher_samples_per_run, config.seed),
            resnet_predictor(backbone, backbone_variables, backbone_sidecar),
            load_predictor(export_dir, num_members=config.num_ensembles, solver=config.sample_solver,
                           seed=config.seed),
        ]
        rows = evaluate_table(predictors, dataset.test, batch_size=config.eval_batch_size, mesh=mesh,
                          seed=config.seed)
        print(format_table(rows, f"test set of {config.data_name} ({len(dataset.test)} images)"))
        trainer.logger.log({f"test/{name}/{k}": v for name, row in rows.items()
                            for k, v in row.items()})
    trainer.logger.close()


if __name__ == "__main__":
    main()
