"""The shared trainer: one jitted, data-parallel step for every method.

A method hands over
    loss_fn(params, model_state, frozen, batch, key) -> (loss, (model_state, metrics))
    eval_fn(state, frozen, batch, key) -> {name: per-example values [B]}
where `batch = {"images": uint8 [B,H,W,C], "labels": int32 [B], "mask": bool [B]}` (mask is
False on the padding of a last, short batch) and `frozen` is everything the method reads but does
not train (teacher moments, a frozen backbone), passed as an argument rather than captured, so
that it is not baked into the compiled program as a constant.

Parallelism: a 1-D `data` mesh over the devices; parameters, optimizer state and the data set are
replicated, each batch is sharded along `data`. The training set sits on the devices as uint8 and
each step gathers its rows by index inside the jitted step. Every host computes the same global
index vector, and each device receives only its slice of it (`make_array_from_callback`), which
is also how several hosts each feed only their part of a global batch. A data set that does not
fit streams instead (data/stream.py): each host's rows of every global batch arrive augmented
from grain workers, are prefetched onto the devices, and the step trains on them as they are.

Randomness: the step key is fold_in(PRNGKey(seed), step), so a resumed run draws exactly what an
uninterrupted one would. The epoch's order is a NumPy permutation seeded by (seed, epoch), on
both paths. Checkpoints are written at the end of every epoch and, with `checkpoint_every`, every
that many steps; each records the data position (epoch, batch), so a run resumed in the middle of
an epoch continues with the batch it would have seen next.

Runs trained together (MultiSWAG's R runs, `Trainer(run_seeds=...)`): the state's leaves carry a
leading axis R, one compiled step trains every run on its own rows and key
(make_runs_train_step), and the same epochs, checkpoints, validation and logs serve them, with
each run's metrics logged as `seed<s>/train/<name>` and `seed<s>/val/<name>`.
"""
import collections
import copy
import dataclasses
import functools
import math
import time
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.stream import Stream, epoch_order
from utils.checkpoints import RunCheckpoints
from utils.errors import UserError
from utils.logging import RunLogger, progress


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any  # non-trained collections (BatchNorm statistics); {} for FRN nets
    opt_state: Any
    ema_params: Any = None  # an exponential moving average of params, when asked for

    @classmethod
    def create(cls, params, optimizer, model_state=None, ema: bool = False):
        return cls(step=jnp.zeros([], jnp.int32), params=params, model_state=model_state or {},
                   opt_state=optimizer.init(params),
                   ema_params=jax.tree.map(jnp.copy, params) if ema else None)

    @property
    def eval_params(self):
        return self.params if self.ema_params is None else self.ema_params


def init_variables(model, rngs, image_shape):
    """(params, model_state) of a Flax model initialised on one blank image of `image_shape`
    (H, W, C): a data set's `image_shape` (no network here initialises from its input's values)."""
    try:
        hash(model)
        init = functools.partial(_jit_init, model)
    except TypeError:  # a module with an unhashable attribute: compiled for itself
        init = jax.jit(model.init)
    variables = dict(init(rngs, jnp.zeros((1, *image_shape), jnp.float32)))
    return variables.pop("params"), variables


# The model is a static argument: runs of one architecture (other seeds) reuse one compilation.
_jit_init = jax.jit(lambda model, rngs, images: model.init(rngs, images), static_argnums=0)


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh):
    return NamedSharding(mesh, PartitionSpec("data"))


def to_global(host_array: np.ndarray, sharding) -> jax.Array:
    """A global array from a host array every process holds; each device reads only its slice."""
    host_array = np.asarray(host_array)
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def put_replicated(tree, mesh):
    return jax.tree.map(lambda x: to_global(np.asarray(x), replicated(mesh)), tree)


def device_step_inputs(frozen, images, labels, indices, mask, mesh) -> tuple:
    """One on-device training step's inputs after the state, placed as Trainer.fit places them:
    `frozen` and the uint8 training set replicated, the batch's indices and mask along `data`."""
    return (put_replicated(frozen, mesh), to_global(images, replicated(mesh)),
            to_global(np.asarray(labels, np.int32), replicated(mesh)),
            to_global(np.asarray(indices, np.int32), batch_sharded(mesh)),
            to_global(np.asarray(mask, bool), batch_sharded(mesh)))


def masked_mean(values, mask):
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def prediction_metrics(log_probs, labels, prefix: str = "") -> dict:
    """Per-example accuracy and NLL of log-probabilities [B, K] (an eval_fn's usual output)."""
    return {f"{prefix}acc": (jnp.argmax(log_probs, -1) == labels).astype(jnp.float32),
            f"{prefix}nll": -jnp.take_along_axis(log_probs, labels[:, None], 1)[:, 0]}


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps per epoch: every example once, the last batch padded."""
    return math.ceil(num_examples / batch_size)


def batch_step_fn(loss_fn, optimizer, ema_decay: float, data_sharding=None):
    """The unjitted step of one run on a batch, `step(state, seed, frozen, batch)`: its key is
    fold_in(PRNGKey(seed), state.step), `seed` an int or a traced int32 scalar."""

    def step(state: TrainState, seed, frozen, batch):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        if data_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, data_sharding)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (model_state, metrics)), grads = grad_fn(state.params, state.model_state, frozen,
                                                        batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_params is not None:
            ema_params = optax.incremental_update(params, ema_params, 1.0 - ema_decay)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
        new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                                  opt_state=opt_state, ema_params=ema_params)
        return new_state, metrics

    return step


def train_step_fn(loss_fn, optimizer, ema_decay: float, data_sharding=None):
    """The on-device path's unjitted step, `step(state, seed, frozen, images, labels, indices,
    mask)`: the batch is gathered by index from the data set on the devices."""
    step = batch_step_fn(loss_fn, optimizer, ema_decay, data_sharding)

    def train_step(state: TrainState, seed, frozen, images, labels, indices, mask):
        return step(state, seed, frozen, {"images": images[indices], "labels": labels[indices],
                                          "mask": mask})

    return train_step


# XLA:CPU's YNNPACK library fusions limited to reductions and dots. Its default also takes the
# convolutions, and runs their weight gradients (batch-as-feature convolutions behind two
# transposes of the activations) about 3x slower than XLA's own kernels; without them the
# training steps measured 1.03-1.31x faster (bench/gendd_cpu_profile.md).
CPU_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                    "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def step_compiler_options() -> Optional[dict]:
    """The XLA options training steps compile with: CPU_STEP_OPTIONS on the CPU where this
    jaxlib takes them (the option is experimental: a later XLA may rename it, and then XLA's
    defaults stay), else none."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_STEP_OPTIONS).lower(np.float32(0)).compile()
    except Exception:  # an unknown option or value
        return None
    return CPU_STEP_OPTIONS


def jit_step(step, mesh, xla_defaults: bool = False):
    """A training step jitted: its state (first argument) donated, its outputs replicated,
    compiled with step_compiler_options() unless `xla_defaults` (the benchmarks' baseline)."""
    return jax.jit(step, donate_argnums=0, out_shardings=replicated(mesh),
                   compiler_options=None if xla_defaults else step_compiler_options())


def make_train_step(loss_fn, optimizer, seed: int, ema_decay: float, mesh, xla_defaults: bool = False):
    step = train_step_fn(loss_fn, optimizer, ema_decay, batch_sharded(mesh))
    return jit_step(lambda state, *args: step(state, seed, *args), mesh, xla_defaults)


def make_stream_train_step(loss_fn, optimizer, seed: int, ema_decay: float, mesh):
    """The streaming path's step, `step(state, frozen, batch)` on a batch already on the mesh."""
    step = batch_step_fn(loss_fn, optimizer, ema_decay, batch_sharded(mesh))
    return jit_step(lambda state, frozen, batch: step(state, seed, frozen, batch), mesh)


def to_mesh(host_batch: dict, mesh) -> dict:
    """This host's rows of a global batch -> global arrays sharded along `data`."""
    sharding = batch_sharded(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(rows))
            for name, rows in host_batch.items()}


def prefetched(host_batches, mesh, size: int = 2):
    """Host batches put on the mesh `size` ahead of their use: the copies overlap the steps."""
    queue = collections.deque()
    for host_batch in host_batches:
        queue.append(to_mesh(host_batch, mesh))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def make_runs_train_step(loss_fn, optimizer, ema_decay: float, mesh, vectorize=None):
    """One compiled step of R independent runs (MultiSWAG trained together):
    `step(states, seeds [R], frozen, images, labels, indices [R,B], masks [R,B])`, `states` a
    TrainState whose leaves carry a leading axis R. Run r is exactly the single-run step of
    seed r on its own batch (each run gathers its own rows), its own key and optimizer state.
    `vectorize` (default: on any backend but the CPU) vmaps the runs; otherwise lax.map runs
    them in sequence inside the one program. Batches are not sharded along `data` here: the
    runs axis is the parallelism."""
    step = train_step_fn(loss_fn, optimizer, ema_decay)
    vectorize = jax.default_backend() != "cpu" if vectorize is None else vectorize

    def runs_step(states, seeds, frozen, images, labels, indices, masks):
        one = lambda state, seed, index, mask: step(state, seed, frozen, images, labels, index, mask)
        if vectorize:
            return jax.vmap(one)(states, seeds, indices, masks)
        return jax.lax.map(lambda args: one(*args), (states, seeds, indices, masks))

    return jit_step(runs_step, mesh)


def runs_epoch_order(seeds, epoch: int, num_examples: int, batch_size: int):
    """epoch_order of every run, stacked: indices and masks [S, R, B] (step-major)."""
    orders = [epoch_order(seed, epoch, num_examples, batch_size) for seed in seeds]
    return (np.stack([o[0] for o in orders], 1), np.stack([o[1] for o in orders], 1))


def stack_runs(states):
    """R pytrees of the same structure -> one whose leaves carry a leading axis R."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def run_of(stacked, r: int):
    """Run r's pytree out of one stacked over runs (leading axis R)."""
    return jax.tree.map(lambda leaf: leaf[r], stacked)


def unstack_runs(stacked, num_runs: int):
    return [run_of(stacked, r) for r in range(num_runs)]


def jit_batch_fn(fn, mesh):
    """Jit a per-batch function `fn(args, batch, key)` once, replicating its outputs.

    The jitted function takes (args, batch, key, batch_index) and folds the index into the key
    on the device (an eager fold_in per batch costs more than the batch itself on CPU).
    """
    return jax.jit(lambda args, batch, key, index: fn(args, batch, jax.random.fold_in(key, index)),
                   out_shardings=replicated(mesh))


def map_batches(jitted_fn, args, images: np.ndarray, labels: np.ndarray, *, batch_size: int, mesh,
                key=None, desc: Optional[str] = None):
    """Apply `jit_batch_fn(fn)`, fn(args, batch, key) -> pytree of [B, ...], over a data set.

    Returns the outputs for the real rows only, as NumPy arrays [N, ...]. The last batch is
    padded (mask False) so every call has the same shape and compiles once.
    """
    num_examples = len(images)
    if batch_size % mesh.size:
        raise UserError(f"batch size {batch_size} is not a multiple of the {mesh.size} devices")
    key = jax.random.PRNGKey(0) if key is None else key
    sharding = batch_sharded(mesh)
    starts = range(0, num_examples, batch_size)

    def dispatched():
        for batch_index, start in enumerate(starts if desc is None else progress(starts, desc)):
            stop = min(start + batch_size, num_examples)
            rows = np.concatenate([np.arange(start, stop), np.zeros(batch_size - (stop - start), np.int64)])
            batch = {"images": to_global(images[rows], sharding),
                     "labels": to_global(labels[rows].astype(np.int32), sharding),
                     "mask": to_global(np.arange(batch_size) < stop - start, sharding)}
            yield jitted_fn(args, batch, key, batch_index), stop - start

    return _collect(dispatched())


# Batches dispatched ahead of the fetch of their outputs: enough to overlap host transfers with
# device work; a whole set queued at once (hundreds of programs with collectives on simulated CPU
# devices) made XLA's collectives time out.
MAX_IN_FLIGHT = 8


def _collect(dispatched):
    """(device outputs, real rows) pairs -> the real rows' outputs as NumPy, concatenated; at
    most MAX_IN_FLIGHT batches run ahead of the fetches."""
    pending, fetched = collections.deque(), []

    def fetch(outputs, rows):
        return jax.tree.map(lambda x: np.asarray(x)[:rows], outputs)

    for item in dispatched:
        pending.append(item)
        if len(pending) > MAX_IN_FLIGHT:
            fetched.append(fetch(*pending.popleft()))
    fetched += [fetch(*item) for item in pending]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *fetched)


def map_stream(jitted_fn, args, stream: Stream, *, mesh, key=None, desc: Optional[str] = None):
    """map_batches over a Stream read in order: outputs for its real rows, NumPy [N, ...]."""
    key = jax.random.PRNGKey(0) if key is None else key
    _, masks = stream.order(0)
    batches = prefetched(stream.batches(0), mesh)
    if desc is not None:
        batches = progress(batches, desc, total=len(masks))
    return _collect((jitted_fn(args, batch, key, i), int(masks[i].sum()))
                    for i, batch in enumerate(batches))


def make_evaluator(eval_fn, mesh):
    """`evaluate(state, frozen, split, batch_size, key)` -> means of eval_fn's per-example values."""
    jitted = jit_batch_fn(lambda args, batch, key: eval_fn(args[0], args[1], batch, key), mesh)

    def evaluate(state, frozen, split, *, batch_size, key=None, desc=None) -> dict:
        """`split`: an on-device Split, or a Stream (which has its own batch size)."""
        if isinstance(split, Stream):
            per_example = map_stream(jitted, (state, frozen), split, mesh=mesh, key=key, desc=desc)
        else:
            per_example = map_batches(jitted, (state, frozen), split.images, split.labels,
                                      batch_size=batch_size, mesh=mesh, key=key, desc=desc)
        return {name: float(np.mean(values)) for name, values in per_example.items()}

    return evaluate


@dataclasses.dataclass
class Trainer:
    """Runs a method's loss over epochs: shuffling, stepping, validation, checkpoints, logs."""

    run_dir: str
    optimizer: optax.GradientTransformation
    loss_fn: Callable
    eval_fn: Callable
    seed: int
    batch_size: int
    num_epochs: int
    mesh: Mesh = None
    select_metric: Optional[str] = "nll"  # validation metric that picks the best checkpoint
    select_mode: Optional[str] = None  # "max" or "min"; default: "max" for an accuracy
    ema_decay: float = 0.0
    eval_every: int = 1
    log_every: int = 50
    keep_checkpoints: int = 2
    lr_schedule: Optional[Callable] = None  # only to log the learning rate
    logger: Optional[RunLogger] = None
    # A loss explosion: |training loss| above this times max(1, |the first logged loss|); 0: off
    divergence_factor: float = 1e4
    checkpoint_every: int = 0  # steps between checkpoints inside an epoch; 0: at epoch ends only
    # Runs trained together: their seeds (the state stacked over them; each run's data order,
    # step keys and validation key are its seed's); None: one run of `seed`.
    run_seeds: Optional[Sequence[int]] = None
    vectorize: Optional[bool] = None  # runs together: vmap them (default: on any backend but the CPU)

    @classmethod
    def for_run(cls, run_dir: str, config, **fields) -> "Trainer":
        """A Trainer with the keys every script's config shares (seed, optim_bs, optim_ne,
        log_every, keep_checkpoints, eval_every where the config has it, W&B logging to the run);
        `fields` are the method's own (optimizer, loss_fn, eval_fn, ...) and override any of them."""
        shared = dict(run_dir=run_dir, seed=config.seed, batch_size=config.optim_bs,
                      num_epochs=config.optim_ne, log_every=config.log_every,
                      keep_checkpoints=config.keep_checkpoints,
                      eval_every=getattr(config, "eval_every", 1),
                      divergence_factor=getattr(config, "divergence_factor", 1e4),
                      checkpoint_every=getattr(config, "checkpoint_every", 0))
        if "logger" not in fields:
            shared["logger"] = RunLogger(run_dir, config, config.wandb)
        return cls(**{**shared, **fields})

    def __post_init__(self):
        self.mesh = make_mesh() if self.mesh is None else self.mesh
        if self.select_mode is None:
            self.select_mode = "max" if (self.select_metric or "").endswith("acc") else "min"
        self.logger = self.logger or RunLogger(self.run_dir)
        self.checkpoints = RunCheckpoints(self.run_dir, keep=self.keep_checkpoints,
                                          best_mode=self.select_mode)
        if self.run_seeds is None:
            if self.batch_size % self.mesh.size:
                raise UserError(f"optim_bs {self.batch_size} must be a multiple of the "
                                f"{self.mesh.size} devices")
            self._train_step = make_train_step(self.loss_fn, self.optimizer, self.seed,
                                               self.ema_decay, self.mesh)
            self._stream_step = make_stream_train_step(self.loss_fn, self.optimizer, self.seed,
                                                       self.ema_decay, self.mesh)
        else:  # the runs axis is the parallelism: batches are not sharded along `data`
            if self.select_metric is not None:
                raise ValueError("runs trained together export their last epoch: select_metric None")
            runs_step = make_runs_train_step(self.loss_fn, self.optimizer, self.ema_decay,
                                             self.mesh, self.vectorize)
            seeds = put_replicated(np.asarray(self.run_seeds, np.int32), self.mesh)
            self._train_step = lambda states, frozen, *inputs: runs_step(states, seeds, frozen, *inputs)
        self.evaluate = make_evaluator(self.eval_fn, self.mesh)
        self.last_val = self._val_from({})  # the latest validation metrics (a dict per run together)
        self.first_loss = None  # the run's first logged training loss: divergence's scale

    def selected(self, state):
        """(state, validation metrics) of the checkpoint selected on validation, else the last."""
        restored = self.checkpoints.restore_best(state)
        if restored is None:
            return state, copy.deepcopy(self.last_val)
        best, meta = restored
        return best, {"epoch": meta.get("epoch"),
                      **{k[4:]: v for k, v in meta.items() if k.startswith("val/")}}

    def fit(self, state: TrainState, train, val, frozen=None, on_start=None) -> TrainState:
        """Train from `state`, or from the run's latest checkpoint when there is one.

        `train` and `val`: on-device Splits, or Streams (data/stream.py). `on_start(start_epoch)`
        runs once the checkpoint (if any) has been read, before the first step: a run whose
        resume fails has changed nothing. `self.trained_epochs` says how many epochs this call
        trained (a partly trained epoch counts)."""
        position = Position(0, 0, None)
        restored = self.checkpoints.restore_latest(state)
        if restored is not None:
            state, meta = restored
            position = Position(meta["epoch"], meta.get("batch", 0), meta.get("metric_sums"))
            self.first_loss = meta.get("first_loss")
            self.last_val = self._val_from(meta)
            within = f", batch {position.batch}" if position.batch else ""
            print(f"resuming {self.run_dir} from epoch {position.epoch}{within} (step {_step(state)})")
        self.logger.drop_after_epoch(position.epoch)
        self.trained_epochs = max(self.num_epochs - position.epoch, 0)
        if on_start is not None:
            on_start(position.epoch)
        try:
            return self._fit_epochs(state, train, val, frozen, position)
        except OSError as error:  # the run directory: a full disk, a read-only mount
            raise UserError(f"cannot write {error.filename or self.run_dir}: {error.strerror}; the "
                            f"checkpoints already saved are kept: fix that, then --resume "
                            f"{self.run_dir}") from None

    def _fit_epochs(self, state, train, val, frozen, position):
        state = put_replicated(state, self.mesh)
        frozen = put_replicated(frozen, self.mesh)
        if isinstance(train, Stream):
            if self.run_seeds is not None:
                raise ValueError("runs trained together read the training set on the devices, not a stream")
            if train.batch_size != self.batch_size:
                raise ValueError(f"the stream's batch {train.batch_size} is not optim_bs {self.batch_size}")
            feed = _StreamFeed(train, self.mesh, self._stream_step)
        else:
            feed = _DeviceFeed(train, self.batch_size, self.mesh, self._train_step, self._epoch_order,
                               replicated(self.mesh) if self.run_seeds is not None else batch_sharded(self.mesh))
        for epoch in range(position.epoch, self.num_epochs):
            resumed = position if epoch == position.epoch else Position(epoch, 0, None)
            state, record = self._run_epoch(state, frozen, feed, resumed)
            score = None
            if val is not None and ((epoch + 1) % self.eval_every == 0 or epoch + 1 == self.num_epochs):
                val_metrics = self._validate(state, frozen, val, epoch)
                self._check_diverged(self._named(val_metrics), state, epoch, "validation ")
                record.update(self._named(val_metrics, "val"))
                self.last_val = val_metrics
                if self.select_metric is not None:
                    score = val_metrics[self.select_metric]
            self.logger.log(record)
            self.checkpoints.save(_step(state), state,
                                  {"epoch": epoch + 1, "first_loss": self.first_loss, **record}, score=score)
        return state

    def _epoch_order(self, epoch: int, num_examples: int):
        """The epoch's indices and masks: [S, B] (data.stream.epoch_order of the seed), or
        [S, R, B] for runs trained together (each run its seed's order)."""
        if self.run_seeds is None:
            return epoch_order(self.seed, epoch, num_examples, self.batch_size)
        return runs_epoch_order(self.run_seeds, epoch, num_examples, self.batch_size)

    def _validate(self, state, frozen, val, epoch: int):
        """The validation metrics after epoch `epoch` (0-based), each run's with its seed's key;
        runs trained together: a list of them, one run's state sliced out at a time."""
        def run(state, seed):
            key = jax.random.fold_in(jax.random.PRNGKey(seed + 1), epoch)
            return self.evaluate(state, frozen, val, batch_size=self.batch_size, key=key)

        if self.run_seeds is None:
            return run(state, self.seed)
        return [run(run_of(state, r), seed) for r, seed in enumerate(self.run_seeds)]

    def _named(self, metrics, split: Optional[str] = None, count: int = 1) -> dict:
        """Metrics as flat floats divided by `count` (sums over steps -> means), keyed
        `<split>/<name>`, or `seed<s>/<split>/<name>` for each run trained together (`metrics`
        then a dict of [R] arrays or a list of R dicts); without `split`, `<name>` and
        `seed<s>/<name>`."""
        prefix = f"{split}/" if split else ""
        if self.run_seeds is None:
            return {f"{prefix}{k}": float(v) / count for k, v in metrics.items()}
        per_run = (metrics if isinstance(metrics, list) else
                   [{k: v[r] for k, v in jax.device_get(metrics).items()} for r in range(len(self.run_seeds))])
        return {f"seed{s}/{prefix}{k}": float(v) / count
                for s, values in zip(self.run_seeds, per_run) for k, v in values.items()}

    def _val_from(self, meta: dict):
        """The validation metrics a checkpoint's metadata recorded (a list per run together)."""
        if self.run_seeds is None:
            return {k[4:]: v for k, v in meta.items() if k.startswith("val/")}
        return [{k[len(f"seed{s}/val/"):]: v for k, v in meta.items() if k.startswith(f"seed{s}/val/")}
                for s in self.run_seeds]

    def _run_epoch(self, state, frozen, feed, position: "Position"):
        """The steps of epoch `position.epoch` from batch `position.batch` on; a checkpoint every
        `checkpoint_every` steps records the position and the metric sums so far."""
        epoch, num_steps = position.epoch, feed.steps_per_epoch
        sums = None if position.metric_sums is None else {
            k: jnp.asarray(v, jnp.float32) for k, v in position.metric_sums.items()}
        start = time.perf_counter()
        bar = progress(range(position.batch, num_steps), f"epoch {epoch + 1}/{self.num_epochs}")
        for i, inputs in zip(bar, feed.inputs(epoch, position.batch)):
            state, metrics = feed.step(state, frozen, *inputs)
            sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
            if (i + 1) % self.log_every == 0 or i + 1 == num_steps:
                means = self._named(sums, count=i + 1)
                self._check_diverged(means, state, epoch)
                bar.set_postfix(loss=f"{np.mean(_losses(means)):.4g}")
            step = _step(state) if self.checkpoint_every else 0
            if self.checkpoint_every and step % self.checkpoint_every == 0 and i + 1 < num_steps:
                self.checkpoints.save(step, state, {
                    "epoch": epoch, "batch": i + 1, "first_loss": self.first_loss,
                    "metric_sums": {k: np.asarray(v).tolist() for k, v in sums.items()}})
        step = _step(state)
        record = {"epoch": epoch + 1, "step": step, **self._named(sums, "train", num_steps),
                  "time/epoch_s": round(time.perf_counter() - start, 3)}
        if self.lr_schedule is not None:
            record["train/lr"] = float(self.lr_schedule(step - 1))  # the epoch's last update
        return state, record

    def _check_diverged(self, means, state, epoch, what: str = ""):
        """Stop when a metric is not finite, or the training loss explodes (grows beyond
        divergence_factor times the scale of the first loss logged), keeping the checkpoints
        already written: this epoch's is not, so the last one kept had a finite, unexploded
        training loss and finite validation metrics."""
        bad = {k: v for k, v in means.items() if not np.isfinite(v)}
        problem = f"non-finite {what}{bad}"
        if not bad and _losses(means):
            loss = max(_losses(means), key=abs)  # runs together: the farthest run's
            if self.first_loss is None:
                self.first_loss = loss
            limit = self.divergence_factor * max(1.0, abs(self.first_loss))
            if not self.divergence_factor or abs(loss) <= limit:
                return
            problem = (f"the training loss exploded to {loss:.4g} (first logged: "
                       f"{self.first_loss:.4g}; the limit divergence_factor x max(1, that) is {limit:.4g})")
        elif not bad:
            return
        last = self.checkpoints.latest.latest_step()
        kept = (f"the last good checkpoint (step {last}) is kept in {self.run_dir}/checkpoints"
                if last is not None else "no checkpoint was written yet")
        raise UserError(f"training stopped in epoch {epoch + 1} at step {_step(state)}: "
                        f"{problem}; {kept}; lower optim_lr or check the data")


def _step(state) -> int:
    """The state's optimizer step (runs trained together all share it)."""
    return int(state.step if state.step.ndim == 0 else state.step[0])


def _losses(means: dict) -> list:
    """The training losses among named metrics (`loss`, or each run's `seed<s>/loss`)."""
    return [v for k, v in means.items() if k == "loss" or k.endswith("/loss")]


@dataclasses.dataclass(frozen=True)
class Position:
    """Where training stands: `batch` batches of epoch `epoch` done (0: at the epoch's start),
    and the sums of the step metrics so far in that epoch."""

    epoch: int
    batch: int
    metric_sums: Optional[dict]


class _DeviceFeed:
    """The on-device path: the training set on every device, each step gathering its rows by
    the indices of `order(epoch, num_examples)`, put on the mesh with `index_sharding`: along
    `data` for one run, replicated for runs trained together (each run gathers its own rows)."""

    def __init__(self, split, batch_size: int, mesh, step, order, index_sharding):
        self.step, self.order, self.index_sharding = step, order, index_sharding
        self.num_examples = len(split.images)
        self.images = to_global(split.images, replicated(mesh))
        self.labels = to_global(split.labels.astype(np.int32), replicated(mesh))
        self.steps_per_epoch = steps_per_epoch(self.num_examples, batch_size)

    def inputs(self, epoch: int, start: int):
        indices, masks = self.order(epoch, self.num_examples)
        for i in range(start, len(indices)):
            yield (self.images, self.labels, to_global(indices[i], self.index_sharding),
                   to_global(masks[i], self.index_sharding))


class _StreamFeed:
    """The streaming path: this host's rows of each global batch from grain, prefetched."""

    def __init__(self, stream: Stream, mesh, step):
        self.stream, self.mesh, self.step = stream, mesh, step
        self.steps_per_epoch = stream.steps_per_epoch

    def inputs(self, epoch: int, start: int):
        for batch in prefetched(self.stream.batches(epoch, start), self.mesh):
            yield (batch,)
