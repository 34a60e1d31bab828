"""The optimizer every script builds from its config (optax), and the schedules they share."""
import jax.numpy as jnp
import numpy as np
import optax


def make_optimizer(config, schedule, *, b2=None, decay_mask=None, frozen_mask=None):
    """The config's optimizer with a learning-rate `schedule`.

    - `optim: sgd` (the reference's): heavy-ball momentum `optim_momentum`, L2 weight decay
      `optim_weight_decay` added to the gradient of every parameter before momentum.
    - `optim: adam` (or `adamw`): Adam(adam_beta1, adam_beta2, adam_eps) with decoupled weight
      decay `optim_weight_decay` scaled by the learning rate (PyTorch's AdamW; plain Adam at 0).
      `b2` may replace adam_beta2 by a schedule (a function of the step).
    `decay_mask` limits weight decay to some leaves; the updates of `frozen_mask` leaves are
    zeroed (parameters a method keeps fixed but checkpoints with the rest).
    """
    if config.optim == "sgd":
        parts = [optax.add_decayed_weights(config.optim_weight_decay, mask=decay_mask),
                 optax.sgd(schedule, momentum=config.optim_momentum)]
    else:
        b2 = config.adam_beta2 if b2 is None else b2
        adam = (optax.inject_hyperparams(optax.scale_by_adam)(b1=config.adam_beta1, b2=b2,
                                                              eps=config.adam_eps)
                if callable(b2) else optax.scale_by_adam(b1=config.adam_beta1, b2=b2,
                                                         eps=config.adam_eps))
        parts = [adam, optax.add_decayed_weights(config.optim_weight_decay, mask=decay_mask),
                 optax.scale_by_learning_rate(schedule)]
    if frozen_mask is not None:
        parts.append(optax.masked(optax.set_to_zero(), frozen_mask))
    return optax.chain(*parts)


def warmup_cosine(base_lr: float, total_steps: int, warmup_steps: int = 0,
                  warmup_factor: float = 0.01):
    """Linear warm-up from warmup_factor·lr to lr over `warmup_steps` optimizer steps, then a
    cosine to 0 over the remaining steps (the KD/ProxyEnDD/EDFM schedule)."""
    cosine = optax.cosine_decay_schedule(base_lr, max(total_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return cosine
    warmup = optax.linear_schedule(warmup_factor * base_lr, base_lr, warmup_steps)
    return optax.join_schedules([warmup, cosine], [warmup_steps])


def epoch_piecewise(base_lr: float, steps_per_epoch: int, boundaries_and_scales: dict):
    """A constant rate multiplied by each scale from its epoch on (FED's schedule)."""
    return optax.piecewise_constant_schedule(
        base_lr, {int(epoch) * steps_per_epoch: float(scale)
                  for epoch, scale in boundaries_and_scales.items()})


def step_lr_schedule(base_lr: float, steps_per_epoch: int, warmup_epochs: int,
                     decay_epochs, decay_rate: float, reference: bool = False):
    """Set per 1-based epoch e: base·e/warmup while e < warmup, then base, times decay_rate for
    every decay epoch passed (e > 150: ×0.1, e > 180: ×0.01, ...). GenDD's CIFAR stage 2 ([Q1]
    fixed; `reference`: as GenDD's reference, the LR stays at the last warm-up value
    base·(warmup−1)/warmup from the end of warm-up to the first decay epoch). With warmup 0 it is
    RepDistiller's adjust_learning_rate, base·rate^Σ(e > decay epochs) (KD's `lr_schedule: step`)."""
    decay_epochs = list(decay_epochs) or [np.iinfo(np.int32).max]
    first_decay = decay_epochs[0]
    decay_epochs = jnp.asarray(decay_epochs, jnp.int32)

    def schedule(step):
        epoch = jnp.asarray(step) // steps_per_epoch + 1
        warm = base_lr * epoch / max(warmup_epochs, 1)
        decayed = base_lr * decay_rate ** jnp.sum(epoch > decay_epochs)
        if reference:
            stuck = base_lr * (warmup_epochs - 1) / max(warmup_epochs, 1)
            decayed = jnp.where(epoch <= first_decay, stuck, decayed)
        return jnp.where(epoch < warmup_epochs, warm, decayed).astype(jnp.float32)

    return schedule
