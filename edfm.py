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
Only the head is trained: SGD with coupled L2 (`optim: sgd`; the reference's key `optim_base` is an
alias) or AdamW (`adam`), a cosine schedule, optionally an EMA of the head (created after the
backbone is loaded, fixing [Q7]).
Each epoch validates a `num_ensembles`-member ensemble (mean of member softmaxes) and a single
member; the best epoch by validation NLL is exported to `<run>/model/` (kind "edfm": head and
backbone arrays, a sidecar with everything `load_predictor` needs). The run ends with a test-set
table: teacher ensemble, KD backbone, EDFM.
"""
import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from data.augment import configured_pipeline, eval_images
from models.flow_matching import FIXED_METHODS, METHODS, flow_matching_loss, num_function_evals, solve
from models.resnet import network_name, resnet_from_spec, resnet_spec
from models.vector_field import AdaLNMLP
from utils.checkpoints import find_export, load_export, load_resnet
from utils.config import StudentConfig
from utils.driver import load_teachers_checked, train_main
from utils.errors import UserError
from utils.method import Method, Run, Sweep, register
from utils.optim import make_optimizer, warmup_cosine
from utils.predict import Predictor, count_params, predict, resnet_predictor
from utils.teachers import configured_teacher, sample_teacher_logits
from utils.trainer import TrainState, prediction_metrics, steps_per_epoch

EDFM_KIND = "edfm"
HEAD_FIELDS = ("hidden_size", "time_embed_dim", "num_blocks", "noise_var", "droprate", "time_scale",
               "s_noise", "dropout_on_stream")


@dataclasses.dataclass
class EdfmConfig(StudentConfig):
    data_subname: Optional[str] = None  # the reference's c10/c100 tag; accepted, not used
    pretrained_resnet: str = "checkpoints_teacher/kd/fmnist"  # a KD run directory or its model/
    # Head (models.vector_field.AdaLNMLP)
    hidden_size: int = 256  # hidden units of each block
    time_embed_dim: int = 32  # sinusoidal time embedding size
    num_blocks: int = 4  # AdaLN-MLP blocks
    droprate: float = 0.0  # dropout in each block
    dropout_on_stream: bool = True  # dropout on each block's output (the reference's place); false: on its residual branch
    time_scale: float = 1000.0  # time feature ln(time_scale·(1−t))/4
    s_noise: Optional[float] = None  # the head's preconditioning noise scale σ_n; null: noise_var ([Q11] fixed); 4.0: the reference's hard-coded value
    # Optimisation (head only): optim sgd (coupled L2, heavy-ball momentum) | adam (AdamW)
    optim_lr: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from warmup_factor·lr, in optimizer steps
    warmup_factor: float = 0.01  # the warm-up's starting fraction of optim_lr
    ema_decay: float = 0.0  # 0: no EMA (the reference's default)
    mse_power: float = 2.0  # p of the loss Σ_k |v − u|^p
    # Flow matching
    noise_var: float = 4.0  # the base noise's standard deviation (the reference's name)
    flow_target: str = "difference"  # the target velocity: difference (x1 − x_t)/(1 − t), the reference's | closed_form x1 − σξ
    train_time_trunc: float = 1e-3  # ε: training times t lie in [0, 1−ε)
    train_time_exp_base: float = 3.0  # b: training times have density ∝ b^t
    sample_time_exp_base: float = 0.5  # a: sampling grid t_i = (1 − a^i)/(1 − a^S)
    sample_num_steps: int = 7  # S: solver steps of the sampler
    sample_solver: str = "heun_exp"  # heun_exp | euler
    num_ensembles: int = 32  # members at validation and in the test table
    select_metric: Optional[str] = "nll"  # validation metric of the num_ensembles-member ensemble
    test_table: bool = True  # end with a test-set table: teacher ensemble, KD backbone, EDFM

    ALIASES = {"optim_base": "optim", "eval_batch_size": "eval_bs"}
    UNUSED = ("data_subname",)

    def validate(self):
        super().validate()
        if self.flow_target not in ("difference", "closed_form"):
            raise UserError(f"flow_target must be difference or closed_form, got {self.flow_target!r}")
        if self.sample_solver not in METHODS:
            raise UserError(f"sample_solver must be one of {', '.join(METHODS)}, got {self.sample_solver!r}")
        for key in ("hidden_size", "time_embed_dim", "num_blocks", "sample_num_steps",
                    "num_ensembles"):
            if getattr(self, key) < 1:
                raise UserError(f"config key {key} must be >= 1, got {getattr(self, key)}")
        if self.time_embed_dim % 2:
            raise UserError(f"time_embed_dim must be even, got {self.time_embed_dim}")
        checks = {"noise_var": self.noise_var > 0, "s_noise": self.s_noise is None or self.s_noise > 0, "train_time_exp_base": self.train_time_exp_base > 0,
                  "sample_time_exp_base": self.sample_time_exp_base > 0, "mse_power": self.mse_power > 0,
                  "time_scale": self.time_scale > 0,
                  "train_time_trunc": 0 <= self.train_time_trunc < 1, "droprate": 0 <= self.droprate < 1,
                  "ema_decay": 0 <= self.ema_decay < 1, "warmup_steps": self.warmup_steps >= 0}
        for key, ok in checks.items():
            if not ok:
                raise UserError(f"config key {key} is out of range: {getattr(self, key)}")


# ------------------------------------------------------------------------------------ pieces
def make_head(num_classes: int, hidden_size: int = 256, time_embed_dim: int = 32, num_blocks: int = 4,
              noise_var: float = 4.0, droprate: float = 0.0, time_scale: float = 1000.0,
              s_noise: Optional[float] = None, dropout_on_stream: bool = True) -> AdaLNMLP:
    """The vector field; its preconditioning s_noise follows `noise_var` unless given (the
    reference hard-coded 4, [Q11]; exports from before the key have no s_noise: noise_var)."""
    return AdaLNMLP(num_classes=num_classes, hidden_size=hidden_size, time_embed_dim=time_embed_dim,
                    num_blocks=num_blocks, s_noise=noise_var if s_noise is None else s_noise,
                    time_scale=time_scale, droprate=droprate, dropout_on_stream=dropout_on_stream)


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
                                  power=config.mse_power, mask=batch["mask"],
                                  target=config.flow_target)
        return loss, (model_state, {})

    return loss_fn


def ensemble_metrics(member_logits, labels):
    """Per-example acc/nll of the ensemble (mean of member softmaxes) and of member 0."""
    log_probs = jax.nn.log_softmax(member_logits, axis=-1)  # [B, M, K]
    ensemble = jax.nn.logsumexp(log_probs, axis=1) - jnp.log(member_logits.shape[1])
    return {**prediction_metrics(ensemble, labels),
            **prediction_metrics(log_probs[:, 0], labels, "single_")}


def make_eval_fn(head, backbone, num_classes: int, config: EdfmConfig):
    def eval_fn(state, frozen, batch, key):
        condition = backbone_features(backbone, frozen["backbone"], eval_images(batch["images"]))
        velocity = lambda x, c, t: head.apply({"params": state.eval_params}, x, c, t)
        logits = sample_member_logits(velocity, condition, key, config.num_ensembles, num_classes,
                                      noise_std=config.noise_var, solver=config.sample_solver,
                                      num_steps=config.sample_num_steps,
                                      exp_base=config.sample_time_exp_base)
        return ensemble_metrics(logits, batch["labels"])

    return eval_fn


# ---------------------------------------------------------------------------- backbone I/O
def load_backbone(path: str, data_name: Optional[str], num_classes: Optional[int], dtype=jnp.float32):
    """(model, variables, sidecar, export_dir) of the frozen KD backbone, checked against the data."""
    directory = find_export(path, "pretrained_resnet")
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


def feature_dim(backbone, variables, image_shape) -> int:
    out = jax.eval_shape(lambda v, x: backbone.apply(v, x, return_features=True), variables,
                         jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    return int(out.pooled.shape[-1])


def export_edfm(config: EdfmConfig, num_classes: int, head_params, backbone, backbone_variables,
                backbone_dir, backbone_sidecar):
    """(arrays, sidecar) of kind "edfm": the head and the backbone's arrays, and everything
    `load_predictor` needs (head fields, backbone spec, sampler)."""
    params = dict(backbone_variables)
    backbone_arrays = {"params": params.pop("params")}
    if jax.tree.leaves(params):
        backbone_arrays["model_state"] = params
    sidecar = {
        "kind": EDFM_KIND,
        "head": {name: getattr(config, name) for name in HEAD_FIELDS},
        "backbone": {"model": resnet_spec(backbone), "source": os.path.abspath(backbone_dir),
                     "method": backbone_sidecar.get("method"), "seed": backbone_sidecar.get("seed")},
        "sampler": {"sample_num_steps": config.sample_num_steps,
                    "sample_time_exp_base": config.sample_time_exp_base,
                    "sample_solver": config.sample_solver, "num_ensembles": config.num_ensembles},
        "num_classes": num_classes, "teacher_dir": os.path.abspath(config.teacher_dir),
    }
    return {"head": jax.tree.map(np.asarray, head_params),
            "backbone": jax.tree.map(np.asarray, backbone_arrays)}, sidecar


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


# ------------------------------------------------------------------------------- the method
def build(config: EdfmConfig, dataset) -> Run:
    num_classes = dataset.num_classes
    dtype = jnp.dtype(config.dtype)
    teachers = load_teachers_checked(config, dataset)
    backbone, backbone_variables, backbone_sidecar, backbone_dir = load_backbone(
        config.pretrained_resnet, config.data_name, num_classes, dtype=dtype)
    print(f"note: the backbone is a {network_name(backbone)} (from its sidecar); the model_* keys "
          f"are not used")

    # The head and its train state are built after the backbone is loaded (fixes [Q7]); the
    # backbone and the teachers go in `frozen`, so only the head is trained (and EMA-averaged).
    head = make_head(num_classes, **{name: getattr(config, name) for name in HEAD_FIELDS})
    cond_dim = feature_dim(backbone, backbone_variables, dataset.image_shape)
    head_params = jax.jit(head.init)(jax.random.PRNGKey(config.seed), jnp.zeros((1, num_classes)),
                                     jnp.zeros((1, cond_dim)), jnp.zeros((1,)))["params"]
    steps = steps_per_epoch(len(dataset.train), config.optim_bs)
    schedule = warmup_cosine(config.optim_lr, steps * config.optim_ne, config.warmup_steps,
                             config.warmup_factor)
    optimizer = make_optimizer(config, schedule)

    def test_predictors(export_dir):
        return [configured_teacher(config),
                resnet_predictor(backbone, backbone_variables, backbone_sidecar, "KD backbone"),
                load_predictor(export_dir, num_members=config.num_ensembles,
                               solver=config.sample_solver, seed=config.seed)]

    return Run(
        state=TrainState.create(head_params, optimizer, {}, ema=config.ema_decay > 0),
        loss_fn=make_loss_fn(head, backbone, teachers.model, config),
        eval_fn=make_eval_fn(head, backbone, num_classes, config), optimizer=optimizer,
        lr_schedule=schedule, frozen={"teacher": teachers.moments, "backbone": backbone_variables},
        select_metric=config.select_metric, ema_decay=config.ema_decay,
        export=lambda state, val: export_edfm(config, num_classes, state.eval_params, backbone,
                                              backbone_variables, backbone_dir, backbone_sidecar),
        test_predictors=test_predictors,
        summary=f"EDFM head: {count_params(head_params):,} parameters on a frozen "
                f"{network_name(backbone)} ({cond_dim}-d feature); "
                f"{teachers.num_runs} teacher runs; {steps} steps/epoch")


def sweeps(options: dict, settings: dict) -> list:
    """evaluate.py's sweeps of an EDFM student: quality against the members per input, and
    against the head evaluations (NFE) of each fixed-grid solver. `settings` may replace the
    lists: members, steps, solvers."""
    unknown = set(settings) - {"members", "steps", "solvers"}
    if unknown:
        raise UserError(f"EDFM sweeps take members, steps, solvers; got {', '.join(sorted(unknown))}")
    members = settings.get("members", [1, 2, 4, 8, 16, 32])
    steps = settings.get("steps", [1, 2, 3, 4, 5, 6, 7])
    solvers = settings.get("solvers", ["heun_exp", "euler"])
    for solver in solvers:
        if solver not in FIXED_METHODS:
            raise UserError(f"EDFM sweep: unknown fixed-grid solver {solver!r}; choose from "
                            f"{', '.join(FIXED_METHODS)}")
    out = [Sweep("members", "members per input", tuple((m, {"num_members": m}) for m in members))]
    for solver in solvers:
        out.append(Sweep(f"{solver} steps", "function evaluations (head)",
                         tuple((num_function_evals(solver, s), {"num_steps": s, "solver": solver})
                               for s in steps)))
    return out


METHOD = register(Method(name="edfm", config_class=EdfmConfig, build=build,
                         load_predictor=load_predictor, export_kinds=(EDFM_KIND,),
                         config_files=("distillation/edfm_*",), sweeps=sweeps))
main = train_main(METHOD)

if __name__ == "__main__":
    main()
