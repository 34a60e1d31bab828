# Sourced by the scripts that run on a lent accelerator machine (bench/accelerator_suite.sh,
# scripts/paper_gpu.sh). That machine's python3 has jax[cuda], flax, optax, orbax-checkpoint,
# chex, numpy, scipy, pyyaml and tqdm, but not dm-pix or grain, and reaches no registry:
# `device_env PYTHON` installs them from the wheels in .whl/ (`bash bench/accelerator_suite.sh
# --prepare` downloads them here; the device call carries .whl) into a folder of its own and
# puts that on PYTHONPATH. Returns 2, with one line, when they are missing and no wheel is there.
device_env() {
    local python=$1
    if "$python" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("dm_pix", "grain")))'; then
        return 0
    fi
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    if ((${#wheels[@]} == 0)); then
        echo "dm_pix or grain is not installed and .whl/ holds no wheel: run 'bash bench/accelerator_suite.sh" \
            "--prepare' where pip reaches PyPI, and carry .whl" >&2
        return 2
    fi
    local site=${TMPDIR:-/tmp}/bench-site
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${wheels[@]}" || return 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}
