"""`serve`: a browser demo of WORKDIR's FlowAR checkpoint (`python -m flowar_jax serve --workdir W`).

The weights are loaded once; one compiled sampler per offered cfg value (same weights, fixed batch size) is
built and warmed up before the server listens, so no request compiles or allocates more. Requests queue
behind a single worker thread (`flowar_jax.serving.worker`).
"""
from __future__ import annotations

import dataclasses
import signal
import threading

import ml_collections

from flowar_jax.sampling.generate import load_trained, sampling_plan
from flowar_jax.parallel.batch import round_up_to_data_parallel
from flowar_jax.sampling.sampler import SamplingSettings, image_sampler
from flowar_jax.serving.grid_request import Limits
from flowar_jax.serving.server import DemoServer
from flowar_jax.serving.worker import SamplerWorker


def load_worker(config: ml_collections.ConfigDict, workdir: str, settings: SamplingSettings,
                cfg_choices: tuple[float, ...], batch_size: int, use_ema: bool = True,
                max_queue: int = 64) -> SamplerWorker:
  """A SamplerWorker with one compiled sampler per value of `cfg_choices` (`settings` with that cfg), all
  sharing one copy of the weights, each run on batches of `batch_size` (rounded up to the data-parallel
  devices)."""
  plan = sampling_plan(config)
  flowar, vae, latent_scale = load_trained(config, workdir, use_ema, plan)
  samplers = {cfg: image_sampler(flowar, vae, dataclasses.replace(settings, cfg=cfg), latent_scale,
                                 plan) for cfg in cfg_choices}
  return SamplerWorker(samplers, round_up_to_data_parallel(plan, batch_size), max_queue=max_queue)


def make_server(config: ml_collections.ConfigDict, workdir: str, *, settings: SamplingSettings,
                cfg_choices: tuple[float, ...] | None = None, batch_size: int = 8, max_samples: int | None = None,
                use_ema: bool = True, host: str = "127.0.0.1", port: int = 8000) -> DemoServer:
  """Loads and warms up the samplers and binds the server (call `serve_forever()` on it).

  cfg_choices: the guidance scales offered (default: 1 and settings.cfg); max_samples: images per request
  (default: 4 batches).
  """
  choices = tuple(sorted({float(c) for c in (cfg_choices or (1.0, settings.cfg))}))
  if not choices or any(c < 0 for c in choices):
    raise ValueError(f"cfg_choices must be numbers >= 0, got {cfg_choices}")
  if max_samples is not None and max_samples < 1:
    raise ValueError(f"max_samples must be >= 1, got {max_samples}")
  worker = load_worker(config, workdir, settings, choices, batch_size, use_ema)
  worker.warm_up()
  default_cfg = settings.cfg if settings.cfg in choices else choices[-1]
  limits = Limits(num_classes=config.model.num_classes, max_samples=max_samples or 4 * worker.batch_size,
                  cfg_choices=choices, default_cfg=default_cfg)
  info = {"image_size": config.data.image_size, "num_steps": settings.num_steps, "guidance": settings.guidance}
  return DemoServer((host, port), worker, limits, info)


def run(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> None:
  """`make_server`, then serve until interrupted."""
  server = make_server(config, workdir, **kwargs)
  if threading.current_thread() is threading.main_thread():
    # A process started in the background by a shell (`serve ... &` in a script) inherits SIGINT ignored, and
    # Python then never raises KeyboardInterrupt: Ctrl-C (or kill -INT) must stop the server all the same.
    signal.signal(signal.SIGINT, signal.default_int_handler)
  print(f"serving {workdir} on {server.url}/ (Ctrl-C stops)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
    server.worker.close()
