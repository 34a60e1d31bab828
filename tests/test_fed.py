"""Tests of FED: the noise-injected generator's members, the config, and fed.py end to end on
generated Fashion-MNIST-shaped data (its MMD² loss: tests/models/test_losses.py)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------- generator members


def test_generator_copies_get_their_own_noise():
    from fed import flatten_members, generator_logits
    from models.resnet import ResNet

    model = ResNet(num_classes=3, depth=8, width=1, pixel_mean=(0.5,), pixel_std=(0.25,), noise_std=0.1)
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1))
    variables = jax.jit(model.init)({"params": jax.random.PRNGKey(1), "noise": jax.random.PRNGKey(2)},
                                    images)
    members = jax.jit(lambda v, x, k: generator_logits(model, v, x, k, 4)[0])
    logits = members(variables, images, jax.random.PRNGKey(3))
    assert logits.shape == (2, 4, 3)
    spread = np.asarray(logits).std(axis=1)
    assert spread.min() > 1e-4  # the 4 copies of an image differ
    # copies are adjacent: member m of image b is row b·M + m of the repeated batch
    repeated = jnp.repeat(images, 4, axis=0)
    direct = jax.jit(lambda v, x, k: model.apply(v, x, rngs={"noise": k}))(variables, repeated,
                                                                          jax.random.PRNGKey(3))
    np.testing.assert_allclose(logits.reshape(8, 3), direct, rtol=1e-5, atol=1e-6)
    again = members(variables, images, jax.random.PRNGKey(4))
    assert not np.allclose(again, logits)
    probs = jax.nn.softmax(jnp.moveaxis(logits, 1, 0))  # [M, B, K]
    flat = flatten_members(probs, jnp.array([True, False]))
    assert flat.shape == (4, 6)
    np.testing.assert_array_equal(np.asarray(flat)[:, 3:], 0.0)  # the padded row adds nothing
    np.testing.assert_allclose(np.asarray(flat)[:, :3], np.asarray(probs)[:, 0], rtol=1e-6)


def test_config_validation():
    from fed import FedConfig
    from utils.config import parse_config

    config = parse_config(FedConfig, [])
    assert config.num_teachers == 8 and config.num_ensembles == 8 and config.optim == "adam"
    override = parse_config(FedConfig, ["--optim_boundaries_and_scales", "{3: 0.5}",
                                        "--bandwidth_range", "[1, 2]"])
    assert override.optim_boundaries_and_scales == {3: 0.5} and override.bandwidth_range == [1.0, 2.0]
    bad = [["--bandwidth_range", "[]"], ["--bandwidth_range", "[2, -1]"], ["--kernel", "laplace"],
           ["--noise_std", "0"], ["--num_ensembles", "0"], ["--optim", "lamb"],
           ["--optim_boundaries_and_scales", "{3: 0}"]]
    for extra in bad:
        with pytest.raises(UserError):
            parse_config(FedConfig, extra)
    # (bandwidths, teacher samples per step): the reference's for CIFAR; 4 on the CPU-sized fmnist
    expected = {"c10": ([2.0, 10.0, 20.0, 50.0], 8), "c100": ([10.0, 15.0, 20.0, 50.0], 8),
                "fmnist": ([2.0, 10.0, 20.0, 50.0], 4)}
    for data, (bandwidths, num_teachers) in expected.items():
        path = os.path.join(ROOT, "config", "distillation", f"fed_{data}_frnrelu.yaml")
        config = parse_config(FedConfig, ["--config", path])
        assert config.bandwidth_range == bandwidths and config.num_teachers == num_teachers
        with open(path) as f:
            assert f.readline().startswith("#")


def test_piecewise_schedule_from_config():
    from fed import FedConfig
    from utils.optim import make_optimizer
    from utils.config import parse_config
    from utils.optim import epoch_piecewise

    config = parse_config(FedConfig, ["--config", os.path.join(ROOT, "config/distillation/fed_c10_frnrelu.yaml")])
    schedule = epoch_piecewise(config.optim_lr, 640, config.optim_boundaries_and_scales)
    np.testing.assert_allclose([schedule(0), schedule(175 * 640 - 1), schedule(175 * 640),
                                schedule(225 * 640), schedule(250 * 640 - 1)],
                               [1e-3, 1e-3, 3.3e-4, 1.089e-4, 1.089e-4], rtol=1e-5)
    # Adam with eps 1e-8: the first update of a gradient g is -lr·g/(|g| + eps) ≈ -lr·sign(g)
    optimizer = make_optimizer(config, schedule)
    params = {"w": jnp.array([1.0, -2.0])}
    updates, _ = optimizer.update({"w": jnp.array([0.3, -1e-3])}, optimizer.init(params), params)
    np.testing.assert_allclose(updates["w"], [-1e-3, 1e-3], rtol=1e-4)


# ---------------------------------------------------------------------- end to end (tiny)


# `tiny_setup` (data, a 2-device mesh, two teacher runs) lives in tests/conftest.py.


@pytest.mark.slow
def test_fed_two_steps_export_and_predict(tiny_setup, tmp_path):
    import fed
    from utils.predict import load_predictor, predict
    from utils.trainer import make_mesh

    run_dir = tmp_path / "fed"
    fed.main(["--config", os.path.join(ROOT, "config/distillation/fed_fmnist_frnrelu.yaml"),
              "--data_root", tiny_setup["data_root"], "--teacher_dir", tiny_setup["teachers"],
              "--optim_bs", "8", "--optim_ne", "1", "--model_depth", "8", "--model_width", "1",
              "--num_teachers", "4", "--num_ensembles", "3", "--log_every", "1", "--save", str(run_dir)])
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 1 and records[0]["step"] == 2
    assert np.isfinite(records[0]["train/loss"]) and records[0]["train/loss"] >= 0
    assert {"val/acc", "val/nll", "val/ens_acc", "val/ens_nll"} <= set(records[0])
    with open(run_dir / "model" / "sidecar.json") as f:
        sidecar = json.load(f)
    assert sidecar["kind"] == "fed" and sidecar["model"]["noise_std"] == 0.1
    assert "ens_nll" in sidecar["val"]
    mesh = make_mesh(jax.devices()[:2])
    for num_members in (8, 2):
        options = {} if num_members == 8 else {"num_members": num_members}
        predictor = load_predictor(str(run_dir), **options)
        assert predictor.kind == "fed" and predictor.num_members == num_members
        logits = predict(predictor, tiny_setup["images"], batch_size=4, mesh=mesh)
        assert logits.shape == (8, num_members, 10) and np.all(np.isfinite(logits))
        assert logits.std(axis=1).max() > 1e-5  # the members are distinct generator samples
