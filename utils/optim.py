"""Optimizers and schedules shared by the scripts (optax), with the reference's conventions."""
import optax


def warmup_cosine(base_lr: float, total_steps: int, warmup_steps: int = 0,
                  warmup_factor: float = 0.01):
    """Linear warm-up from warmup_factor·lr to lr over `warmup_steps` optimizer steps, then a
    cosine to 0 over the remaining steps (the KD/ProxyEnDD/EDFM schedule)."""
    cosine = optax.cosine_decay_schedule(base_lr, max(total_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return cosine
    warmup = optax.linear_schedule(warmup_factor * base_lr, base_lr, warmup_steps)
    return optax.join_schedules([warmup, cosine], [warmup_steps])


def sgd_l2(schedule, momentum: float, weight_decay: float):
    """SGD with heavy-ball momentum; L2 weight decay added to the gradient before momentum."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule, momentum=momentum))


def epoch_piecewise(base_lr: float, steps_per_epoch: int, boundaries_and_scales: dict):
    """A constant rate multiplied by each scale from its epoch on (FED's schedule)."""
    return optax.piecewise_constant_schedule(
        base_lr, {int(epoch) * steps_per_epoch: float(scale)
                  for epoch, scale in boundaries_and_scales.items()})
