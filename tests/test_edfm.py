"""Tests of edfm.py: per-step teacher draws, the frozen backbone, a 2-step run on generated
Fashion-MNIST-shaped data over 2 simulated devices, and the prediction API."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import edfm
import sgd_swag
from data import datasets
from models.flow_matching import num_function_evals
from models.resnet import ResNet
from utils import predict as predict_lib
from utils.checkpoints import load_export, read_sidecar, save_resnet
from utils.errors import UserError
from utils import trainer as trainer_lib
from utils.config import parse_config
from utils.trainer import make_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "config")
K = 10


class TinyTeacher(nn.Module):
    """A stand-in teacher with two parameter leaves (cheap to compile)."""

    @nn.compact
    def __call__(self, images):
        return nn.Dense(K)(images.reshape(images.shape[0], -1))


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


# ------------------------------------------------------------------ per-step teacher draw
def test_teacher_draw_covers_every_run_through_the_step_keys():
    """Three runs whose means differ, std 0: the member drawn from each training step's key
    (as the loss draws it) is each run about 1/3 of the time, and its logits are centred."""
    teacher = TinyTeacher()
    images = jax.random.uniform(jax.random.PRNGKey(0), (4, 6, 6, 1))
    runs = [teacher.init(jax.random.PRNGKey(10 + r), images)["params"] for r in range(3)]
    moments = {"mean": _stack(runs), "std": jax.tree.map(jnp.zeros_like, _stack(runs))}
    num_steps = 300
    step_keys = jax.vmap(lambda s: edfm.step_keys(jax.random.fold_in(jax.random.PRNGKey(5), s))["teacher"])(
        jnp.arange(num_steps))
    drawn = jax.jit(jax.vmap(lambda k: edfm.teacher_targets(teacher, moments, k, images)))(step_keys)
    np.testing.assert_allclose(np.asarray(drawn).mean(-1), 0.0, atol=1e-5)  # centred
    per_run = np.stack([np.asarray(teacher.apply({"params": p}, images)) for p in runs])
    per_run = per_run - per_run.mean(-1, keepdims=True)
    distance = np.abs(np.asarray(drawn)[:, None] - per_run[None]).max(axis=(2, 3))  # [steps, runs]
    assert np.all(distance.min(1) < 1e-5), "a drawn member is none of the runs"
    counts = np.bincount(distance.argmin(1), minlength=3)
    assert counts.sum() == num_steps and np.all(counts >= 70), counts  # ~100 each (sd ~8)
    # the same step key always draws the same member (reproducible, no trace-time choice)
    again = jax.jit(lambda k: edfm.teacher_targets(teacher, moments, k, images))(step_keys[7])
    np.testing.assert_allclose(again, drawn[7], atol=1e-6)


def test_teacher_draw_takes_fresh_swag_noise():
    teacher = TinyTeacher()
    images = jax.random.uniform(jax.random.PRNGKey(0), (4, 6, 6, 1))
    run = teacher.init(jax.random.PRNGKey(1), images)["params"]
    moments = {"mean": _stack([run]), "std": jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), _stack([run]))}
    draw = jax.jit(lambda k: edfm.teacher_targets(teacher, moments, k, images))
    a, b = draw(jax.random.PRNGKey(1)), draw(jax.random.PRNGKey(2))
    assert float(jnp.abs(a - b).max()) > 1e-3


# ------------------------------------------------------------------ frozen backbone, loss
def test_loss_trains_the_head_only():
    """The gradient of the training loss reaches the head, and nothing reaches the frozen
    backbone or the teacher moments (both are read under stop_gradient). RandAugment is off
    here only to compile faster; the end-to-end run below uses the full pipeline."""
    backbone = ResNet(num_classes=K, depth=8, width=1, pixel_mean=(0.5,), pixel_std=(0.25,))
    images = np.random.default_rng(0).integers(0, 256, (8, 12, 12, 1), dtype=np.uint8)
    backbone_vars = jax.jit(backbone.init)(jax.random.PRNGKey(1), images[:1] / 255.0)
    teacher = TinyTeacher()
    runs = [teacher.init(jax.random.PRNGKey(10 + r), images[:1] / 255.0)["params"] for r in range(2)]
    moments = {"mean": _stack(runs), "std": jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), _stack(runs))}
    config = edfm.EdfmConfig(hidden_size=16, randaugment=False)
    head = edfm.make_head(K, hidden_size=16)
    head_params = jax.jit(head.init)(jax.random.PRNGKey(0), jnp.zeros((1, K)), jnp.zeros((1, 64)),
                                     jnp.zeros((1,)))["params"]
    loss_fn = edfm.make_loss_fn(head, backbone, teacher, config)
    batch = {"images": jnp.asarray(images), "labels": jnp.arange(8) % K, "mask": jnp.ones(8, bool)}

    def loss(params, frozen):
        return loss_fn(params, {}, frozen, batch, jax.random.PRNGKey(3))[0]

    frozen = {"teacher": moments, "backbone": backbone_vars}
    value, (head_grads, frozen_grads) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(head_params, frozen)
    assert np.isfinite(float(value)) and float(value) > 0
    head_norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(head_grads))
    assert np.isfinite(head_norm) and head_norm > 0
    for leaf in jax.tree.leaves(frozen_grads):
        assert float(jnp.abs(leaf).max()) == 0.0


def test_head_s_noise_follows_noise_var_unless_set_as_the_reference():
    """[Q11]: the reference's head preconditions with s_noise 4 whatever noise_var; here it
    follows noise_var unless `s_noise` is set; an export without the key reads as noise_var."""
    assert edfm.make_head(10, noise_var=2.0).s_noise == 2.0
    assert edfm.make_head(10, noise_var=2.0, s_noise=4.0).s_noise == 4.0
    config = parse_config(edfm.EdfmConfig, ["--noise_var", "2", "--s_noise", "4"])
    assert edfm.make_head(10, **{k: getattr(config, k) for k in edfm.HEAD_FIELDS}).s_noise == 4.0
    with pytest.raises(UserError, match="s_noise"):
        parse_config(edfm.EdfmConfig, ["--s_noise", "0"])


def test_config_checks():
    with pytest.raises(UserError, match="optim must be sgd or adam"):  # optim_base: its alias
        parse_config(edfm.EdfmConfig, ["--optim_base", "rmsprop"])
    with pytest.raises(UserError, match="sample_solver"):
        parse_config(edfm.EdfmConfig, ["--sample_solver", "rk4"])
    with pytest.raises(UserError, match="did you mean"):
        parse_config(edfm.EdfmConfig, ["--noise_std", "4"])
    expected = {"c10": ("CIFAR10_x32", 256, 10, 1e-4, "sgd"), "c100": ("CIFAR100_x32", 512, 100, 3e-4, "sgd"),
                "fmnist": ("FashionMNIST_x28", 256, 10, 1e-3, "adam")}
    for name, values in expected.items():
        config = parse_config(edfm.EdfmConfig, ["--config", os.path.join(
            CONFIGS, "distillation", f"edfm_{name}_frnrelu.yaml")])
        assert (config.data_name, config.hidden_size, config.num_classes, config.optim_lr,
                config.optim) == values
        assert (config.noise_var, config.sample_num_steps, config.num_ensembles, config.sample_solver,
                config.train_time_exp_base, config.sample_time_exp_base) == (4.0, 7, 32, "heun_exp", 3.0, 0.5)


# ------------------------------------------------------------------ a 2-step run end to end
@pytest.fixture(scope="module")
def edfm_run(tmp_path_factory, writers):
    """Generated Fashion-MNIST (60/40/30), a 1-epoch sgd_swag teacher, a random ResNet-8x1
    backbone exported with save_resnet, and a 2-step edfm.py run on 2 of the 4 CPU devices."""
    root = tmp_path_factory.mktemp("edfm")
    with pytest.MonkeyPatch.context() as mp:
        spec = datasets.DATASETS["FashionMNIST_x28"]
        mp.setitem(datasets.DATASETS, "FashionMNIST_x28",
                   dataclasses.replace(spec, num_train=60, num_val=40, num_test=30))
        mp.setattr(datasets, "FASHION_MNIST_SYSTEM_DIRS", [str(root / "no-system-copy")])
        mp.setattr(datasets, "FASHION_MNIST_PAYLOAD_SHA256", {})
        arrays = writers.make_fmnist_arrays(100, 30)
        writers.write_fmnist_dir(root / "data" / datasets.FASHION_MNIST_DIRNAME, arrays, gz=False)
        meshes = []

        def two_devices(devices=None):
            meshes.append(make_mesh(jax.devices()[:2]))
            return meshes[-1]

        mp.setattr(trainer_lib, "make_mesh", two_devices)  # the mesh every Trainer builds
        data = ["--data_root", str(root / "data")]
        sgd_swag.main(data + ["--config", os.path.join(CONFIGS, "teacher", "fmnist_frnrelu_sgd_swag.yaml"),
                              "--model_depth", "8", "--model_width", "1", "--optim_ne", "1", "--optim_bs", "32",
                              "--start_decay_epoch", "0", "--start_swa_epoch", "0", "--seed", "1",
                              "--save", str(root / "teachers" / "seed1")])
        backbone = ResNet(num_classes=K, depth=8, width=1, pixel_mean=spec.pixel_mean, pixel_std=spec.pixel_std)
        variables = jax.jit(backbone.init)(jax.random.PRNGKey(4), jnp.zeros((1, 28, 28, 1)))
        variables = jax.tree.map(np.asarray, variables)
        params = variables.pop("params")
        save_resnet(str(root / "kd" / "model"), backbone, params, dict(variables), method="KD",
                    data_name="FashionMNIST_x28", seed=4)
        common = data + ["--config", os.path.join(CONFIGS, "distillation", "edfm_fmnist_frnrelu.yaml"),
                         "--teacher_dir", str(root / "teachers"), "--pretrained_resnet", str(root / "kd"),
                         "--model_width", "1", "--optim_bs", "32", "--optim_ne", "1", "--hidden_size", "32",
                         "--num_ensembles", "4", "--eval_batch_size", "16", "--seed", "3"]
        # bad input: one clear error, no run directory created
        with pytest.raises(SystemExit):
            edfm.main(common + ["--num_classes", "100", "--save", str(root / "bad")])
        with pytest.raises(SystemExit):
            edfm.main(common + ["--pretrained_resnet", str(root / "nowhere"), "--save", str(root / "bad")])
        assert not (root / "bad").exists()
        edfm.main(common + ["--save", str(root / "run")])
        yield {"root": root, "run": root / "run", "backbone_params": jax.tree.map(np.asarray, params),
               "meshes": meshes, "test_images": arrays["test_images"][..., None],
               "test_labels": arrays["test_labels"]}


@pytest.mark.slow
def test_run_trains_two_steps_on_two_devices_and_exports(edfm_run):
    run = edfm_run["run"]
    assert edfm_run["meshes"] and all(m.size == 2 for m in edfm_run["meshes"])
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    epoch = records[0]
    assert epoch["step"] == 2 and np.isfinite(epoch["train/loss"])
    for key in ("val/acc", "val/nll", "val/single_acc", "val/single_nll"):
        assert np.isfinite(epoch[key])
    test = records[-1]
    assert {"test/EDFM (4)/acc", "test/KD backbone/nll", "test/Teacher (1x3)/ece",
            "test/EDFM (4)/kl_to_teacher"} <= set(test)
    # The table is utils/evaluation.py's, the code evaluate.py runs: recomputed from the export
    # with the same predictors and key, every number agrees.
    from data.datasets import Split
    from utils.evaluation import default_key, test_table
    from utils.teachers import teacher_predictor

    images = edfm_run["test_images"]
    labels = np.asarray(edfm_run["test_labels"], np.int32)
    predictors = [teacher_predictor(str(edfm_run["root"] / "teachers"), 3, 3),
                  edfm.load_predictor(str(run / "model"), num_members=4, seed=3)]
    rows = test_table(predictors, Split(images, labels), batch_size=16, key=default_key(3),
                      mesh=make_mesh(jax.devices()[:2]))
    for name, row in rows.items():
        for key in ("acc", "nll", "ece", "kl_to_teacher"):
            assert test[f"test/{name}/{key}"] == pytest.approx(row[key], rel=1e-6, abs=1e-9), (name, key)
    sidecar = read_sidecar(str(run / "model"), kind="edfm")
    assert sidecar["head"] == {"hidden_size": 32, "time_embed_dim": 32, "num_blocks": 4, "noise_var": 4.0,
                               "droprate": 0.0, "time_scale": 1000.0, "s_noise": None,
                               "dropout_on_stream": True}
    assert sidecar["sampler"]["sample_num_steps"] == 7 and sidecar["sampler"]["sample_time_exp_base"] == 0.5
    assert (sidecar["data_name"], sidecar["num_classes"], sidecar["seed"]) == ("FashionMNIST_x28", 10, 3)
    assert sidecar["backbone"]["model"]["depth"] == 8 and np.isfinite(sidecar["val"]["nll"])


@pytest.mark.slow
def test_backbone_is_unchanged_by_training(edfm_run):
    arrays, _ = load_export(str(edfm_run["run"] / "model"), kind="edfm")
    exported, given = arrays["backbone"]["params"], edfm_run["backbone_params"]
    assert jax.tree.structure(exported) == jax.tree.structure(given)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(given)):
        np.testing.assert_array_equal(a, b)
    assert sum(np.size(x) for x in jax.tree.leaves(arrays["head"])) > 0


@pytest.mark.slow
def test_load_predictor_samples_distinct_members(edfm_run):
    mesh = make_mesh(jax.devices()[:2])
    images = edfm_run["test_images"]
    predictor = edfm.load_predictor(str(edfm_run["run"] / "model"), num_members=5)
    assert (predictor.kind, predictor.num_members, predictor.sidecar["predictor"]["head_evals"]) == ("edfm", 5, 13)
    logits = predict_lib.predict(predictor, images, batch_size=16, mesh=mesh)
    assert logits.shape == (30, 5, K) and np.all(np.isfinite(logits))
    assert float(logits.std(axis=1).mean()) > 1e-2  # members differ from each other
    # the run directory works too, and the generic loader dispatches on the sidecar kind
    other = predict_lib.load_predictor(str(edfm_run["run"]), num_members=3, solver="euler", num_steps=4)
    assert other.sidecar["predictor"] == {"num_members": 3, "num_steps": 4, "solver": "euler", "head_evals": 4}
    for solver in ("midpoint", "adaptive"):
        p = edfm.load_predictor(str(edfm_run["run"]), num_members=2, solver=solver, num_steps=3)
        z = edfm.predict_member_logits(p, images[:8], batch_size=8)
        assert z.shape == (8, 2, K) and np.all(np.isfinite(z))
    with pytest.raises(UserError, match="solver"):
        edfm.load_predictor(str(edfm_run["run"]), solver="rk4")


@pytest.mark.slow
def test_heun_exp_uses_13_head_evaluations(edfm_run):
    """Count the head evaluations actually executed by the predictor's sampler."""
    predictor = edfm.load_predictor(str(edfm_run["run"] / "model"), num_members=3)
    sidecar = predictor.sidecar
    head = edfm.make_head(K, **sidecar["head"])
    backbone = edfm.resnet_from_spec(sidecar["backbone"]["model"])
    images = jnp.asarray(edfm_run["test_images"][:4] / 255.0, jnp.float32)
    calls = []

    def run(solver, num_steps):
        calls.clear()

        def velocity(x, c, t):
            jax.debug.callback(lambda: calls.append(1))
            return head.apply({"params": predictor.args["head"]}, x, c, t)

        condition = edfm.backbone_features(backbone, predictor.args["backbone"], images)
        key = jax.random.fold_in(jax.random.PRNGKey(0), 0)  # what the predictor (seed 0) uses
        out = jax.jit(lambda key: edfm.sample_member_logits(
            velocity, condition, key, 3, K, noise_std=4.0, solver=solver, num_steps=num_steps,
            exp_base=0.5))(key)
        jax.block_until_ready(out)
        jax.effects_barrier()
        return out

    out = run("heun_exp", 7)
    assert len(calls) == 13 == num_function_evals("heun_exp", 7)
    # the predictor runs this very sampler (same key -> same members)
    expected = jax.jit(predictor.member_logits)(predictor.args, images, jax.random.PRNGKey(0))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
