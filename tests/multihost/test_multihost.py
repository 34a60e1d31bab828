"""Two processes on 127.0.0.1 (2 CPU devices each, gloo collectives) train as one process with
4 devices, to float rounding: each process feeds only its devices' rows of every global batch, from
the data set on its devices and from a stream (each process reading only its rows)."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir, num_processes, devices_per_process):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
           "JAX_PLATFORMS": "cpu"}
    # No persistent compilation cache: processes that hit it unevenly (one reads a program the
    # other compiles) can miss the distributed runtime's barriers.
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                "JAX_COMPILATION_CACHE_DIR"):
        env.pop(var, None)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    if num_processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES=str(num_processes))
    procs = [subprocess.Popen([sys.executable, WORKER, str(out_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**env, "JAX_PROCESS_ID": str(i)} if num_processes > 1 else env)
             for i in range(num_processes)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    # A failure in one process often shows only as a barrier time-out in the other: show both.
    assert all(p.returncode == 0 for p in procs), "\n".join(
        f"--- process {i} (exit {p.returncode}) ---\n{out[-2500:]}"
        for i, (p, out) in enumerate(zip(procs, outputs)))
    return outputs


def flat_params(run_dir, name):
    arrays = np.load(run_dir / name)
    return np.concatenate([arrays[key].ravel() for key in sorted(arrays.files)])


@pytest.mark.slow
def test_two_hosts_match_one(tmp_path):
    multi = launch(tmp_path / "multi", num_processes=2, devices_per_process=2)
    assert any("process 1 of 2: 4 devices" in out for out in multi)
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    launch(single_dir, num_processes=1, devices_per_process=4)
    initial = flat_params(single_dir, "params_init.npz")
    np.testing.assert_array_equal(flat_params(multi_dir, "params_init.npz"), initial)
    # The two all-reduce in different orders (gloo across processes, in-process on one), so the
    # parameters agree to float rounding, not bit for bit: measured against how far the 10 steps
    # moved them (about 7e-7 of it here; a process reading another's rows moves them ~0.1 apart).
    for path in ("params.npz", "params_stream.npz"):
        assert sorted(np.load(multi_dir / path).files) == sorted(np.load(single_dir / path).files)
        single, multi = flat_params(single_dir, path), flat_params(multi_dir, path)
        update = np.linalg.norm(single - initial)
        assert np.linalg.norm(multi - single) < 1e-5 * update, (path, np.linalg.norm(multi - single) / update)
    # the two paths differ (the stream's transform draws), so the comparison above is not vacuous
    on_device, stream = flat_params(single_dir, "params.npz"), flat_params(single_dir, "params_stream.npz")
    assert np.linalg.norm(stream - on_device) > 1e-2 * np.linalg.norm(on_device - initial)
