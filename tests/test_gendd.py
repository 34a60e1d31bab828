"""Tests of gendd.py: GenDD's maths (contraction, tokens, mixup, schedules, optimizer masks),
teacher loading, and 2-step runs of both stages on generated Fashion-MNIST with 2 devices."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest

import gendd
from data import datasets
from models.resnet import ResNet, ResNetOutput
from utils.checkpoints import save_export, save_resnet
from utils.config import parse_config
from utils.driver import train
from utils.optim import make_optimizer
from utils.errors import UserError
from utils.predict import load_predictor as load_any_predictor
from utils.predict import predict
from utils.trainer import make_mesh

# --------------------------------------------------------------------------------- the maths


def test_contraction_matches_numpy():
    rng = np.random.default_rng(0)
    b, d, c, s = 5, 8, 4, 0.7
    f_t = rng.normal(size=(b, d)).astype(np.float32)
    kernel = rng.normal(size=(d, c)).astype(np.float32)  # Flax Dense kernel [D, C]
    w = kernel.T  # PyTorch weight [C, D]
    y = np.array([0, 3, 1, 3, 2])
    np.testing.assert_allclose(gendd.contract(f_t, kernel, s, labels=y),
                               (1 - s) * f_t + s * w[y], rtol=1e-6)
    q = rng.dirichlet(np.ones(c), size=b).astype(np.float32)
    np.testing.assert_allclose(gendd.contract(f_t, kernel, s, probs=q),
                               (1 - s) * f_t + s * q @ w, rtol=1e-5)
    np.testing.assert_array_equal(gendd.contract(f_t, kernel, 0.0), f_t)  # unsupervised s = 0
    # one-hot soft labels are hard labels
    np.testing.assert_allclose(gendd.contract(f_t, kernel, s, probs=np.eye(c)[y]),
                               gendd.contract(f_t, kernel, s, labels=y), rtol=1e-5, atol=1e-6)
    # no gradient reaches the teacher feature
    grad = jax.grad(lambda f: jnp.sum(gendd.contract(f, kernel, s, labels=y)))(f_t)
    assert not np.any(np.asarray(grad))


def test_token_split_merge_and_diffusion_rows():
    b, td, k, mul, ds = 3, 2, 4, 2, 5
    target = np.arange(b * k * td, dtype=np.float32).reshape(b, k * td)
    tokens = gendd.split_tokens(target, td)
    assert tokens.shape == (b * k, td)
    for i in range(b):
        for j in range(k):  # image-major, token-minor; token j = features[j*td:(j+1)*td]
            np.testing.assert_array_equal(tokens[i * k + j], target[i, j * td:(j + 1) * td])
    np.testing.assert_array_equal(gendd.merge_tokens(tokens, k), target)
    with pytest.raises(ValueError, match="multiple of token_dim"):
        gendd.split_tokens(target, 3)

    z = np.random.default_rng(1).normal(size=(b, ds)).astype(np.float32)
    mask = np.array([True, True, False])
    x0, cond, ids, row_mask = gendd.diffusion_rows(target, z, mask, td, mul)
    n = mul * b * k
    assert x0.shape == (n, td) and cond.shape == (n, ds) and ids.shape == (n,)
    for i in range(b):  # image-major: image i's M copies of its K tokens, together
        rows = slice(i * mul * k, (i + 1) * mul * k)
        np.testing.assert_array_equal(x0[rows], np.tile(tokens[i * k:(i + 1) * k], (mul, 1)))
        np.testing.assert_array_equal(ids[rows], np.tile(np.arange(k), mul))
        np.testing.assert_array_equal(cond[rows], np.broadcast_to(z[i], (mul * k, ds)))
        np.testing.assert_array_equal(row_mask[rows], np.full(mul * k, mask[i]))


def test_repr_mixup_one_lambda_and_permutation_for_both():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(6, 3)).astype(np.float32)
    target = rng.normal(size=(6, 4)).astype(np.float32)
    key = jax.random.key(3)
    mz, mt = gendd.repr_mixup(key, z, target, 1.0)
    # the same (m, π) mixes z and target: mixing [z, target] jointly gives the same rows
    joint = np.concatenate([z, target], 1)
    mj, _ = gendd.repr_mixup(key, joint, joint, 1.0)
    np.testing.assert_allclose(np.concatenate([mz, mt], 1), mj, rtol=1e-6)
    assert not np.allclose(mz, z)
    np.testing.assert_array_equal(gendd.repr_mixup(key, z, target, 0.0)[0], z)  # beta 0: off
    padded = np.array([True] * 5 + [False])
    np.testing.assert_array_equal(gendd.repr_mixup(key, z, target, 1.0, padded)[1], target)
    # gradients flow through both z and z[π]
    grad = jax.grad(lambda v: jnp.sum(gendd.repr_mixup(key, v, target, 1.0)[0][0]))(z)
    assert np.count_nonzero(np.abs(np.asarray(grad)).sum(1)) in (1, 2)


def test_learning_rate_and_beta2_schedules():
    spe = 3  # steps per epoch
    step = gendd.step_lr_schedule(1e-3, spe, 50, [150, 180, 210], 0.1)
    at_epoch = lambda e: float(step((e - 1) * spe + 1))  # 1-based epochs, as the reference
    np.testing.assert_allclose([at_epoch(e) for e in (1, 25, 49)], [2e-5, 5e-4, 9.8e-4], rtol=1e-5)
    # [Q1] fixed: the base rate from the end of the warm-up to the first decay
    np.testing.assert_allclose([at_epoch(e) for e in (50, 100, 150)], [1e-3] * 3, rtol=1e-6)
    np.testing.assert_allclose([at_epoch(e) for e in (151, 180, 181, 211, 240)],
                               [1e-4, 1e-4, 1e-5, 1e-6, 1e-6], rtol=1e-5)
    np.testing.assert_allclose(float(gendd.step_lr_schedule(1e-3, spe, 0, [], 0.1)(0)), 1e-3)

    cos = gendd.cosine_lr_schedule(2e-3, 1e-6, spe, 10, 100)
    np.testing.assert_allclose([float(cos(e * spe)) for e in (0, 9)], [2e-4, 2e-3], rtol=1e-5)
    np.testing.assert_allclose(float(cos(99 * spe)), 1e-6, rtol=1e-4)
    np.testing.assert_allclose(float(cos(10 * spe)), 1e-6 + (2e-3 - 1e-6) * 0.5 * (1 + np.cos(np.pi / 90)),
                               rtol=1e-5)

    s1 = gendd.stage1_lr_schedule(3e-3, spe, 50)
    assert float(s1(0)) == pytest.approx(3e-3) and float(s1(spe - 1)) == pytest.approx(3e-3)
    assert 0 < float(s1(49 * spe)) < 1e-5  # [Q2] fixed: the last epoch still trains

    # reference_lr_quirks: [Q1] 0.98e-3 from epoch 50 to 150 (spec §6); [Q2] 1.5e-3 (1 + cos(πe/50))
    quirky = gendd.step_lr_schedule(1e-3, spe, 50, [150, 180, 210], 0.1, reference=True)
    at = lambda e: float(quirky((e - 1) * spe + 1))
    np.testing.assert_allclose([at(e) for e in (49, 50, 100, 150, 151, 181)],
                               [9.8e-4, 9.8e-4, 9.8e-4, 9.8e-4, 1e-4, 1e-5], rtol=1e-5)
    s1_reference = gendd.stage1_lr_schedule(3e-3, spe, 50, reference=True)
    np.testing.assert_allclose(float(s1_reference(0)), 1.5e-3 * (1 + np.cos(np.pi / 50)), rtol=1e-6)
    assert float(s1_reference(49 * spe)) == pytest.approx(0.0, abs=1e-12)

    b2 = gendd.beta2_schedule(0.95, 0.999, 101)
    np.testing.assert_allclose([float(b2(0)), float(b2(50)), float(b2(100))],
                               [0.95, (0.95 + 0.999) / 2, 0.999], rtol=1e-6)


def test_adamw_decay_and_freeze_masks_and_beta2_schedule():
    params = {"student": {"conv": {"kernel": jnp.ones((2,))},
                          "classifier": {"kernel": jnp.ones((2,)), "bias": jnp.ones((1,))}},
              "projector": {"scale": jnp.ones((2,)), "bias": jnp.ones((2,))},
              "head": {"w": jnp.ones((3,))}}
    b2 = gendd.beta2_schedule(0.5, 0.999, 10)
    config = parse_config(gendd.GenDDConfig, ["--teacher_dir", "unused", "--optim_weight_decay", "0.5"])
    opt = make_optimizer(config, 0.1, b2=b2, decay_mask=gendd.decay_mask_of(params),
                         frozen_mask=gendd.frozen_mask_of(params, True))
    state = opt.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, state = opt.update(zero, state, params)
    # zero gradient: only weight decay moves a parameter: -lr * wd * p
    np.testing.assert_allclose(updates["student"]["conv"]["kernel"], -0.05 * np.ones(2), rtol=1e-6)
    for leaf in jax.tree.leaves((updates["head"], updates["projector"],
                                 updates["student"]["classifier"])):
        assert not np.any(np.asarray(leaf))  # [Q3]: no decay for head and projector; fc frozen
    # the injected β2 follows its schedule (count 1 after one update)
    hyper = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "hyperparams"))
             if hasattr(s, "hyperparams")]
    np.testing.assert_allclose(float(hyper[0].hyperparams["b2"]), float(b2(0)), rtol=1e-6)
    # stage 2 supervised: the probe trains
    mask = gendd.frozen_mask_of(params, False)
    assert not any(jax.tree.leaves(mask))
    # the reference's grouping decays the projector LayerNorm too ([Q3] as it was)
    reference = gendd.decay_mask_of(params, projector_decay=True)
    assert all(jax.tree.leaves(reference["projector"])) and not any(jax.tree.leaves(reference["head"]))
    assert not any(jax.tree.leaves(gendd.decay_mask_of(params)["projector"]))


# ------------------------------------------------------------------------ data and teachers


@pytest.fixture
def fake_fmnist(tmp_path, small_splits, no_system_fmnist, writers):
    """A data root with 100 training and 30 test generated images; splits 60 / 40 / 30; no
    system copy and no payload checks."""
    root = tmp_path / "data"
    writers.write_fmnist_dir(root / datasets.FASHION_MNIST_DIRNAME, writers.make_fmnist_arrays(100, 30))
    return str(root)


def _teacher_net(planes=8):
    return ResNet(num_classes=10, depth=8, width=1, planes=planes, norm="bn", activation="relu",
                  conv_bias=False, pixel_mean=(0.286,), pixel_std=(0.353,))


def _random_variables(model, seed=11):
    """Random variables of the shapes of model.init, without compiling an initialiser."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name or "scale" in name:
            return np.ones(leaf.shape, np.float32)
        return (0.2 * rng.normal(size=leaf.shape)).astype(np.float32)

    return dict(jax.tree_util.tree_map_with_path(fill, shapes))


def _save_teacher(directory, planes=8):
    """A random BatchNorm ResNet exported as kind "resnet" (as sgd_swag.py swag: false)."""
    model = _teacher_net(planes)
    variables = _random_variables(model)
    params = variables.pop("params")
    save_resnet(str(directory), model, params, variables, data_name="FashionMNIST_x28")
    return model, params, variables


def test_load_teacher_kinds_and_errors(tmp_path):
    model, params, _ = _save_teacher(tmp_path / "run" / "model")
    loaded, variables, sidecar = gendd.load_teacher(str(tmp_path / "run"), "FashionMNIST_x28", 10)
    assert sidecar["kind"] == "resnet" and "batch_stats" in variables
    np.testing.assert_array_equal(variables["params"]["classifier"]["kernel"],
                                  params["classifier"]["kernel"])
    with pytest.raises(UserError, match="not CIFAR10_x32"):
        gendd.load_teacher(str(tmp_path / "run"), "CIFAR10_x32")
    with pytest.raises(UserError, match="10 classes but the data set has 100"):
        gendd.load_teacher(str(tmp_path / "run"), None, 100)
    _save_teacher(tmp_path / "run2" / "model")
    with pytest.raises(UserError, match="several runs"):
        gendd.load_teacher(str(tmp_path))
    # a swag_teacher: its SWA mean; a BatchNorm one cannot be used
    frn = ResNet(num_classes=10, depth=8, width=1, planes=4, pixel_mean=(0.286,), pixel_std=(0.353,))
    frn_params = _random_variables(frn)["params"]
    from models.resnet import resnet_spec
    side = {"kind": "swag_teacher", "model": resnet_spec(frn), "data_name": "FashionMNIST_x28",
            "num_classes": 10}
    save_export(str(tmp_path / "swag" / "model"), {"mean": frn_params, "params2": frn_params}, side)
    _, variables, _ = gendd.load_teacher(str(tmp_path / "swag"))
    assert set(variables) == {"params"}
    side["model"] = resnet_spec(_teacher_net())
    save_export(str(tmp_path / "swagbn" / "model"), {"mean": params, "params2": params}, side)
    with pytest.raises(UserError, match="swag: false"):
        gendd.load_teacher(str(tmp_path / "swagbn"))
    with pytest.raises(UserError, match="no exported model there"):
        gendd.load_teacher(str(tmp_path / "nowhere"))


def test_config_validation():
    with pytest.raises(UserError, match="teacher_dir"):
        parse_config(gendd.GenDDConfig, [])
    with pytest.raises(UserError, match="gendd_stage"):
        parse_config(gendd.GenDDConfig, ["--teacher_dir", "x", "--gendd_stage", "3"])
    with pytest.raises(UserError, match="unsupervised"):
        parse_config(gendd.GenDDConfig, ["--teacher_dir", "x", "--gendd_stage", "1",
                                         "--unsupervised", "true"])
    with pytest.raises(UserError, match="smooth"):
        parse_config(gendd.GenDDConfig, ["--teacher_dir", "x", "--smooth", "1.5"])
    # s defaults to the reference scripts': 0.9 supervised, 0 unsupervised; a given s is kept
    assert parse_config(gendd.GenDDConfig, ["--teacher_dir", "x"]).smooth == 0.9
    assert parse_config(gendd.GenDDConfig, ["--teacher_dir", "x", "--unsupervised", "true"]).smooth == 0.0
    assert parse_config(gendd.GenDDConfig, ["--teacher_dir", "x", "--unsupervised", "true",
                                            "--smooth", "0.5"]).smooth == 0.5
    with pytest.raises(UserError, match="no labels to mix"):
        parse_config(gendd.GenDDConfig, ["--teacher_dir", "x", "--unsupervised", "true",
                                         "--cutmix_alpha", "1.0"])


def test_shipped_configs_parse():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "config", "distillation")
    names = sorted(n for n in os.listdir(folder) if n.startswith("gendd_c100_"))
    assert len(names) == 14  # every CIFAR-100 pair of the reference's scripts (spec §6-7)
    for name in names:
        config = parse_config(gendd.GenDDConfig, ["--config", os.path.join(folder, name)])
        assert config.optim == "adamw" and config.teacher_dir.startswith("checkpoints_teacher/c100_crd/")
        assert config.model_arch is not None  # a RepDistiller zoo student
    c = parse_config(gendd.GenDDConfig, ["--config", os.path.join(folder, "gendd_c100_res32x4_res8x4.yaml")])
    assert (c.model_arch, c.smooth, c.token_dim) == ("resnet8x4", 0.7, 64)


# -------------------------------------------------------------------------- 2-step runs


def _argv(tmp, data_root, teacher, stage, save, extra=()):
    return ["--data_root", data_root, "--teacher_dir", teacher, "--gendd_stage", str(stage),
            "--save", save, "--seed", "3", "--num_train_examples", "16", "--optim_bs", "8",
            "--model_style", "BN-ReLU", "--model_depth", "8", "--model_width", "1",
            "--model_planes", "4", "--stage1_ne", "1", "--optim_ne", "1", "--warmup_epochs", "1",
            "--token_dim", "16", "--diffusion_batch_mul", "2", "--head_width", "16",
            "--head_depth", "1", "--num_sampling_steps", "4", "--num_sampling", "3",
            "--num_val_examples", "8", "--log_every", "1", "--smooth", "0.9", *extra]


@pytest.mark.slow
def test_two_stages_on_two_devices_and_predictor(tmp_path, fake_fmnist):
    """Stage 1 (P is a Dense: student 16-d, teacher 32-d) then stage 2 from its export (K = 2
    tokens of 16), 2 steps each on 2 simulated devices; the stage-2 export predicts [N, M, K]."""
    _save_teacher(tmp_path / "teacher" / "model", planes=8)
    teacher = str(tmp_path / "teacher")
    mesh = make_mesh(jax.devices()[:2])

    # stage 1 starts from a saved random student ("resnet" export): no initialiser to compile
    student = _teacher_net(planes=4)
    s_vars = _random_variables(student, seed=12)
    s_params = s_vars.pop("params")
    save_resnet(str(tmp_path / "student0"), student, s_params, s_vars)
    s1 = str(tmp_path / "s1")
    train(gendd.METHOD, parse_config(gendd.GenDDConfig, _argv(tmp_path, fake_fmnist, teacher, 1, s1, [
        "--init_from", str(tmp_path / "student0")])), mesh)
    side1 = json.load(open(os.path.join(s1, "model", "sidecar.json")))
    assert side1["kind"] == "gendd" and side1["gendd_stage"] == 1 and side1["feature_dim"] == 32
    records = [json.loads(line) for line in open(os.path.join(s1, "metrics.jsonl"))]
    assert records[-1]["step"] == 2 and np.isfinite(records[-1]["train/nll"])
    assert "val/teacher_acc" in records[-1]

    s2 = str(tmp_path / "s2")
    train(gendd.METHOD, parse_config(gendd.GenDDConfig, _argv(tmp_path, fake_fmnist, teacher, 2, s2,
                                                    ["--init_from", s1, "--x0_clip", "0.5"])), mesh)
    records = [json.loads(line) for line in open(os.path.join(s2, "metrics.jsonl"))]
    last = records[-1]
    assert last["step"] == 2
    for name in ("train/diff_loss", "train/mse", "train/vb", "train/probe_nll", "val/acc",
                 "val/probe_acc", "val/feature_mse"):
        assert np.isfinite(last[name]), name
    side2 = json.load(open(os.path.join(s2, "model", "sidecar.json")))
    assert side2["gendd_stage"] == 2 and side2["head"]["num_tokens"] == 2
    assert side2["x0_clip"] == 0.5

    # stage 2 started from stage 1's student (P dropped): the exports differ only by training
    from utils.checkpoints import load_export
    a1, _ = load_export(os.path.join(s1, "model"))
    a2, _ = load_export(os.path.join(s2, "model"))
    assert "proj" in a1 and "proj" not in a2 and {"projector", "head"} <= set(a2)
    assert set(a2["student"]["model_state"]) == {"batch_stats"}
    # stage 1 trained the backbone from the given weights but left the student's fc alone
    np.testing.assert_array_equal(a1["student"]["params"]["classifier"]["kernel"],
                                  s_params["classifier"]["kernel"])
    assert not np.allclose(a1["student"]["params"]["stem_conv"]["kernel"],
                           s_params["stem_conv"]["kernel"])

    predictor = load_any_predictor(s2)  # dispatches on the sidecar kind
    assert predictor.num_members == 3 and predictor.kind == "gendd"
    images = np.random.default_rng(5).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    logits = predict(predictor, images, batch_size=4, mesh=mesh)
    assert logits.shape == (6, 3, 10) and np.all(np.isfinite(logits))
    assert not np.allclose(logits[:, 0], logits[:, 1])  # members are distinct samples
    # x0_clip travels with the export: every sampled feature lies in [-0.5, 0.5]^D, so each
    # logit is within 0.5·Σ_d|W_dk| of the bias (the last step's mean is the clipped x̂0)
    classifier = a2["teacher_classifier"]
    bound = 0.5 * np.abs(classifier["kernel"]).sum(0) + np.abs(classifier["bias"]) + 1e-4
    assert np.all(np.abs(logits) <= bound)
    # the method's own prediction: the classifier on the mean feature, the mean member logit
    averaged = predict(gendd.load_predictor(s2, average_features=True), images, batch_size=4,
                       mesh=mesh)
    assert averaged.shape == (6, 1, 10)
    np.testing.assert_allclose(averaged[:, 0], logits.mean(1), rtol=1e-4, atol=1e-5)
    probe = predict(gendd.load_predictor(os.path.join(s2, "model"), probe=True), images,
                    batch_size=4, mesh=mesh)
    stage1 = predict(load_any_predictor(s1), images, batch_size=4, mesh=mesh)
    assert probe.shape == stage1.shape == (6, 1, 10) and np.all(np.isfinite(stage1))

    # a student of another architecture cannot start from this export
    bad = _argv(tmp_path, fake_fmnist, teacher, 2, str(tmp_path / "bad"),
                ["--init_from", s1, "--model_planes", "8"])
    with pytest.raises(UserError, match="planes"):
        train(gendd.METHOD, parse_config(gendd.GenDDConfig, bad), mesh)
    assert not os.path.exists(tmp_path / "bad")  # nothing written on bad input


class _TinyNet(nn.Module):
    """A stand-in for a zoo ResNet with its interface (BatchNorm, pooled feature, "classifier")."""
    features: int

    @nn.compact
    def __call__(self, images, train=False, return_features=False):
        x = nn.Dense(self.features, name="stem_conv")(images.reshape(images.shape[0], -1))
        pooled = nn.relu(nn.BatchNorm(use_running_average=not train, name="norm")(x))
        logits = nn.Dense(10, name="classifier")(pooled)
        return ResNetOutput(logits, pooled, x) if return_features else logits


def _tiny_stage2(head_width=8):
    """(student, teacher, head, params, student state, frozen) of a tiny stage 2: 16-d student,
    32-d teacher (2 tokens of 16), the head's zero-initialised layers as initialised."""
    student, teacher = _TinyNet(16), _TinyNet(32)
    x = jnp.zeros((2, 28, 28, 1))
    s_vars = dict(student.init(jax.random.key(0), x))
    t_vars = teacher.init(jax.random.key(1), x)
    head = gendd.DiffusionMLP(token_dim=16, num_tokens=2, width=head_width, depth=1, cond_drop_prob=0.2)
    params = {"student": s_vars.pop("params"),
              "projector": {"scale": jnp.ones(16), "bias": jnp.zeros(16)},
              "head": head.init(jax.random.key(2), jnp.zeros((1, 16)), jnp.zeros((1,), jnp.int32),
                                jnp.zeros((1, 16)), jnp.zeros((1,), jnp.int32))["params"]}
    frozen = {"teacher": t_vars, "classifier": t_vars["params"]["classifier"]}
    return student, teacher, head, params, s_vars, frozen


def test_stage2_gradients_reach_what_they_should():
    """The backbone learns only through the diffusion loss; the probe CE trains only fc_s;
    unsupervised: no CE and no gradient for the probe. The loss reads batch statistics."""
    student, teacher, head, params, s_vars, frozen = _tiny_stage2()
    params["head"] = jax.tree.map(lambda v: v + 0.1, params["head"])  # move off the zero init
    batch = {"images": jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1)),
                                   jnp.uint8),
             "labels": jnp.arange(4, dtype=jnp.int32), "mask": jnp.ones(4, bool)}
    diffusion = gendd.gd.make_cosine_diffusion(50)
    norm = lambda tree: float(optax.tree.norm(tree))
    backbone = lambda g: {k: v for k, v in g["student"].items() if k != "classifier"}

    def grads(terms, **overrides):
        """Gradients of each named term, from one compiled program."""
        config = gendd.GenDDConfig(teacher_dir="x", token_dim=16, diffusion_batch_mul=2,
                                   crop_padding=0, flip=False, **overrides)
        loss_fn = gendd.make_stage2_loss_fn(student, teacher, head, diffusion, config)

        def term_of(name):
            def objective(p):
                loss, (state, metrics) = loss_fn(p, s_vars, frozen, batch, jax.random.key(4))
                return loss if name == "loss" else metrics[name], (state, metrics)
            return jax.grad(objective, has_aux=True)

        return jax.jit(lambda p: [term_of(name)(p) for name in terms])(params)

    (g, (state, _)), (g_diff, _), (g_probe, _) = grads(["loss", "diff_loss", "probe_nll"])
    assert all(norm(part) > 0 for part in (g["student"]["classifier"], backbone(g),
                                           g["projector"], g["head"]))
    assert not np.allclose(state["batch_stats"]["norm"]["mean"], 0)  # train-mode BatchNorm
    assert norm(g_diff["student"]["classifier"]) == 0 and norm(backbone(g_diff)) > 0
    assert norm(g_probe["student"]["classifier"]) > 0 and norm(backbone(g_probe)) == 0
    assert norm(g_probe["projector"]) == 0 and norm(g_probe["head"]) == 0
    ((g, (_, metrics)),) = grads(["loss"], unsupervised=True, smooth=0.0)
    assert "probe_nll" not in metrics
    assert norm(g["student"]["classifier"]) == 0 and norm(backbone(g)) > 0


def test_stage2_takes_a_streamed_batch_and_its_soft_labels():
    """A streamed batch (workers already augmented it: `augmented_images`) with one-hot soft
    labels trains exactly as hard labels; other soft labels change the contraction target (qᵀW)
    and the probe's cross-entropy."""
    student, teacher, head, params, s_vars, frozen = _tiny_stage2()
    leaves, tree = jax.tree.flatten(params["head"])  # off the zero init, so ε̂ depends on x_t
    noise = [0.1 * jax.random.normal(jax.random.key(i), v.shape) for i, v in enumerate(leaves)]
    params["head"] = jax.tree.unflatten(tree, [v + n for v, n in zip(leaves, noise)])
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1)), jnp.uint8)
    labels = jnp.arange(4, dtype=jnp.int32)
    config = gendd.GenDDConfig(teacher_dir="x", token_dim=16, diffusion_batch_mul=2, beta=0.0,
                               crop_padding=0, flip=False)
    loss_fn = gendd.make_stage2_loss_fn(student, teacher, head, gendd.gd.make_cosine_diffusion(50),
                                        config)
    run = jax.jit(lambda batch: loss_fn(params, s_vars, frozen, batch, jax.random.key(4))[1][1])
    on_device = run({"images": images, "labels": labels, "mask": jnp.ones(4, bool)})
    streamed = {"augmented_images": images, "labels": labels, "mask": jnp.ones(4, bool)}
    one_hot = run({**streamed, "soft_labels": jax.nn.one_hot(labels, 10)})
    for name in ("diff_loss", "probe_nll", "probe_acc"):
        np.testing.assert_allclose(one_hot[name], on_device[name], rtol=1e-6)
    mixed = run({**streamed, "soft_labels": 0.5 * jax.nn.one_hot(labels, 10)
                 + 0.5 * jax.nn.one_hot(labels[::-1], 10)})
    assert mixed["diff_loss"] != one_hot["diff_loss"] and mixed["probe_nll"] != one_hot["probe_nll"]
    assert mixed["probe_acc"] == one_hot["probe_acc"]  # accuracy stays against the hard labels


def test_stage2_step_splits_the_diffusion_rows_across_devices():
    """On a data-parallel mesh each device runs the diffusion head on its own images' rows only:
    the training step's per-device FLOPs halve from one device to two (the head is most of them
    here: 0.50x). With the reference's row order (the B·K block tiled M times) XLA ran every row
    on every device: 1.00x."""
    from utils.cost import compiled_flops
    from utils.trainer import TrainState, device_step_inputs, make_train_step, put_replicated

    student, teacher, head, params, s_vars, frozen = _tiny_stage2(head_width=128)
    config = gendd.GenDDConfig(teacher_dir="x", token_dim=16, diffusion_batch_mul=8,
                               crop_padding=0, flip=False)
    loss_fn = gendd.make_stage2_loss_fn(student, teacher, head, gendd.gd.make_cosine_diffusion(50),
                                        config)
    optimizer = optax.sgd(0.1)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (16, 28, 28, 1)).astype(np.uint8), np.arange(16) % 10

    def per_device_flops(num_devices):
        mesh = make_mesh(jax.devices()[:num_devices])
        step = make_train_step(loss_fn, optimizer, 0, 0.0, mesh)
        state = put_replicated(TrainState.create(params, optimizer, s_vars), mesh)
        args = device_step_inputs(frozen, images, labels, np.arange(8), np.ones(8, bool), mesh)
        return compiled_flops(step.lower(state, *args).compile())

    one, two = per_device_flops(1), per_device_flops(2)
    assert two < 0.6 * one, two / one
