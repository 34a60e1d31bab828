"""The optimizer every script builds from its config (optax), and the schedules they share."""
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
