"""Tests of utils/checkpoints.py: exports (arrays + sidecar) written and read back, their errors,
finding an export from a run directory, the ResNet export, and RunCheckpoints (latest and best)."""
import json
import os
import re

import jax
import numpy as np
import pytest

from utils.checkpoints import (SIDECAR, RunCheckpoints, find_export, load_export, load_resnet,
                               read_sidecar, resnet_export, save_export, save_resnet)
from utils.errors import UserError


def nested_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"params": {"dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                                 "bias": rng.normal(size=(4,)).astype(np.float32)},
                       "scale": np.float32(rng.normal())},
            "counts": np.arange(5, dtype=np.int32)}


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------------------------- exports


def test_export_round_trip(tmp_path):
    directory = str(tmp_path / "export")
    arrays = nested_arrays()
    sidecar = {"kind": "thing", "seed": 7, "val": {"nll": np.float32(0.25)}, "names": ["a", "b"]}
    save_export(directory, arrays, sidecar)
    with open(os.path.join(directory, SIDECAR)) as f:  # plain JSON on disk, NumPy scalars as floats
        on_disk = json.load(f)
    hashes = on_disk.pop("array_sha256")
    assert on_disk == {"kind": "thing", "seed": 7, "val": {"nll": 0.25}, "names": ["a", "b"]}
    assert sorted(hashes) == sorted(jax.tree_util.keystr(p) for p, _ in
                                    jax.tree_util.tree_flatten_with_path(arrays)[0])
    on_disk["array_sha256"] = hashes
    loaded, read_back = load_export(directory)
    assert read_back == on_disk
    assert_trees_equal(loaded, arrays)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
    loaded, _ = load_export(directory, kind="thing")
    assert_trees_equal(loaded, arrays)
    assert read_sidecar(directory, kind="thing") == on_disk


def test_save_export_accepts_jax_arrays_and_refuses_to_overwrite(tmp_path):
    directory = str(tmp_path / "export")
    arrays = jax.tree.map(jax.numpy.asarray, nested_arrays(1))
    save_export(directory, arrays, {"kind": "thing"})
    with pytest.raises(UserError, match="already holds an exported model"):
        save_export(directory, nested_arrays(2), {"kind": "other"})
    loaded, sidecar = load_export(directory)  # the first export is intact
    assert sidecar["kind"] == "thing"
    assert_trees_equal(loaded, nested_arrays(1))


def test_changed_arrays_are_reported_as_corrupt(tmp_path):
    """Arrays rewritten under an export (random bytes, another model's values) no longer match
    the hashes its sidecar recorded: loading names the export and the array."""
    import orbax.checkpoint as ocp

    directory = tmp_path / "export"
    save_export(str(directory), nested_arrays(1), {"kind": "thing"})
    tampered = nested_arrays(1)
    tampered["counts"] = tampered["counts"] + 1  # one array, changed
    import shutil

    shutil.rmtree(directory / "arrays")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(str(directory / "arrays"), tampered)
    with pytest.raises(UserError, match=r"is corrupt: array \['counts'\]"):
        load_export(str(directory))


def test_a_failed_export_leaves_nothing_and_replace_is_atomic(tmp_path, monkeypatch):
    import utils.checkpoints as checkpoints

    directory = tmp_path / "run" / "model"
    save_export(str(directory), nested_arrays(1), {"kind": "thing", "n": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:  # the sidecar cannot be written: the old export stays
        patch.setattr(checkpoints.json, "dump", full_disk)
        with pytest.raises(UserError, match="No space left on device"):
            save_export(str(directory), nested_arrays(2), {"kind": "thing", "n": 2}, replace=True)
    assert sorted(os.listdir(tmp_path / "run")) == ["model"]
    assert load_export(str(directory))[1]["n"] == 1
    save_export(str(directory), nested_arrays(2), {"kind": "thing", "n": 2}, replace=True)
    loaded, sidecar = load_export(str(directory))
    assert sidecar["n"] == 2 and sorted(os.listdir(tmp_path / "run")) == ["model"]
    assert_trees_equal(loaded, nested_arrays(2))


def test_read_sidecar_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    missing.mkdir()
    with pytest.raises(UserError, match="is missing") as error:
        read_sidecar(str(missing))
    assert str(missing) in str(error.value)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / SIDECAR).write_text('{"kind": "thing",')
    with pytest.raises(UserError, match="corrupt") as error:
        read_sidecar(str(corrupt))
    assert str(corrupt / SIDECAR) in str(error.value)
    save_export(str(tmp_path / "ok"), {"x": np.zeros(2)}, {"kind": "swag"})
    with pytest.raises(UserError) as error:
        read_sidecar(str(tmp_path / "ok"), kind="resnet")
    message = str(error.value)
    assert str(tmp_path / "ok" / SIDECAR) in message and "'swag'" in message and "'resnet'" in message
    with pytest.raises(UserError, match="'resnet'"):
        load_export(str(tmp_path / "ok"), kind="resnet")


def test_load_export_with_missing_arrays_is_a_user_error(tmp_path):
    directory = tmp_path / "half"
    directory.mkdir()
    (directory / SIDECAR).write_text('{"kind": "thing"}')
    with pytest.raises(UserError, match="cannot read the arrays") as error:
        load_export(str(directory))
    assert str(directory) in str(error.value)


def test_find_export(tmp_path):
    run = tmp_path / "runs" / "run1"
    save_export(str(run / "model"), {"x": np.ones(2)}, {"kind": "thing"})
    assert find_export(str(run / "model")) == str(run / "model")  # the export itself
    assert find_export(str(run)) == os.path.join(str(run), "model")  # a run directory
    save_export(str(tmp_path / "runs" / "run2" / "model"), {"x": np.ones(2)}, {"kind": "thing"})
    with pytest.raises(UserError, match="several runs") as error:
        find_export(str(tmp_path / "runs"), "teacher_dir")
    assert str(error.value).startswith("teacher_dir ")
    empty = tmp_path / "empty"
    empty.mkdir()
    for path in (empty, tmp_path / "does-not-exist"):
        with pytest.raises(UserError, match="no exported model there") as error:
            find_export(str(path), "student")
        assert str(error.value).startswith(f"student {path}")


# ----------------------------------------------------------------------------- ResNet export


def random_variables(model, images, seed):
    """Random variables of the model's structure (eval_shape: no slow initialisers run); BatchNorm
    variances positive."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if "var" in jax.tree_util.keystr(path):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return (0.5 * rng.normal(size=leaf.shape)).astype(np.float32)

    return dict(jax.tree_util.tree_map_with_path(fill, shapes))


@pytest.mark.parametrize("norm", ["frn", "bn"])
def test_resnet_export_round_trip_gives_the_same_logits(tmp_path, norm):
    from models.resnet import ResNet

    model = ResNet(num_classes=3, depth=8, width=1, planes=4, norm=norm, activation="relu",
                   pixel_mean=(0.5,), pixel_std=(0.25,))
    images = jax.random.uniform(jax.random.PRNGKey(0), (5, 12, 12, 1))
    variables = random_variables(model, images, 1)
    params = variables.pop("params")
    model_state = variables  # {} for FRN, {"batch_stats": ...} for BatchNorm
    apply = jax.jit(model.apply)
    expected = apply({"params": params, **model_state}, images)

    arrays, sidecar = resnet_export(model, params, model_state)
    assert sidecar["kind"] == "resnet" and sidecar["num_classes"] == 3
    json.dumps(sidecar)  # JSON-able as it is

    directory = str(tmp_path / "model")
    save_resnet(directory, model, params, model_state, seed=3, data_name="FashionMNIST_x28")
    loaded_model, loaded_vars, loaded_sidecar = load_resnet(directory)
    assert loaded_sidecar["seed"] == 3 and loaded_sidecar["data_name"] == "FashionMNIST_x28"
    assert loaded_model == model  # the same architecture, rebuilt from the sidecar alone
    assert_trees_equal(loaded_vars, {"params": params, **model_state})
    np.testing.assert_allclose(jax.jit(loaded_model.apply)(loaded_vars, images), expected,
                               rtol=1e-6, atol=1e-6)
    if norm == "bn":  # the statistics matter: other ones give other logits
        other = jax.tree.map(lambda x: x * 1.5, model_state)
        assert np.abs(np.asarray(apply({"params": params, **other}, images)) - expected).max() > 1e-4
    save_export(str(tmp_path / "other"), {"x": np.ones(1)}, {"kind": "edfm"})
    with pytest.raises(UserError, match="expected a 'resnet'"):
        load_resnet(str(tmp_path / "other"))
    # a sidecar that disagrees with its arrays (edited, or another export's) is one line
    with open(os.path.join(directory, SIDECAR)) as f:
        edited = json.load(f)
    edited["model"]["width"] = 2
    with open(os.path.join(directory, SIDECAR), "w") as f:
        json.dump(edited, f)
    first = "batch_stats/stage0_block0_norm1/mean" if norm == "bn" else "params/classifier/kernel"
    with pytest.raises(UserError, match=f"{SIDECAR} describes a network whose {first} is float32"):
        load_resnet(directory)


# --------------------------------------------------------------------------- RunCheckpoints


def state_at(step):
    return {"w": np.full((3,), float(step), np.float32), "step": np.asarray(step, np.int32)}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_run_checkpoints_latest_and_best(tmp_path, mode):
    scores = {1: 0.5, 2: 0.2, 3: float("nan"), 4: 0.9, 5: 0.4}
    finite = {s: v for s, v in scores.items() if np.isfinite(v)}
    best_step = (min if mode == "min" else max)(finite, key=finite.get)
    checkpoints = RunCheckpoints(str(tmp_path / "run"), keep=2, best_mode=mode)
    like = state_at(0)
    assert checkpoints.restore_latest(like) is None and checkpoints.restore_best(like) is None
    for step, score in scores.items():
        checkpoints.save(step, state_at(step), {"step": step, "score": score if step != 3 else None},
                         score=score)
    checkpoints.wait()
    state, meta = checkpoints.restore_latest(like)
    assert meta == {"step": 5, "score": 0.4}
    assert_trees_equal(state, state_at(5))
    state, meta = checkpoints.restore_best(like)
    assert meta["step"] == best_step
    assert_trees_equal(state, state_at(best_step))
    checkpoints.close()
    # only the last `keep` latest checkpoints and the one best remain on disk
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4", "5"]
    assert os.listdir(tmp_path / "run" / "best") == [str(best_step)]
    # a new manager on the same directory (a resumed run) finds them
    again = RunCheckpoints(str(tmp_path / "run"), keep=2, best_mode=mode)
    assert again.restore_latest(like)[1]["step"] == 5
    assert again.restore_best(like)[1]["step"] == best_step
    again.close()


def test_non_finite_score_is_never_the_best(tmp_path):
    checkpoints = RunCheckpoints(str(tmp_path / "run"), best_mode="min")
    checkpoints.save(1, state_at(1), {"step": 1}, score=float("nan"))
    checkpoints.save(2, state_at(2), {"step": 2}, score=float("-inf"))  # would win "min"
    checkpoints.wait()
    assert checkpoints.restore_best(state_at(0)) is None
    assert checkpoints.restore_latest(state_at(0))[1] == {"step": 2}
    checkpoints.save(3, state_at(3), {"step": 3}, score=1.0)
    checkpoints.save(4, state_at(4), {"step": 4}, score=float("inf"))
    checkpoints.save(5, state_at(5), {"step": 5})  # no score: latest only
    checkpoints.wait()
    state, meta = checkpoints.restore_best(state_at(0))
    assert meta == {"step": 3}
    assert_trees_equal(state, state_at(3))
    assert checkpoints.restore_latest(state_at(0))[1] == {"step": 5}
    checkpoints.close()


def test_restore_into_another_structure_is_a_user_error(tmp_path):
    checkpoints = RunCheckpoints(str(tmp_path / "run"))
    checkpoints.save(1, state_at(1), {"step": 1})
    checkpoints.wait()
    with pytest.raises(UserError, match="does not match this run"):
        checkpoints.restore_latest({"other": np.zeros((2, 2), np.float32)})
    checkpoints.close()


def big_state(step):
    """A state whose array fills a data file of its own (small arrays are inlined in orbax's index)."""
    return {"w": np.arange(50_000, dtype=np.float32) + step, "step": np.asarray(step, np.int32)}


def largest_file(directory):
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_damaged_checkpoint_is_reported_corrupt_naming_it(tmp_path, damage):
    """A truncated file fails to read; bytes overwritten inside a compressed chunk can read back
    as other numbers without any error, which the hashes recorded at save time catch."""
    checkpoints = RunCheckpoints(str(tmp_path / "run"), keep=2)
    checkpoints.save(1, big_state(1), {"epoch": 1})
    checkpoints.save(2, big_state(2), {"epoch": 2})
    checkpoints.close()
    path = largest_file(tmp_path / "run" / "checkpoints" / "2")
    with open(path, "r+b") as f:
        if damage == "truncate":
            f.truncate(os.path.getsize(path) // 2)
        else:
            f.seek(os.path.getsize(path) // 2)
            f.write(np.random.default_rng(0).bytes(64))
    again = RunCheckpoints(str(tmp_path / "run"), keep=2)
    where = re.escape(str(tmp_path / "run" / "checkpoints" / "2"))
    with pytest.raises(UserError, match=f"checkpoint {where} is corrupt.*delete it to resume from step 1"):
        again.restore_latest(big_state(0))
    again.close()


def test_checkpoint_of_other_shapes_names_the_array(tmp_path):
    checkpoints = RunCheckpoints(str(tmp_path / "run"))
    checkpoints.save(1, big_state(1), {"epoch": 1})
    checkpoints.close()
    again = RunCheckpoints(str(tmp_path / "run"))
    with pytest.raises(UserError, match=r"does not match this run: array w is float32\[50000\] there, "
                                        r"float32\[7\] here"):
        again.restore_latest({"w": np.zeros(7, np.float32), "step": np.asarray(0, np.int32)})
    again.close()


def test_failed_save_is_one_line_and_keeps_the_checkpoints_there(tmp_path, monkeypatch):
    """A full disk or read-only directory surfaces inside orbax as various error types; the
    save waits for the write, so the run stops at this epoch, not one later."""
    checkpoints = RunCheckpoints(str(tmp_path / "run"))
    checkpoints.save(1, big_state(1), {"epoch": 1})

    def full_disk(*args, **kwargs):
        raise ValueError("Error writing local file: [OS error: No space left on device]")

    monkeypatch.setattr(checkpoints.latest, "save", full_disk)
    with pytest.raises(UserError, match="cannot save the checkpoint of step 2 .*No space left on "
                                        r"device\]; the checkpoints already there are kept"):
        checkpoints.save(2, big_state(2), {"epoch": 2})
    checkpoints.close()
    assert RunCheckpoints(str(tmp_path / "run")).restore_latest(big_state(0))[1] == {"epoch": 1}
