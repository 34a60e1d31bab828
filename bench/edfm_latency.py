"""(b) EDFM prediction cost against one backbone forward and a teacher ensemble forward.

    python bench/edfm_latency.py --preset c10 [--batch 128]
    python bench/edfm_latency.py --preset c100

Three predictions of the same uint8 batch, on one device, each one compiled call
(utils.cost.predictor_cost: latency median after warm-up with block_until_ready, FLOPs from
XLA's cost analysis with every iteration of the ODE and member loops counted):
- EDFM: `--members` (32) members per input, the `--solver` (heun_exp) ODE in `--steps` (7)
  steps = 2(S−1)+1 = 13 velocity evaluations of the AdaLN MLP head over all B·M rows, after one
  backbone forward. Built by edfm.py itself: a randomly initialised head and backbone exported
  with edfm.export_edfm and loaded with edfm.load_predictor (so the sampling code is the one
  evaluate.py times), the head sized by the preset's EDFM config (c10: 256 wide, c100: 512).
- backbone: one forward of the same ResNet with its classifier (utils.predict.resnet_predictor).
- teacher: `--teacher_members` (30) SWAG members of the preset's teacher ResNet in one call,
  utils.teachers.ensemble_logits (lax.map over members on CPU, vmap on accelerators).
All in float32: load_predictor builds the backbone in float32.

Reading the output: `latency_s` and `flops_per_batch` of each; `ratios` measured in this run:
edfm_over_backbone (target: <= 1.5), edfm_over_teacher, teacher_over_backbone, for latency and
for FLOPs.
"""
import argparse
import os
import tempfile

import common
import jax
import jax.numpy as jnp
import numpy as np

import edfm
from models.resnet import resnet_from_config
from utils.cost import predictor_cost
from utils.checkpoints import save_export
from utils.predict import Predictor, count_params, resnet_predictor
from utils.teachers import draw_members, ensemble_logits

TARGET = 1.5  # EDFM latency <= 1.5 x one backbone forward


def edfm_predictor(config, backbone, variables, num_classes, image_shape, args, directory):
    head = edfm.make_head(num_classes, **{k: getattr(config, k) for k in edfm.HEAD_FIELDS})
    cond_dim = edfm.feature_dim(backbone, variables, image_shape)
    head_params = jax.jit(head.init)(jax.random.PRNGKey(config.seed), jnp.zeros((1, num_classes)),
                                     jnp.zeros((1, cond_dim)), jnp.zeros((1,)))["params"]
    export = os.path.join(directory, "model")
    save_export(export, *edfm.export_edfm(config, num_classes, head_params, backbone, variables,
                                          directory, {"method": "random init"}))
    return edfm.load_predictor(export, num_members=args.members, num_steps=args.steps,
                               solver=args.solver)


def teacher_predictor(model, moments, num_members: int) -> Predictor:
    """M members drawn once, run as utils.teachers.teacher_predictor runs them."""
    members = jax.jit(draw_members, static_argnums=2)(jax.random.PRNGKey(0), moments, num_members)

    def member_logits(member_params, images, key):
        return jnp.moveaxis(ensemble_logits(model, member_params, images), 0, 1)

    return Predictor(name=f"Teacher ({num_members})", kind="swag_teacher", member_logits=member_logits,
                     args=members, num_members=num_members, num_params=count_params(members),
                     sidecar={})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(parser, training=False)
    common.add_run_args(parser)
    parser.add_argument("--members", type=int, default=32, help="EDFM members per input")
    parser.add_argument("--steps", type=int, default=7, help="ODE steps")
    parser.add_argument("--solver", default="heun_exp", help="models.flow_matching method")
    parser.add_argument("--teacher_members", type=int, default=30)
    parser.add_argument("--skip_flops", action="store_true", help="no FLOP counts (saves compiles)")
    args = parser.parse_args(argv)

    config, _ = common.preset_config("edfm", args)
    spec, num_classes = common.data_spec(args)
    image_shape = (args.size, args.size, 3)
    resnet = lambda cfg: resnet_from_config(cfg, num_classes, spec.pixel_mean, spec.pixel_std)
    backbone = resnet(config)
    variables = common.init_variables(backbone, image_shape)
    teacher_model = resnet(common.preset_config("sgd_swag", args)[0])
    moments = common.teacher_moments(teacher_model, args.teacher_runs, image_shape)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, *image_shape), dtype=np.uint8)

    with tempfile.TemporaryDirectory() as tmp:
        predictors = {
            "edfm": edfm_predictor(config, backbone, variables, num_classes, image_shape, args, tmp),
            "backbone": resnet_predictor(backbone, variables, {}),
            "teacher": teacher_predictor(teacher_model, moments, args.teacher_members),
        }
        costs = {name: predictor_cost(p, images, repeats=args.repeats, warmup=args.warmup,
                                      flops=not args.skip_flops) for name, p in predictors.items()}
    costs["edfm"]["velocity_evaluations"] = predictors["edfm"].sidecar["predictor"]["head_evals"]

    ratios = {}
    for key, suffix in (("latency_s", "latency"), ("flops_per_batch", "flops")):
        get = lambda name: costs[name].get(key)
        ratios[f"edfm_over_backbone_{suffix}"] = common.ratio(get("edfm"), get("backbone"))
        ratios[f"edfm_over_teacher_{suffix}"] = common.ratio(get("edfm"), get("teacher"))
        ratios[f"teacher_over_backbone_{suffix}"] = common.ratio(get("teacher"), get("backbone"))
    ratios = {k: v for k, v in ratios.items() if v is not None}

    common.print_rows(f"prediction of {args.batch} images ({args.preset})", costs, {
        "num_members": "d", "latency_s": ".4g", "flops_per_batch": ".3e", "num_params": ",d"})
    print("\n".join(f"{k:>32}: {v:.3f}" for k, v in ratios.items()))
    common.save(common.result_name("edfm_latency", args), {
        "config": vars(args), "target_edfm_over_backbone": TARGET,
        "meets_target": ratios["edfm_over_backbone_latency"] <= TARGET,
        "ratios": ratios, "predictors": costs}, args.out_dir)
    return costs, ratios


if __name__ == "__main__":
    main()
