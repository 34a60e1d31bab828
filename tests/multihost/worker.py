"""One process of the multi-host test: a few epochs of the shared trainer with sgd_swag's loss,
on the on-device path and on the streaming path (each process reading its rows of every batch).

Run as `python worker.py OUT_DIR` with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID set (several processes) or unset (one process). Writes the initial and the final parameters.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from utils.distributed import initialize_from_env  # noqa: E402

initialize_from_env()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from data.datasets import Split  # noqa: E402
from data.sources import ArraySource  # noqa: E402
from data.stream import Stream  # noqa: E402
from models.resnet import ResNet  # noqa: E402
from sgd_swag import make_loss_fn  # noqa: E402
from utils.config import CommonConfig  # noqa: E402
from utils.optim import make_optimizer  # noqa: E402
from utils.trainer import Trainer, TrainState, make_mesh  # noqa: E402

MODEL = ResNet(10, depth=8, width=1, pixel_mean=(0.5,), pixel_std=(0.25,))


def eval_fn(state, frozen, batch, key):
    logits = MODEL.apply({"params": state.params}, batch["images"].astype(jnp.float32) / 255)
    return {"acc": (logits.argmax(-1) == batch["labels"]).astype(jnp.float32)}


def shifted(image, rng):
    """A training transform that draws from the example's generator (a random brightness)."""
    return np.clip(image.astype(np.int32) + rng.integers(-20, 21), 0, 255).astype(np.uint8)


def save_params(state, path):
    if jax.process_index() == 0:
        flat = {"/".join(str(k.key) for k in keys): np.asarray(leaf)
                for keys, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
        np.savez(path, **flat)


def main(out_dir):
    rng = np.random.default_rng(0)  # every process holds the same data set
    train = Split(rng.integers(0, 256, (72, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 72).astype(np.int32))
    val = Split(rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 20).astype(np.int32))
    # A learning rate at which training is stable: at 0.05 this net is chaotic, and the last-bit
    # differences between gloo's and the in-process all-reduce grow to 1% of the update in 10 steps.
    optimizer = make_optimizer(CommonConfig(optim_momentum=0.9, optim_weight_decay=5e-4), 0.01)
    trainer = Trainer(run_dir=os.path.join(out_dir, "run"), optimizer=optimizer,
                      loss_fn=make_loss_fn(MODEL), eval_fn=eval_fn, seed=3, batch_size=16,
                      num_epochs=2, mesh=make_mesh(), select_metric="acc", select_mode="max")
    params = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    save_params(TrainState.create(params, optimizer), os.path.join(out_dir, "params_init.npz"))
    state = trainer.fit(TrainState.create(params, optimizer), train, val)
    trainer.checkpoints.close()
    save_params(state, os.path.join(out_dir, "params.npz"))

    # The streaming path: this process reads only its rows of every global batch.
    hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
    stream = Stream(ArraySource(train.images, train.labels), 16, shifted, (28, 28, 1), train=True,
                    seed=3, **hosts)
    trainer = Trainer(run_dir=os.path.join(out_dir, "run_stream"), optimizer=optimizer,
                      loss_fn=make_loss_fn(MODEL), eval_fn=eval_fn, seed=3, batch_size=16,
                      num_epochs=2, mesh=make_mesh(), select_metric="acc", select_mode="max")
    state = trainer.fit(TrainState.create(params, optimizer), stream, val)
    trainer.checkpoints.close()
    save_params(state, os.path.join(out_dir, "params_stream.npz"))
    print(f"process {jax.process_index()} of {jax.process_count()}: {len(jax.devices())} devices")


if __name__ == "__main__":
    main(sys.argv[1])
