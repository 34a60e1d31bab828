"""The seam between methods: the small interface every method fills, and the registry.

An entry script is one method. At its end it declares

    METHOD = register(Method(name="kd_and_endd", config_class=DistillConfig, build=build,
                             load_predictor=load_predictor, export_kinds=("resnet", "proxy_endd"),
                             config_files=("distillation/kd_*", "distillation/endd_*")))
    main = train_main(METHOD)                       # utils/driver.py: the one driver

`build(config, dataset) -> Run` is the method: the initial train state, the loss and the
validation metrics, the optimizer and its schedule, the frozen arrays (teachers, a backbone),
which validation metric selects the exported checkpoint, and how to export it. The driver does
everything else (config, data, run directory, trainer, selection, export, test table, logs).

Nothing else keeps a list of methods: `methods()` imports the entry scripts at the repository's
top level (the modules there that define METHOD) and the registry answers "which method
predicts with this export kind" (utils.predict), "which config class reads this YAML"
(tests/test_configs.py), and "which step does this benchmark build" (bench/common.py).
"""
import dataclasses
import fnmatch
import importlib
import os
from typing import Any, Callable, Optional

from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Run:
    """One training run of a method, as the shared trainer runs it (utils/trainer.py)."""

    state: Any  # the initial utils.trainer.TrainState
    loss_fn: Callable  # (params, model_state, frozen, batch, key) -> (loss, (model_state, metrics))
    eval_fn: Callable  # (state, frozen, batch, key) -> {name: per-example values [B]}
    optimizer: Any  # an optax.GradientTransformation
    export: Callable  # (selected state, its validation metrics) -> (arrays, sidecar)
    frozen: Any = None  # arrays the step reads but does not train (teachers, a backbone)
    lr_schedule: Optional[Callable] = None  # only to log the learning rate
    select_metric: Optional[str] = None  # validation metric that picks the export; None: last
    select_mode: Optional[str] = None  # "max" | "min"; default: max for an accuracy
    num_epochs: Optional[int] = None  # default: config.optim_ne
    ema_decay: float = 0.0
    val: Any = None  # the validation split; default: the data set's
    # export directory -> the Predictors of the end-of-run test table (the first is the
    # reference for KL); default: the teacher ensemble (when the config has teacher_dir) and
    # the export.
    test_predictors: Optional[Callable] = None
    summary: str = ""  # one line printed before training


@dataclasses.dataclass(frozen=True)
class Sweep:
    """An evaluation sweep: the same export predicted under several options, one point each.

    `points` are (x, load_predictor options) pairs; evaluate.py tables and plots every metric
    against x (x_label)."""

    name: str  # e.g. "members", "heun_exp steps"
    x_label: str
    points: tuple  # ((x, {option: value}), ...)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # the entry script's module name, e.g. "kd_and_endd"
    config_class: type
    build: Callable  # (config, data.datasets.Dataset) -> Run
    load_predictor: Callable  # (export dir, **options) -> utils.predict.Predictor
    export_kinds: tuple  # the sidecar kinds load_predictor reads
    config_files: tuple = ()  # globs under config/ of the YAMLs this method reads
    # (load_predictor options, the user's per-student settings) -> [Sweep]; evaluate.py's
    # sweeps of a student of this method (EDFM: members, steps, solver).
    sweeps: Optional[Callable] = None

    @property
    def script(self) -> str:
        return f"{self.name}.py"


@dataclasses.dataclass(frozen=True)
class ConfigReader:
    """How the YAMLs under config/ that match `pattern` are read: `parse(argv) -> config`."""

    pattern: str
    parse: Callable
    method: Optional["Method"] = None  # the method whose config it is (None: evaluate.py's)


_METHODS: dict[str, Method] = {}
_READERS: list[ConfigReader] = []
_DISCOVERED = False


def register(method: Method) -> Method:
    # The same script may register twice (run as __main__, then imported by name): last wins.
    for other in _METHODS.values():
        if other.name != method.name and set(other.export_kinds) & set(method.export_kinds):
            raise ValueError(f"{method.name} and {other.name} both predict kinds "
                             f"{sorted(set(other.export_kinds) & set(method.export_kinds))}")
    _METHODS[method.name] = method
    for pattern in method.config_files:
        register_config(pattern, _parser(method.config_class), method)
    return method


def register_config(pattern: str, parse: Callable, method: Optional[Method] = None):
    """Declare how the YAMLs matching `pattern` (relative to config/) are parsed."""
    global _READERS
    _READERS = [r for r in _READERS if r.pattern != pattern] + [ConfigReader(pattern, parse, method)]


def _parser(config_class):
    from utils.config import parse_config

    return lambda argv: parse_config(config_class, argv)


def discover():
    """Import every entry script at the repository's top level once, so each registers itself."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for entry in sorted(os.listdir(ROOT)):
        name, ext = os.path.splitext(entry)
        if ext != ".py" or not name.isidentifier():
            continue
        with open(os.path.join(ROOT, entry)) as f:
            source = f.read()
        if "register(" not in source and "register_config(" not in source:
            continue  # only the entry scripts register
        importlib.import_module(name)


def methods() -> dict[str, Method]:
    discover()
    return dict(_METHODS)


def method_for_kind(kind: str) -> Method:
    for method in methods().values():
        if kind in method.export_kinds:
            return method
    known = sorted(k for m in _METHODS.values() for k in m.export_kinds)
    raise UserError(f"no method predicts with exports of kind {kind!r} (known: {', '.join(known)})")


def config_reader(path: str) -> ConfigReader:
    """The reader of a YAML under config/ (its path relative to config/ or absolute)."""
    discover()
    relative = os.path.relpath(os.path.abspath(path), os.path.join(ROOT, "config"))
    for reader in _READERS:
        if fnmatch.fnmatch(relative, reader.pattern):
            return reader
    raise UserError(f"no method reads {relative}: its name matches none of "
                    f"{', '.join(r.pattern for r in _READERS)}")
