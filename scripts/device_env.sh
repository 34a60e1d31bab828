# Sourced by the scripts that run on a lent accelerator machine (bench/accelerator_suite.sh,
# scripts/paper_gpu.sh). That machine reaches no registry, and its python3 (the image's, not this
# project's pins) has DEVICE_IMAGE_HAS but not the rest of pyproject.toml's dependencies: those
# are carried as DEVICE_WHEELS (`bash bench/accelerator_suite.sh --prepare` downloads them here
# into .whl/; the device call carries .whl). `device_env PYTHON` installs them there into a folder
# of its own and puts that on PYTHONPATH. Returns 2, with one line, when a module of
# DEVICE_MODULES is missing and no wheel is there. tests/test_device_env.py checks that every
# dependency is in one list or the other.
DEVICE_IMAGE_HAS=(jax flax optax orbax-checkpoint numpy pyyaml tqdm scipy scikit-learn matplotlib pillow)
# Pinned (a version this code was tested with), with what they need that the image lacks:
# grain's array_record, cloudpickle, portpicker; ott-jax's jaxopt.
DEVICE_WHEELS=(dm-pix==0.4.5 grain==0.2.18 array_record==0.8.6 cloudpickle==3.1.3 portpicker==1.6.0
               ott-jax==0.6.0 jaxopt==0.8.5)
DEVICE_MODULES=(dm_pix grain ott)  # the import names of the carried dependencies

device_env() {
    local python=$1
    if "$python" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))' \
        "${DEVICE_MODULES[@]}"; then
        return 0
    fi
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    if ((${#wheels[@]} == 0)); then
        echo "${DEVICE_MODULES[*]}: not all installed, and .whl/ holds no wheel: run 'bash" \
            "bench/accelerator_suite.sh --prepare' where pip reaches PyPI, and carry .whl" >&2
        return 2
    fi
    local site=${TMPDIR:-/tmp}/bench-site
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${wheels[@]}" || return 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}
