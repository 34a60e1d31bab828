"""Installing the project puts no module named utils, data, models or evaluate on the import path
of other programs: outside the checkout, `import utils` finds none of ours."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_project_exposes_no_top_level_modules(tmp_path):
    probe = ("import importlib.util, json; print(json.dumps({name: getattr(importlib.util.find_spec(name), "
             "'origin', None) for name in ('utils', 'data', 'models', 'evaluate', 'edfm', 'hydra')}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True)
    import json

    found = {name: origin for name, origin in json.loads(out.stdout).items()
             if origin is not None and os.path.abspath(origin).startswith(ROOT)}
    assert found == {}, f"modules of the checkout importable from elsewhere: {found}"
