import dataclasses
import os
import re
from typing import Optional

import pytest
import yaml

from utils.config import CommonConfig, parse_config, prepare_run_dir
from utils.errors import UserError


@dataclasses.dataclass
class DemoConfig(CommonConfig):
    optim_lr: float = 0.1
    bandwidth_range: list[float] = dataclasses.field(default_factory=lambda: [2.0, 10.0])
    boundaries: dict[int, float] = dataclasses.field(default_factory=dict)
    teacher_dir: Optional[str] = None


def write(tmp_path, values):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_then_cli_precedence_and_types(tmp_path):
    path = write(tmp_path, {"optim_lr": 0.05, "optim_bs": 64, "bandwidth_range": [1, 2]})
    config = parse_config(DemoConfig, ["--config", path, "--optim_lr", "1e-3", "--seed", "7",
                                       "--boundaries", "{175: 0.33}", "--nowandb"])
    assert config.optim_lr == 0.001 and config.optim_bs == 64 and config.seed == 7
    assert config.bandwidth_range == [1.0, 2.0] and isinstance(config.bandwidth_range[0], float)
    assert config.boundaries == {175: 0.33} and config.wandb is False
    assert parse_config(DemoConfig, ["--exp_name", "123"]).exp_name == "123"  # str stays str
    assert parse_config(DemoConfig, ["--config", write(tmp_path, {"optim_lr": "5e-4"})]).optim_lr == 5e-4


@pytest.mark.parametrize("argv, message", [
    (["--optim_lrr", "0.1"], "optim_lr"),
    (["--optim_bs", "abc"], "optim_bs expects int"),
    (["--optim_lr", "true"], "optim_lr expects float"),
    (["--model_depth", "9"], r"6n\+2"),
    (["--optim_bs"], "needs a value"),
    (["stray"], "unexpected argument"),
])
def test_bad_input_is_one_clear_error(argv, message):
    with pytest.raises(UserError, match=message):
        parse_config(DemoConfig, argv)


def test_unknown_yaml_key_names_nearest(tmp_path):
    with pytest.raises(UserError, match="did you mean teacher_dir"):
        parse_config(DemoConfig, ["--config", write(tmp_path, {"teacher_dirr": "x"})])


def test_run_dir_refuses_existing_and_resume_reloads(tmp_path):
    run = str(tmp_path / "run")
    config = parse_config(DemoConfig, ["--save", run, "--optim_lr", "0.3"])
    assert prepare_run_dir(config, "demo") == run
    saved = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert saved["optim_lr"] == 0.3
    marker = os.path.join(run, "metrics.jsonl")
    open(marker, "w").write("keep\n")
    again = parse_config(DemoConfig, ["--save", run])
    with pytest.raises(UserError, match="already holds a run"):
        prepare_run_dir(again, "demo")
    assert open(marker).read() == "keep\n"  # nothing touched
    resumed = parse_config(DemoConfig, ["--resume", run])
    assert resumed.optim_lr == 0.3  # the saved config is the base on resume
    assert prepare_run_dir(resumed, "demo") == run
    with pytest.raises(UserError, match="not a run directory"):
        parse_config(DemoConfig, ["--resume", str(tmp_path / "nothing")])


@dataclasses.dataclass
class HelpConfig(CommonConfig):
    """optim_lr is redeclared without a comment: it keeps the base's meaning."""

    optim_lr: float = 0.5
    temperature: float = 1.0  # scale of the sampling noise
    lr_decay_epochs: list[int] = dataclasses.field(  # lr × 0.1 at each
        default_factory=lambda: [150, 180])
    ALIASES = {"optim_base": "optim"}
    UNUSED = ("t_offset",)


def test_help_lists_every_key_with_type_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_config(HelpConfig, ["--optim_lr", "2", "--help"])
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split(None, 3)[1:] for line in lines if line.startswith("  --")}
    assert list(rows) == [f"--{f.name}" for f in dataclasses.fields(HelpConfig)]
    assert rows["--optim_lr"] == ["float", "0.5", "peak learning rate"]
    assert rows["--temperature"] == ["float", "1.0", "scale of the sampling noise"]
    decay = next(line for line in lines if line.startswith("  --lr_decay_epochs"))
    assert re.search(r"list\[int\] +\[150, 180\] +lr × 0.1 at each$", decay), decay
    assert rows["--select_metric"][:2] == ["str|null", "null"]
    assert any("optim_base = optim" in line for line in lines)
    assert any(line.endswith("t_offset") for line in lines)


def test_every_key_of_every_script_has_a_meaning():
    """--help reads meanings from the config classes' comments: a key added without one fails."""
    from evaluate import EvaluateConfig
    from utils.config import key_meanings
    from utils.method import methods

    for config_class in [m.config_class for m in methods().values()] + [EvaluateConfig]:
        meanings = key_meanings(config_class)
        undocumented = [f.name for f in dataclasses.fields(config_class) if not meanings.get(f.name)]
        assert not undocumented, f"{config_class.__name__}: {undocumented}"
