"""Hydra: its loss against a NumPy computation, the head-to-teacher-run tie, and a tiny run end to
end through the shared driver, the registry's predictor dispatch and evaluate.py's student."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import hydra
from models.resnet import ResNet
from utils.config import parse_config
from utils.errors import UserError
from utils.teachers import sample_teacher_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 10


def _body(**kwargs):
    return ResNet(num_classes=K, depth=8, width=1, planes=4, pixel_mean=(0.3,), pixel_std=(0.3,), **kwargs)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_loss_is_each_heads_kl_to_its_teacher_member(temperature):
    rng = np.random.default_rng(0)
    heads, teachers = rng.normal(size=(5, 3, K)), rng.normal(size=(3, 5, K))  # [B, M, K], [M, B, K]
    got = hydra.hydra_loss_per_example(jnp.asarray(heads), jnp.asarray(teachers), temperature)
    t = scipy.special.log_softmax(teachers / temperature, -1)  # [M, B, K]
    s = scipy.special.log_softmax(heads / temperature, -1).transpose(1, 0, 2)
    kl = (np.exp(t) * (t - s)).sum(-1)  # [M, B]: head m against member m only
    np.testing.assert_allclose(got, max(temperature, temperature ** 2) * kl.mean(0), rtol=1e-5)


def test_heads_are_separate_and_share_the_body():
    """The loss of head m moves head m and the body, never another head."""
    model = hydra.Hydra(_body(), num_heads=3, head_width=6)
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 28, 28, 1)), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), images)["params"]
    assert model.apply({"params": params}, images).shape == (4, 3, K)
    assert params["hidden_kernel"].shape[0] == params["out_kernel"].shape[0] == 3

    def head1_loss(p):
        return jnp.sum(model.apply({"params": p}, images)[:, 1] ** 2)

    grads = jax.grad(head1_loss)(params)
    for name in ("hidden_kernel", "hidden_bias", "out_kernel", "out_bias"):
        g = np.asarray(grads[name])
        assert np.abs(g[1]).max() > 0 and np.abs(g[[0, 2]]).max() == 0, name
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["body"])) > 0
    linear = hydra.Hydra(_body(), num_heads=2, head_width=0)
    assert set(linear.init(jax.random.PRNGKey(0), images)["params"]) == {"body", "out_kernel", "out_bias"}


def test_head_m_learns_from_run_m_mod_r():
    """With zero SWAG deviation the members are the runs' means: member m is run m mod R."""
    body = _body()
    images = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 28, 28, 1)), jnp.float32)
    runs = [body.init(jax.random.PRNGKey(r), images)["params"] for r in range(2)]
    moments = {"mean": jax.tree.map(lambda *x: jnp.stack(x), *runs),
               "std": jax.tree.map(lambda *x: jnp.zeros((2, *x[0].shape)), *runs), "model_state": {}}
    logits = sample_teacher_logits(body, moments, jax.random.PRNGKey(3), images, 5, tied_runs=True)
    for m in range(5):
        np.testing.assert_allclose(logits[m], body.apply({"params": runs[m % 2]}, images),
                                   rtol=1e-5, atol=1e-5)


def test_config_checks():
    assert parse_config(hydra.HydraConfig, []).num_heads == 8
    for bad in (["--num_heads", "0"], ["--head_width", "-1"], ["--dist_temp", "0"], ["--optim_lr", "-1"]):
        with pytest.raises(UserError):
            parse_config(hydra.HydraConfig, bad)


@pytest.mark.slow
def test_two_steps_export_predict_and_evaluate(tiny_setup, tmp_path):
    """Trained by the shared driver on 2 devices; predicted through the registry."""
    from utils.predict import load_predictor, predict
    from utils.trainer import make_mesh

    run_dir = tmp_path / "hydra"
    hydra.main(["--config", os.path.join(ROOT, "config/distillation/hydra_fmnist_frnrelu.yaml"),
                "--data_root", tiny_setup["data_root"], "--teacher_dir", tiny_setup["teachers"],
                "--optim_bs", "8", "--optim_ne", "1", "--num_heads", "3", "--head_width", "8",
                "--log_every", "1", "--test_table", "true", "--eval_bs", "4", "--save", str(run_dir)])
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert records[0]["step"] == 2 and np.isfinite(records[0]["train/loss"])
    assert {"val/nll", "val/acc", "val/single_nll"} <= set(records[0])
    assert "test/Hydra (3)/kl_to_teacher" in records[-1]  # the driver's test table
    sidecar = json.load(open(run_dir / "model" / "sidecar.json"))
    assert (sidecar["kind"], sidecar["num_heads"], sidecar["trained_by"]) == ("hydra", 3, "hydra.py")
    predictor = load_predictor(str(run_dir))
    assert predictor.num_members == 3
    logits = predict(predictor, tiny_setup["images"], batch_size=4, mesh=make_mesh(jax.devices()[:2]))
    assert logits.shape == (len(tiny_setup["images"]), 3, K) and np.all(np.isfinite(logits))
    assert np.abs(logits[:, 0] - logits[:, 1]).max() > 1e-4  # the heads differ
