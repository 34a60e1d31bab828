"""Tests of utils/predict.py: dispatch on the export's kind through the method registry, option
checks, pooled ensembles, and predict/Runner on 1 and 2 devices with ragged last batches."""
import json

import jax
import numpy as np
import pytest

from utils import method as method_lib
from utils.checkpoints import save_resnet
from utils.errors import UserError
from utils.predict import (Predictor, Runner, check_options, ensemble_predictor, load_predictor,
                           predict)
from utils.trainer import make_mesh

NUM_IMAGES = 7  # divisible by neither the batch sizes nor the device counts below


def random_variables(model, images, seed):
    """Random variables of the model's structure (eval_shape: no slow initialisers run)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32), dict(shapes))


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A run directory whose model/ is a tiny "resnet" export, its model, variables and images."""
    from models.resnet import ResNet

    model = ResNet(num_classes=5, depth=8, width=1, planes=4, pixel_mean=(0.5,), pixel_std=(0.25,))
    images = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, 12, 12, 1), dtype=np.uint8)
    variables = random_variables(model, images.astype(np.float32), 1)
    run = tmp_path_factory.mktemp("predict") / "run"
    save_resnet(str(run / "model"), model, variables["params"], {}, method="KD", seed=4)
    expected = np.asarray(jax.jit(model.apply)(variables, images.astype(np.float32) / 255.0))
    return {"run": run, "model": model, "variables": variables, "images": images, "expected": expected}


def noisy_predictor(name, scale, members, seed=None):
    """A predictor whose members depend on the key: linear logits plus key-drawn noise."""
    w = (np.random.default_rng(len(name)).normal(size=(144, 3)) * scale).astype(np.float32)

    def member_logits(args, images, key):
        logits = images.reshape(images.shape[0], -1) @ args["w"]
        return logits[:, None, :] + jax.random.normal(key, (images.shape[0], members, 3))

    return Predictor(name=name, kind="fake", member_logits=member_logits, args={"w": w},
                     num_members=members, num_params=w.size, sidecar={"kind": "fake", "seed": seed})


# -------------------------------------------------------------------------------- dispatch


def test_resnet_export_is_a_one_member_predictor(resnet_run):
    expected_params = sum(x.size for x in jax.tree.leaves(resnet_run["variables"]["params"]))
    mesh = make_mesh(jax.devices()[:2])
    for path in (resnet_run["run"], resnet_run["run"] / "model"):  # a run directory or its export
        predictor = load_predictor(str(path))
        assert predictor.kind == "resnet" and predictor.num_members == 1
        assert predictor.num_params == expected_params
        assert predictor.sidecar["seed"] == 4 and predictor.name == "KD"
        logits = predict(predictor, resnet_run["images"], batch_size=4, mesh=mesh)
        assert logits.shape == (NUM_IMAGES, 1, 5) and logits.dtype == np.float32
        np.testing.assert_allclose(logits[:, 0], resnet_run["expected"], rtol=1e-5, atol=1e-5)


def test_dispatch_goes_through_the_registry(tmp_path, monkeypatch):
    calls = []

    def fake_loader(model_dir, scale=1.0):
        calls.append((model_dir, scale))
        return noisy_predictor("fake", scale, 2)

    method_lib.methods()  # the real ones first
    monkeypatch.setitem(method_lib._METHODS, "fake_method", method_lib.Method(
        name="fake_method", config_class=object, build=None, load_predictor=fake_loader,
        export_kinds=("fake_kind",)))
    export = tmp_path / "run" / "model"
    export.mkdir(parents=True)
    (export / "sidecar.json").write_text(json.dumps({"kind": "fake_kind"}))
    predictor = load_predictor(str(tmp_path / "run"), scale=3.0)
    assert calls == [(str(export), 3.0)]  # the export directory, the options passed through
    assert predictor.num_members == 2
    check_options(str(export), {"scale": 2.0})  # accepted: no error
    with pytest.raises(UserError) as error:
        check_options(str(export), {"members": 2}, what="student")
    assert "fake_method.py" in str(error.value) and str(error.value).endswith("it takes scale")


def test_unknown_kind_is_a_user_error_naming_it(tmp_path):
    export = tmp_path / "model"
    export.mkdir()
    (export / "sidecar.json").write_text(json.dumps({"kind": "mystery_kind"}))
    with pytest.raises(UserError, match="'mystery_kind'"):
        load_predictor(str(export))
    with pytest.raises(UserError, match="no exported model"):
        load_predictor(str(tmp_path / "nothing-here"))


def test_check_options_lists_what_the_loader_takes(resnet_run):
    run = str(resnet_run["run"])
    check_options(run, {})
    check_options(run, {"num_members": 3, "dirichlet_mean": True})
    with pytest.raises(UserError) as error:
        check_options(run, {"num_steps": 4, "solver": "euler"}, what="students[0]")
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("students[0]: kd_and_endd.py load_predictor")
    assert "['num_steps', 'solver']" in message
    assert message.endswith("it takes num_members, seed, dirichlet_mean, softmax_logits")


# -------------------------------------------------------------------------------- ensembles


def test_ensemble_pools_members_each_part_with_its_own_key():
    images = np.random.default_rng(2).uniform(size=(4, 12, 12, 1)).astype(np.float32)
    parts = [noisy_predictor("a", 0.1, 2, seed=1), noisy_predictor("bb", 0.3, 3, seed=2)]
    ensemble = ensemble_predictor("A+B", parts)
    assert ensemble.num_members == 5 and ensemble.num_params == 2 * 144 * 3
    assert ensemble.sidecar["ensemble_of"] == [1, 2] and ensemble.kind == "fake"
    key = jax.random.PRNGKey(7)
    logits = np.asarray(jax.jit(ensemble.member_logits)(ensemble.args, images, key))
    keys = jax.random.split(key, 2)
    expected = np.concatenate([np.asarray(jax.jit(p.member_logits)(p.args, images, k))
                               for p, k in zip(parts, keys)], axis=1)
    assert logits.shape == (4, 5, 3)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # the same predictor twice: its two copies draw different noise
    twice = ensemble_predictor("A x2", [parts[0], parts[0]])
    pooled = np.asarray(jax.jit(twice.member_logits)(twice.args, images, key))
    assert np.abs(pooled[:, :2] - pooled[:, 2:]).min() > 1e-6
    with pytest.raises(UserError, match="at least one member"):
        ensemble_predictor("empty", [])


def test_ensemble_of_exports_predicts_both(resnet_run):
    one = load_predictor(str(resnet_run["run"]))
    ensemble = ensemble_predictor("KD x2", [one, one])
    logits = predict(ensemble, resnet_run["images"], batch_size=4, mesh=make_mesh(jax.devices()[:2]))
    assert logits.shape == (NUM_IMAGES, 2, 5) and ensemble.num_params == 2 * one.num_params
    for m in range(2):
        np.testing.assert_allclose(logits[:, m], resnet_run["expected"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- predict / Runner


def test_predict_same_logits_on_1_and_2_devices_and_ragged_batches(resnet_run):
    predictor = load_predictor(str(resnet_run["run"]))
    images, expected = resnet_run["images"], resnet_run["expected"]
    one, two = make_mesh(jax.devices()[:1]), make_mesh(jax.devices()[:2])
    runs = [predict(predictor, images, batch_size=4, mesh=one),
            predict(predictor, images, batch_size=4, mesh=two),
            predict(predictor, images, batch_size=3, mesh=two),  # rounded to 2 per call
            predict(predictor, images)]  # every device (4), batch larger than the set
    for logits in runs:
        assert logits.shape == (NUM_IMAGES, 1, 5)
        np.testing.assert_allclose(logits[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_key_dependent_members_agree_across_meshes():
    predictor = noisy_predictor("noisy", 0.2, 3)
    images = np.random.default_rng(1).integers(0, 256, (NUM_IMAGES, 12, 12, 1), dtype=np.uint8)
    key = jax.random.PRNGKey(5)
    one = predict(predictor, images, batch_size=4, mesh=make_mesh(jax.devices()[:1]), key=key)
    two = predict(predictor, images, batch_size=4, mesh=make_mesh(jax.devices()[:2]), key=key)
    np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-5)
    # the logits part is the linear map of images / 255; the rest is noise of unit scale
    linear = (images.reshape(NUM_IMAGES, -1).astype(np.float64) / 255.0) @ predictor.args["w"]
    noise = one - linear[:, None, :]
    assert 0.5 < noise.std() < 1.5
    other = predict(predictor, images, batch_size=4, mesh=make_mesh(jax.devices()[:2]),
                    key=jax.random.PRNGKey(6))
    assert np.abs(other - two).max() > 1e-3  # the key is used


def test_runner_rounds_the_batch_and_runs_on_several_sets(resnet_run):
    predictor = load_predictor(str(resnet_run["run"]))
    two = make_mesh(jax.devices()[:2])
    assert Runner(predictor, two, batch_size=5).batch_size == 4
    assert Runner(predictor, two, batch_size=1).batch_size == 2
    runner = Runner(predictor, two, batch_size=4)
    images = resnet_run["images"]
    first = runner(images)
    second = runner(images[::-1][:5])  # another set, another length, the same compiled call
    np.testing.assert_allclose(first[:, 0], resnet_run["expected"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second[:, 0], resnet_run["expected"][::-1][:5], rtol=1e-5, atol=1e-5)
    assert runner.seconds > 0 and first.dtype == np.float32 and isinstance(first, np.ndarray)
