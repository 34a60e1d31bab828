"""Every shipped YAML parses into its script's config (keys exist, types match, ranges hold)."""
import glob
import os

import pytest

from edfm import EdfmConfig
from fed import FedConfig
from gendd import GenDDConfig
from kd_and_endd import DistillConfig
from sgd_swag import SwagConfig
from utils.config import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_CONFIGS = {"teacher/": SwagConfig, "distillation/kd_": DistillConfig,
                  "distillation/endd_": DistillConfig, "distillation/fed_": FedConfig,
                  "distillation/edfm_": EdfmConfig, "distillation/gendd_": GenDDConfig}
FILES = sorted(glob.glob(os.path.join(ROOT, "config", "teacher", "*.yaml")) +
               glob.glob(os.path.join(ROOT, "config", "distillation", "*.yaml")))


def config_class(path):
    relative = os.path.relpath(path, os.path.join(ROOT, "config"))
    return next(cls for prefix, cls in SCRIPT_CONFIGS.items() if relative.startswith(prefix))


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f) for f in FILES])
def test_shipped_config_parses(path):
    config = parse_config(config_class(path), ["--config", path])
    assert config.data_name in ("FashionMNIST_x28", "CIFAR10_x32", "CIFAR100_x32")


def test_every_method_has_its_three_data_sets():
    names = {os.path.basename(f) for f in FILES}
    for method in ("kd", "endd", "fed", "edfm"):
        for data in ("c10", "c100", "fmnist"):
            assert f"{method}_{data}_frnrelu.yaml" in names
    for data in ("c10", "c100", "fmnist"):
        assert f"{data}_frnrelu_sgd_swag.yaml" in names


@pytest.mark.parametrize("cls", [DistillConfig, FedConfig, EdfmConfig])
def test_student_augmentation_keys(cls):
    """The spec's CIFAR pipeline by default; each step can be switched, and bad values refused."""
    from utils.errors import UserError

    default = parse_config(cls, [])
    assert (default.randaugment, default.crop_padding, default.flip) == (True, 4, True)
    fmnist = parse_config(cls, ["--crop_padding", "1", "--flip", "false", "--randaugment", "false"])
    assert (fmnist.randaugment, fmnist.crop_padding, fmnist.flip) == (False, 1, False)
    with pytest.raises(UserError, match="crop_padding"):
        parse_config(cls, ["--crop_padding", "-1"])
    with pytest.raises(UserError, match="mixup_alpha"):
        parse_config(cls, ["--mixup_alpha", "-0.1"])
