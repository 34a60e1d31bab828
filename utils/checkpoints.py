"""The one orbax wrapper: training checkpoints (resume, best) and exported models with sidecars.

A run directory holds
    checkpoints/<step>/   the latest train states (orbax CheckpointManager, atomic, last N kept)
    best/<step>/          the train state with the best validation score (selection on val only)
    model/                the exported model: arrays (orbax) + sidecar.json, loadable on its own
An export's sidecar says what the arrays are (kind, architecture, data set, classes, seed,
metrics), so a teacher run or a student loads without its training config.
"""
import fcntl
import hashlib
import json
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from utils.errors import UserError, first_line

SIDECAR = "sidecar.json"


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _first_difference(ours: dict, theirs: dict):
    """The first name (sorted) whose value differs between two {name: value} maps, else None."""
    return next((name for name in sorted(set(ours) | set(theirs)) if ours.get(name) != theirs.get(name)),
                None)


def _shapes(tree) -> dict:
    """{leaf path a/b/0: "dtype[shape]"} of arrays, or of orbax's metadata of them (which keeps
    a named tuple's fields as dict keys: the path is spelled without brackets or dots)."""
    return {"/".join(re.findall(r"\w+", jax.tree_util.keystr(path))):
            f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _host_copy(leaf):
    """A NumPy copy of a replicated array (each process's first shard is the whole array)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(leaf.addressable_data(0))
    return np.asarray(leaf)


class RunCheckpoints:
    """Latest train states for resuming, plus the best one by a validation score.

    Each checkpoint's meta records the SHA-256 of every state array, so a damaged checkpoint
    is reported as corrupt on restore instead of resuming from garbage (orbax reads some
    damaged chunks without complaint); a checkpoint of another run's shapes is reported as not
    matching this run, naming the first array that differs."""

    HASHES = "state_sha256"

    def __init__(self, run_dir: str, keep: int = 2, best_mode: str = "min"):
        self.best_mode = best_mode
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        # The two managers save the same step concurrently; on several hosts each needs its own
        # barrier names, or their barriers collide ("already ongoing") and the run hangs.
        self.latest = ocp.CheckpointManager(
            os.path.abspath(os.path.join(run_dir, "checkpoints")), item_handlers=handlers,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="latest")))
        self.best = ocp.CheckpointManager(
            os.path.abspath(os.path.join(run_dir, "best")), item_handlers=dict(handlers),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_mode=best_mode, cleanup_tmp_directories=True,
                best_fn=lambda metrics: metrics["score"], keep_checkpoints_without_metrics=False,
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="best")))

    def save(self, step: int, state, meta: dict, score=None):
        """Save and wait until the checkpoint is on disk: a save that fails (a full disk, a
        read-only directory) stops the run now, not an epoch later."""
        meta = {**meta, self.HASHES: array_hashes(jax.tree.map(_host_copy, state))}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            self.latest.save(step, args=args)
            if score is not None and np.isfinite(score):
                self.best.save(step, args=args, metrics={"score": float(score)})
            self.wait()
        except Exception as error:  # orbax and tensorstore wrap OS errors in several types
            raise UserError(f"cannot save the checkpoint of step {step} in "
                            f"{os.path.dirname(self.latest.directory)}: {first_line(error)}; "
                            f"the checkpoints already there are kept") from None

    def wait(self):
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def _restore(self, manager, like_state):
        step = manager.latest_step() if manager is self.latest else manager.best_step()
        if step is None:
            return None
        where = f"checkpoint {manager.directory}/{step}"
        older = [s for s in manager.all_steps() if s < step]
        remedy = (f"; delete it to resume from step {max(older)}" if older and manager is self.latest
                  else "")
        try:
            stored = manager.item_metadata(step)["state"]
            stored = _shapes(getattr(stored, "tree", stored))
        except Exception as error:
            raise UserError(f"{where} is corrupt (its metadata cannot be read: "
                            f"{first_line(error)}){remedy}") from None
        expected = _shapes(like_state)
        name = _first_difference(stored, expected)
        if name is not None:
            raise UserError(f"{where} does not match this run: array {name} is "
                            f"{stored.get(name, 'absent')} there, {expected.get(name, 'absent')} "
                            f"here (another run's checkpoint, or changed model keys?)")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(like_state)), meta=ocp.args.JsonRestore()))
        except Exception as error:  # orbax raises many types; name the place and the cause
            raise UserError(f"{where} is corrupt (a file is truncated or damaged: "
                            f"{first_line(error)}){remedy}") from None
        meta = dict(restored.meta)
        recorded = meta.pop(self.HASHES, None)
        if recorded is not None:
            damaged = _first_difference(recorded, array_hashes(jax.tree.map(np.asarray, restored.state)))
            if damaged is not None:
                raise UserError(f"{where} is corrupt: array {damaged} differs from the hash "
                                f"recorded when it was saved{remedy}")
        return restored.state, meta

    def restore_latest(self, like_state):
        """(state, meta) of the newest checkpoint, or None when there is none."""
        return self._restore(self.latest, like_state)

    def restore_best(self, like_state):
        return self._restore(self.best, like_state)

    def close(self):
        self.wait()
        self.latest.close()
        self.best.close()


def array_hashes(arrays) -> dict:
    """{leaf path: SHA-256 of its dtype, shape and bytes}: what an export's sidecar records."""
    hashes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]:
        leaf = np.ascontiguousarray(leaf)
        digest = hashlib.sha256(f"{leaf.dtype.str}{leaf.shape}".encode())
        digest.update(leaf.tobytes())
        hashes[jax.tree_util.keystr(path)] = digest.hexdigest()
    return hashes


def save_export(directory: str, arrays, sidecar: dict, replace: bool = False):
    """Write arrays (a dict pytree) and a JSON sidecar holding their hashes, atomically: into a
    temporary directory renamed into place once complete, so `directory` never holds half an
    export. An existing export is refused, unless `replace` (a run that trained further), in
    which case it is swapped out only once the new one is complete."""
    directory = os.path.abspath(directory)
    exists = os.path.exists(os.path.join(directory, SIDECAR))
    if exists and not replace:
        raise UserError(f"{directory} already holds an exported model; not overwriting it")
    arrays = jax.tree.map(np.asarray, arrays)
    partial = f"{directory}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        os.makedirs(partial)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(partial, "arrays"), arrays)
        with open(os.path.join(partial, SIDECAR), "w") as f:
            json.dump({**sidecar, "array_sha256": array_hashes(arrays)}, f, indent=1, default=float)
    except Exception as error:  # an OSError, or orbax's wrapping of one (a full disk, read-only)
        shutil.rmtree(partial, ignore_errors=True)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
        raise UserError(f"cannot write the export {directory}: {reason}") from None
    if os.path.isdir(directory):  # a complete export being replaced, or a leftover without a sidecar
        old = f"{directory}.old-{os.getpid()}"
        os.replace(directory, old)
        os.replace(partial, directory)
        shutil.rmtree(old)
    else:
        os.replace(partial, directory)


def read_sidecar(directory: str, kind: str | None = None) -> dict:
    path = os.path.join(directory, SIDECAR)
    if not os.path.exists(path):
        raise UserError(f"{directory} is not an exported model: {SIDECAR} is missing")
    try:
        with open(path) as f:
            sidecar = json.load(f)
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is corrupt: {error}") from None
    if kind is not None and sidecar.get("kind") != kind:
        raise UserError(f"{path} holds a {sidecar.get('kind')!r}, expected a {kind!r}")
    return sidecar


def load_export(directory: str, kind: str | None = None):
    """(arrays as NumPy, sidecar) of an export written by `save_export`, checked against the
    hashes its sidecar records (exports written before hashes were recorded load unchecked)."""
    sidecar = read_sidecar(directory, kind)
    path = os.path.abspath(os.path.join(directory, "arrays"))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            arrays = checkpointer.restore(path)
    except Exception as error:
        raise UserError(f"cannot read the arrays of {directory}: {first_line(error)}") from None
    arrays = jax.tree.map(np.asarray, arrays)
    expected = sidecar.get("array_sha256")
    if expected is not None:
        name = _first_difference(expected, array_hashes(arrays))
        if name is not None:
            raise UserError(f"{directory} is corrupt: array {name} does not match the hash in "
                            f"its {SIDECAR} (files changed after the export was written)")
    return arrays, sidecar


class RunLock:
    """One process per run directory: an OS lock on <run>/.lock, released when the process
    ends, however it ends. Taken by the first host only (the others write no files)."""

    def __init__(self, run_dir: str):
        self.file = None
        if jax.process_index() != 0:
            return
        self.file = open(os.path.join(run_dir, ".lock"), "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"{run_dir} is in use by {holder}; one process per run directory") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()}")
        self.file.flush()

    def release(self):
        if self.file is not None:
            self.file.close()  # closing drops the lock
            self.file = None


def find_exports(path: str) -> list[str]:
    """The exports that `path` names: itself, its model/ (a run directory), or the model/ of
    each run directory inside it (a folder of runs, e.g. MultiSWAG teachers); [] if none."""
    for directory in (path, os.path.join(path, "model")):
        if os.path.exists(os.path.join(directory, SIDECAR)):
            return [directory]
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(path, d, "model") for d in os.listdir(path)
                  if os.path.exists(os.path.join(path, d, "model", SIDECAR)))


def find_export(path: str, what: str = "model") -> str:
    """The one export that `path` names: the export itself, or a run directory's model/."""
    exports = find_exports(path)
    if len(exports) > 1:
        raise UserError(f"{what} {path} holds several runs: give one run directory")
    if not exports:
        raise UserError(f"{what} {path}: no exported model there (expected {path}/{SIDECAR} or "
                        f"{path}/model/{SIDECAR})")
    return exports[0]


def resnet_export(model, params, model_state) -> tuple[dict, dict]:
    """(arrays, sidecar) of a zoo network (a KD student, a plain teacher), loadable without its
    config by `load_resnet`."""
    from models.resnet import resnet_spec

    return ({"params": params, "model_state": model_state},
            {"kind": "resnet", "model": resnet_spec(model), "num_classes": model.num_classes})


def save_resnet(directory: str, model, params, model_state, **info):
    arrays, sidecar = resnet_export(model, params, model_state)
    save_export(directory, arrays, {**sidecar, **info})


def check_variables(directory: str, model, variables: dict):
    """The arrays of an export against the network its sidecar describes (a sidecar edited, or
    copied from another export): one line naming the first array that differs."""
    import jax.numpy as jnp

    channels = len(getattr(model, "pixel_mean", (0, 0, 0)))
    size = getattr(model, "input_size", 32)
    rngs = {name: jax.random.PRNGKey(0) for name in ("params", "noise", "dropout")}
    expected = _shapes(jax.eval_shape(model.init, rngs, jnp.zeros((1, size, size, channels))))
    found = _shapes(variables)
    name = _first_difference(expected, found)
    if name is not None:
        raise UserError(f"{directory}: its {SIDECAR} describes a network whose {name} is "
                        f"{expected.get(name, 'absent')}, but its arrays hold "
                        f"{found.get(name, 'none')} (a sidecar that is not this export's?)")


def load_resnet(directory: str, dtype=None):
    """(model, variables, sidecar) of an exported zoo network, its arrays checked against the
    architecture its sidecar names."""
    import jax.numpy as jnp

    from models.resnet import resnet_from_spec

    arrays, sidecar = load_export(directory, kind="resnet")
    model = resnet_from_spec(sidecar["model"], dtype=dtype or jnp.float32)
    variables = {"params": arrays["params"], **arrays.get("model_state", {})}
    check_variables(directory, model, variables)
    return model, variables, sidecar
