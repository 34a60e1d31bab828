"""scripts/device_env.sh: what a lent accelerator machine runs the project with. Its image lacks
some of pyproject.toml's dependencies and reaches no registry, so every dependency must be
either on the image (DEVICE_IMAGE_HAS) or carried as a wheel (DEVICE_WHEELS), and device_env
must find the carried ones by their import names (DEVICE_MODULES)."""
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_ENV = os.path.join(ROOT, "scripts", "device_env.sh")


def bash_list(name: str) -> list:
    """A bash array of device_env.sh, as the sourcing scripts see it."""
    out = subprocess.run(["bash", "-c", f'source "{DEVICE_ENV}"; printf "%s\\n" "${{{name}[@]}}"'],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def canonical(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)).lower()


def project_dependencies() -> set:
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return {canonical(r) for r in tomllib.load(f)["project"]["dependencies"]}


def test_every_dependency_is_on_the_image_or_carried():
    image = {canonical(name) for name in bash_list("DEVICE_IMAGE_HAS")}
    wheels = {canonical(r) for r in bash_list("DEVICE_WHEELS")}
    assert all("==" in r for r in bash_list("DEVICE_WHEELS"))  # pinned: what was tested
    assert project_dependencies() - image - wheels == set()
    assert not image & wheels
    # a carried wheel that is no dependency of the project is one of a carried dependency's own
    carried = project_dependencies() & wheels
    theirs = {canonical(r) for dist in carried for r in importlib.metadata.requires(dist) or ()
              if "extra ==" not in r}
    assert wheels - carried <= theirs


def test_device_env_looks_for_every_carried_dependency_by_its_import_name():
    modules = set(bash_list("DEVICE_MODULES"))
    carried = project_dependencies() & {canonical(r) for r in bash_list("DEVICE_WHEELS")}
    provides = {}  # distribution -> its top-level modules, in this environment
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            provides.setdefault(canonical(dist), set()).add(module)
    for dist in carried:
        assert provides[dist] & modules, dist


@pytest.mark.parametrize("python, status", [(sys.executable, 0), ("false", 2)])
def test_device_env_needs_the_wheels_only_where_a_module_is_missing(python, status, tmp_path):
    """With every module importable it changes nothing; without (`false` as the Python) and no
    .whl/ it returns 2 with one line saying how to get the wheels."""
    script = f'source "{DEVICE_ENV}"; device_env {python}; status=$?; echo "PYTHONPATH=${{PYTHONPATH:-}}"; exit $status'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == status and proc.stdout.strip() == "PYTHONPATH="
    if status:
        assert len(proc.stderr.splitlines()) == 1 and "accelerator_suite.sh --prepare" in proc.stderr
    else:
        assert proc.stderr == ""
