"""The train state pytree and the one jitted train step that both stages (VAE, FlowAR) use."""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flowar_jax.models.params import split_params
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.training import nonfinite

# loss_fn(model, batch, rng, context, step) -> (scalar loss, metrics). `context` holds frozen arrays
# (e.g. the VAE's params while FlowAR trains) passed as an argument so they aren't baked into the program.
LossFn = Callable[[nnx.Module, dict, jax.Array, Any, jax.Array], tuple[jax.Array, dict]]
# post_update(model, metrics, step) -> metrics: a change of parameters that is not a gradient step (e.g. a
# codebook's usage statistics and its dead-code restarts), made in place on the model holding the updated
# parameters. It gets loss_fn's metrics, which may carry arrays meant for it, and returns the metrics to log
# (scalars); `step` is the one loss_fn got.
PostUpdate = Callable[[nnx.Module, dict, jax.Array], dict]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any  # nnx.State of nnx.Param
  opt_state: Any
  ema_params: Any
  rng: jax.Array  # typed PRNG key
  skipped: nonfinite.SkipCounts  # updates skipped for a non-finite loss, gradient or update


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> TrainState:
  _, params = split_params(model)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.key(seed),
                    skipped=nonfinite.SkipCounts.zeros())


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    ema_decay: float, schedule: optax.Schedule | None = None, *, plan: ShardingPlan | None = None,
                    state_shardings: Any = None, context_shardings: Any = None,
                    post_update: PostUpdate | None = None):
  """-> jitted `step(state, batch, context) -> (state, metrics)`, donating the old state.

  An update whose loss, gradients or new params are not finite is dropped: params, optimizer state and
  EMA stay as they were, the step still advances, and `state.skipped` counts it (see `nonfinite`).

  With a `plan`, the step is traced under its mesh and rules, with explicit shardings: the state's
  (`state_shardings`, e.g. `plan.shardings(abstract_state)`: parameters, EMA and moments by their logical
  axes, counters such as `step` and `skipped` replicated), the batch split by the 'batch' rule, the
  context's (`context_shardings`), and replicated metrics.

  A `post_update` runs after the optimizer's update and before the EMA and the finiteness check, so a
  dropped step drops its changes too.
  """

  def step(state: TrainState, batch: dict, context: Any) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)

    def compute(params):
      return loss_fn(nnx.merge(graphdef, params), batch, rng, context, state.step)

    (loss, metrics), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if post_update is not None:
      model = nnx.merge(graphdef, params, copy=True)
      metrics = post_update(model, metrics, state.step)
      params = nnx.state(model, nnx.Param)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
    grad_norm = optax.tree.norm(grads)
    finite = nonfinite.all_finite(loss, grad_norm, params)
    params, opt_state, ema = nonfinite.keep_if(finite, (params, opt_state, ema),
                                               (state.params, state.opt_state, state.ema_params))
    skipped = nonfinite.count(state.skipped, finite)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, **{nonfinite.SKIPPED: skipped.total,
                                                               nonfinite.CONSECUTIVE: skipped.consecutive})
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                              skipped=skipped)
    return new_state, metrics

  if plan is None:
    return jax.jit(step, donate_argnums=0)
  return plan.jit(step, in_shardings=(state_shardings, plan.batch_sharding(), context_shardings),
                  out_shardings=(state_shardings, plan.replicated), donate_argnums=0)
