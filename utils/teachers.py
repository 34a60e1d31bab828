"""Teacher ensembles: R MultiSWAG runs loaded as one stacked set of moments, one vmapped forward.

A teacher folder holds one or more runs written by `sgd_swag.py`, each `<run>/model/` with the
SWAG mean, second moment and a sidecar, plus, for low-rank SWAG (`rank >= 2`), the K latest
deviations θ − mean. `load_teachers(folder)` stacks the runs' means and standard deviations on a
leading axis R, and their deviations as [R, K, ...]; the runs of one folder are either all
diagonal or all low-rank with the same K. A single deterministic network (a "resnet" export: a
plain cross-entropy teacher or a KD student, BatchNorm statistics included) is the one-run
ensemble with zero deviation, so every script also distills from one ordinary network (the
GenDD paper's single-teacher KD). Members are then drawn inside jitted code:

    member_params = draw_members(key, moments, num_members)     # [M, ...], balanced over runs
    logits = ensemble_logits(model, member_params, images)       # [M, B, K], one compiled call

Each draw takes fresh SWAG noise, and each run appears ⌊M/R⌋ or ⌈M/R⌉ times, the runs that get
the extra members being drawn at random per call. This fixes the reference's [Q3], which fixed
the run of every slot once, at trace time (EDFM then distilled a single run). A member of run r
is θ = mean_r + scale·std_r⊙ξ for diagonal runs (the reference's sampler, no 1/√2), and for
low-rank runs the SWAG paper's (Maddox et al. 2019) θ = mean_r + scale·(std_r⊙ξ₁/√2 +
D_rᵀξ₂/√(2(K−1))), D_r the run's K stored deviations and ξ₂ ∈ R^K one draw per member shared
by all its parameters (the low-rank factor correlates parameters across layers).
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from models.resnet import ResNet, resnet_from_spec
from models.swag import low_rank_leaf, swag_std
from utils.checkpoints import SIDECAR, check_variables, find_exports, load_export, read_sidecar
from utils.errors import UserError

TEACHER_KIND = "swag_teacher"


@dataclasses.dataclass
class TeacherEnsemble:
    model: ResNet
    # {"mean": params [R, ...], "std": params [R, ...], "model_state": shared}, and for
    # low-rank SWAG runs "deviations": params [R, K, ...]
    moments: dict
    runs: list  # the run directories, in stacking order
    sidecars: list

    @property
    def num_runs(self) -> int:
        return len(self.runs)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


def find_teacher_runs(folder: str) -> list[str]:
    """The exports under `folder`: folder itself (an export, or a run with model/), or the
    model/ of each run directory inside it."""
    if not os.path.isdir(folder):
        raise UserError(f"teacher folder {folder} does not exist; train teachers with sgd_swag.py "
                        f"or point teacher_dir at checkpoints_teacher/<data>")
    runs = find_exports(folder)
    if not runs:
        raise UserError(f"no teacher run in {folder}: expected <run>/model/{SIDECAR} written by sgd_swag.py")
    return runs


def _load_run(export: str):
    """(mean, std, deviations, model_state, sidecar) of one SWAG run, or of one network with
    std 0; deviations (leaves [K, ...]) only for a low-rank SWAG run, else None."""
    kind = read_sidecar(export).get("kind")
    if kind == TEACHER_KIND:
        arrays, sidecar = load_export(export, kind=TEACHER_KIND)
        std = swag_std(arrays["mean"], arrays["params2"])
        return arrays["mean"], std, arrays.get("deviations"), {}, sidecar
    if kind == "resnet":
        arrays, sidecar = load_export(export, kind="resnet")
        params = arrays["params"]
        return params, jax.tree.map(np.zeros_like, params), None, arrays.get("model_state", {}), sidecar
    raise UserError(f"{export} holds a {kind!r}, not a teacher (a swag_teacher run or a resnet)")


def deviation_rank(deviations) -> int:
    """K, the number of stored deviations of a run (leaves [K, ...]); 0 for a diagonal run."""
    return 0 if deviations is None else int(jax.tree.leaves(deviations)[0].shape[0])


def _describe_rank(rank: int) -> str:
    return "diagonal SWAG" if rank == 0 else f"low-rank SWAG with {rank} deviations"


def load_teachers(folder: str, data_name: str | None = None, dtype=jnp.float32) -> TeacherEnsemble:
    runs = find_teacher_runs(folder)
    means, stds, deviations, sidecars, model_state = [], [], [], [], {}
    for run in runs:
        mean, std, run_deviations, model_state, sidecar = _load_run(run)
        rank = deviation_rank(run_deviations)
        if rank == 1:  # the sampler divides by K − 1; sgd_swag.py exports deviations only for K >= 2
            raise UserError(f"teacher run {run} has a single SWAG deviation: low-rank sampling needs >= 2")
        # One sampler serves the whole stack: the runs must all have the same K (0: diagonal).
        if deviations and rank != deviation_rank(deviations[0]):
            raise UserError(f"teacher run {run} is {_describe_rank(rank)} but {runs[0]} is "
                            f"{_describe_rank(deviation_rank(deviations[0]))}: a teacher folder "
                            f"holds runs of one kind")
        if sidecars and sidecar["model"] != sidecars[0]["model"]:
            raise UserError(f"teacher run {run} has another architecture than {runs[0]}")
        if data_name is not None and sidecar.get("data_name", data_name) != data_name:
            raise UserError(f"teacher run {run} was trained on {sidecar['data_name']}, not {data_name}")
        if model_state and len(runs) > 1:
            raise UserError(f"{run} has BatchNorm statistics: such a teacher must be alone in its folder")
        means.append(mean)
        stds.append(std)
        deviations.append(run_deviations)
        sidecars.append(sidecar)
    stack = lambda trees: jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *trees)
    model = resnet_from_spec(sidecars[0]["model"], dtype=dtype)
    for run, mean in zip(runs, means):
        check_variables(run, model, {"params": mean, **model_state})
    moments = {"mean": stack(means), "std": stack(stds), "model_state": model_state}
    if deviation_rank(deviations[0]):
        moments["deviations"] = stack(deviations)  # [R, K, ...]
    return TeacherEnsemble(model, moments, runs, sidecars)


def balanced_runs(key, num_members: int, num_runs: int):
    """Run index of each member: every run ⌊M/R⌋ or ⌈M/R⌉ times, extras to random runs."""
    return jax.random.permutation(key, num_runs)[jnp.arange(num_members) % num_runs]


def members_from_runs(key, moments, run_index, scale: float = 1.0):
    """SWAG samples of the runs `run_index` [M], stacked [M, ...].

    Diagonal moments: θ_m = mean[r_m] + scale·std[r_m]⊙ξ_m. With "deviations" D [R, K, ...]
    (low-rank SWAG): θ_m = mean[r_m] + scale·(std[r_m]⊙ξ₁/√2 + D[r_m]ᵀξ₂/√(2(K−1))), one
    ξ₂ ∈ R^K per member shared by all its leaves.

    All the noise is one normal draw [M, P + K] (K = 0 when diagonal), cut into the leaves' ξ₁
    and ξ₂: one RNG call per leaf would compile to ~10x more code (tens of seconds of XLA time
    on CPU for a ResNet-8).
    """
    leaves, treedef = jax.tree.flatten(moments["mean"])
    std_leaves = treedef.flatten_up_to(moments["std"])
    deviation_leaves = treedef.flatten_up_to(moments["deviations"]) if "deviations" in moments else None
    rank = deviation_leaves[0].shape[1] if deviation_leaves else 0
    if rank == 1:
        raise ValueError("low-rank SWAG sampling needs >= 2 deviations per run")
    num_members = run_index.shape[0]
    sizes = [int(np.prod(leaf.shape[1:])) for leaf in leaves]
    noise = jax.random.normal(key, (num_members, sum(sizes) + rank), leaves[0].dtype)
    offsets = np.cumsum([0] + sizes)
    low_rank_noise = noise[:, offsets[-1]:]  # ξ₂ [M, K], the same for every leaf of a member
    low_rank_members = jax.vmap(low_rank_leaf, in_axes=(0, 0, 0, 0, 0, None))
    members = []
    for i, (leaf, std, start, stop) in enumerate(zip(leaves, std_leaves, offsets[:-1], offsets[1:])):
        xi = noise[:, start:stop].reshape((num_members, *leaf.shape[1:]))
        if deviation_leaves is None:
            members.append(leaf[run_index] + scale * std[run_index] * xi)
        else:
            members.append(low_rank_members(leaf[run_index], std[run_index],
                                            deviation_leaves[i][run_index], xi, low_rank_noise, scale))
    return jax.tree.unflatten(treedef, members)


def draw_members(key, moments, num_members: int, scale: float = 1.0):
    """M fresh SWAG samples balanced across the R runs (jittable)."""
    num_runs = jax.tree.leaves(moments["mean"])[0].shape[0]
    run_key, noise_key = jax.random.split(key)
    return members_from_runs(noise_key, moments, balanced_runs(run_key, num_members, num_runs), scale)


def fixed_members(key, moments, samples_per_run: int, scale: float = 1.0):
    """The R×S evaluation ensemble: S samples of each run, run-major order."""
    num_runs = jax.tree.leaves(moments["mean"])[0].shape[0]
    return members_from_runs(key, moments, jnp.repeat(jnp.arange(num_runs), samples_per_run), scale)


def members_per_pass() -> int | None:
    """How many members one compiled pass runs at once: all of them (vmap) on an accelerator,
    one after another on CPU, where a vmapped convolution with per-member kernels becomes a
    grouped convolution about 8x slower than running the members in sequence (bench/)."""
    return 1 if jax.default_backend() == "cpu" else None


def sample_teacher_logits(model, moments, key, images, num_members: int, tied_runs: bool = False):
    """Logits [M, B, K] of M fresh members, balanced over the runs (drawn at random per call, or
    with `tied_runs` member m from run m mod R, e.g. one student head per run); no gradient
    flows back."""
    moments = jax.lax.stop_gradient(moments)
    if tied_runs:
        num_runs = jax.tree.leaves(moments["mean"])[0].shape[0]
        members = members_from_runs(key, moments, jnp.arange(num_members) % num_runs)
    else:
        members = draw_members(key, moments, num_members)
    return jax.lax.stop_gradient(ensemble_logits(model, members, images,
                                                 model_state=moments.get("model_state", {})))


def ensemble_logits(model, member_params, images, chunk: int | None = -1, model_state=None):
    """Logits [M, B, K] of M stacked parameter sets on one batch, in one compiled call.

    `chunk` members are vmapped together and chunks run in sequence (lax.map); None vmaps all
    M at once; the default picks by backend (`members_per_pass`).
    """
    chunk = members_per_pass() if chunk == -1 else chunk
    model_state = model_state or {}  # BatchNorm statistics, shared by the members
    apply = lambda params: model.apply({"params": params, **model_state}, images)
    if chunk is None:
        return jax.vmap(apply)(member_params)
    return jax.lax.map(apply, member_params, batch_size=chunk)


TEACHER_MODES = ("swag", "swa_means")


def configured_teacher(config):
    """The evaluation ensemble a config names: teacher_dir, teacher_mode, teacher_samples_per_run,
    seed (evaluate.py and every script's test table)."""
    return teacher_predictor(config.teacher_dir, config.teacher_samples_per_run, config.seed,
                             config.teacher_mode)


def teacher_predictor(folder: str, samples_per_run: int = 3, seed: int = 0, mode: str = "swag"):
    """The evaluation ensemble: R runs × S SWAG samples, drawn once with a fixed key ("swag"),
    or the R runs' SWA means themselves ("swa_means", the reference's offline evaluation)."""
    from utils.predict import Predictor, count_params

    if mode not in TEACHER_MODES:
        raise UserError(f"teacher_mode must be one of {', '.join(TEACHER_MODES)}, got {mode!r}")
    teachers = load_teachers(folder)
    if mode == "swa_means":
        members, samples_per_run = teachers.moments["mean"], 1
        name = f"Teacher ({teachers.num_runs} SWA means)"
    else:
        members = jax.jit(fixed_members, static_argnums=2)(jax.random.PRNGKey(seed), teachers.moments,
                                                           samples_per_run)
        name = f"Teacher ({teachers.num_runs}x{samples_per_run})"
    num_members = teachers.num_runs * samples_per_run

    def member_logits(args, images, key):
        member_params, model_state = args
        return jnp.moveaxis(ensemble_logits(teachers.model, member_params, images,
                                            model_state=model_state), 0, 1)

    return Predictor(name=name, kind=TEACHER_KIND,
                     member_logits=member_logits, args=(members, teachers.moments["model_state"]),
                     num_members=num_members,
                     num_params=count_params(members), sidecar=teachers.sidecars[0])
