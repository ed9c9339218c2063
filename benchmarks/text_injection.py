"""How a prompt's token states should enter the FlowAR backbone, measured on the bundled text data:
cross-attention in every block (what `flowar_jax.models.backbone` ships) against the prompt as a prefix segment
of the scale-causal sequence (image tokens also attend to the prompt's tokens, the prompt attends to itself).

  python benchmarks/text_injection.py --workdir runs/digits_text [--steps 300] [--out FILE.json]

WORKDIR is a trained `configs/digits_text.py` run: its VAE gives the latents and its text cache the prompt
encodings. Both variants start from the same initial parameters (the prefix variant simply does not call the
blocks' cross-attention), see the same batches and the same condition dropout, and train with AdamW at the
run's peak learning rate. Reported per variant: compile seconds of the training step, CPU seconds per step
(process time, robust to other processes on the machine), the mean training loss over the last 50 steps and
the loss on a fixed batch of eval compositions (no dropout). The prefix variant uses dense masked attention
with a per-example [B, T + L, T + L] mask (padding tokens masked out): the scale-causal kernels have no
per-example segments.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from timing import report  # noqa: E402
from flowar_jax import data  # noqa: E402
from flowar_jax.config_files import load_config  # noqa: E402
from flowar_jax.data import text_batches  # noqa: E402
from flowar_jax.kernels import ScaleCausalMask  # noqa: E402
from flowar_jax.models.attention import dot_product_attention  # noqa: E402
from flowar_jax.models.conditioning import drop_text  # noqa: E402
from flowar_jax.models.layers import modulate, rms_norm  # noqa: E402
from flowar_jax.models.registry import build_model, tokenizer_seam  # noqa: E402
from flowar_jax.runs.loaders import load_vae  # noqa: E402
from flowar_jax.runs.stored_config import stored_latent_scale  # noqa: E402
from flowar_jax.text.base import TextEncoding  # noqa: E402
from flowar_jax.text.registry import build_text_encoder  # noqa: E402


def _prefix_block(block, x, vector, cos, sin, mask):
  """`BackboneBlock.__call__` with the prompt in the sequence instead of cross-attention: x `[B, T + L, D]`,
  mask `[B, T + L, T + L]`."""
  g1, g2, s1, s2, b1, b2 = block._modulation(vector)  # pylint: disable=protected-access
  q, k, v = block.attn.project_qkv(modulate(rms_norm(x), b1, s1), cos, sin)
  x = x + block.attn.output(dot_product_attention(q, k, v, mask), None) * g1
  return x + block.mlp(modulate(rms_norm(x), b2, s2)) * g2


def prefix_z(model, encoding: TextEncoding, inputs: jax.Array) -> jax.Array:
  """The teacher-forced backbone with the prompt's projected states as a prefix segment -> z `[B, L, D]`."""
  bb = model.backbone
  cond = model.text_cond(encoding)
  t, length = cond.context.shape[1], bb.schedule.num_tokens
  x = bb.z_proj_ln(bb.embed_inputs(cond.vector, inputs) + bb.encoder_pos_embed_learned[...])
  x = jnp.concatenate([cond.context, x], axis=1)
  cos, sin = bb._rope()  # pylint: disable=protected-access
  cos = jnp.concatenate([jnp.ones((t, cos.shape[1]), cos.dtype), cos])  # no rotation for prompt tokens
  sin = jnp.concatenate([jnp.zeros((t, sin.shape[1]), sin.dtype), sin])
  image = ScaleCausalMask.from_schedule(bb.schedule).dense().astype(bool)  # [L, L]
  b = x.shape[0]
  keys_text = jnp.broadcast_to(cond.context_mask[:, None, :], (b, t + length, t))
  keys_image = jnp.concatenate([jnp.zeros((t, length), bool), image])  # prompt queries do not see the image
  mask = jnp.concatenate([keys_text, jnp.broadcast_to(keys_image, (b, t + length, length))], axis=2)
  for block in bb.encoder_blocks:
    x = _prefix_block(block, x, cond.vector, cos, sin, mask)
  pos = jnp.concatenate([jnp.zeros((1, t, x.shape[-1])), bb.decoder_pos_embed_learned[...]], axis=1)
  x = bb.decoder_embed(bb.encoder_norm(x)) + pos
  for block in bb.decoder_blocks:
    x = _prefix_block(block, x, cond.vector, cos, sin, mask)
  return bb.decoder_norm(x[:, t:]) + bb.diffusion_pos_embed_learned[...]


def loss(model, variant: str, latents, encoding, null, rng, drop_prob: float, train: bool):
  r_drop, r_flow = jax.random.split(rng)
  if train:
    encoding = drop_text(encoding, null, drop_prob, r_drop)
  targets, inputs = model.pyramid().teacher_forcing(latents)
  z = model.backbone(model.condition(encoding), inputs) if variant == "cross" else prefix_z(model, encoding, inputs)
  losses = [model.flownet.loss(z_k, y, jax.random.fold_in(r_flow, k))
            for k, (y, z_k) in enumerate(zip(targets, model.schedule.split(z)))]
  return model._weighted(losses)[0]  # pylint: disable=protected-access


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "digits_text.py"))
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--out", default=None)
  parser.add_argument("--latent_scale", type=float, default=0.0,
                      help="the run's measured vae.latent_scale (0: the one stored with its FlowAR checkpoint)")
  args = parser.parse_args()
  config = load_config(args.config)
  vae = load_vae(config, args.workdir)
  scale = args.latent_scale or config.vae.latent_scale or stored_latent_scale(args.workdir)
  if not scale:
    raise ValueError(f"no latent scale: {args.workdir} stores none yet (pass --latent_scale, which train prints)")
  tokenizer = tokenizer_seam(config, vae, scale)
  encoder = build_text_encoder(config.text)
  cache = text_batches.load_or_encode(config, encoder, args.workdir, "train")
  null = TextEncoding(*(jnp.asarray(cache.null()[k]) for k in ("text_states", "text_mask", "text_pooled")))
  train_iter = text_batches.make_text_train_iterator(dict_config(config, batch_size=args.batch_size), cache)
  batches = [next(train_iter) for _ in range(args.steps)]
  eval_batch = next(text_batches.text_batches(config, encoder, "eval",
                                              data.make_eval_batches(config.data, 256, "eval"), args.workdir))

  def as_inputs(batch, rng):
    latents = jax.lax.stop_gradient(tokenizer.encode(jnp.asarray(batch["image"]), rng))
    return latents, TextEncoding(*(jnp.asarray(batch[k]) for k in ("text_states", "text_mask", "text_pooled")))

  figures = {"steps": args.steps, "batch_size": args.batch_size}
  lr = config.optimizer.base_lr * args.batch_size / 256
  for variant in ("cross", "prefix"):
    graphdef, params = nnx.split(build_model(config, seed=0), nnx.Param)
    tx = optax.adamw(lr, b1=config.optimizer.b1, b2=config.optimizer.b2, weight_decay=config.optimizer.weight_decay)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, i, variant=variant):
      rng = jax.random.fold_in(jax.random.key(config.seed), i)
      latents, encoding = as_inputs(batch, rng)
      value, grads = jax.value_and_grad(
          lambda p: loss(nnx.merge(graphdef, p), variant, latents, encoding, null, rng, config.text.drop_prob,
                         True))(params)
      updates, opt = tx.update(grads, opt, params)
      return optax.apply_updates(params, updates), opt, value

    device_batch = lambda b: {k: jnp.asarray(v) for k, v in b.items() if k in (
        "image", "text_states", "text_mask", "text_pooled")}
    start = time.process_time()
    compiled = step.lower(params, opt, device_batch(batches[0]), 0).compile()
    compile_cpu = time.process_time() - start
    values = []
    start = time.process_time()
    for i, batch in enumerate(batches):
      params, opt, value = compiled(params, opt, device_batch(batch), i)
      values.append(float(value))
    step_cpu = (time.process_time() - start) / args.steps
    latents, encoding = as_inputs(device_batch(eval_batch), jax.random.key(1))
    eval_loss = float(jax.jit(functools.partial(loss, variant=variant, train=False, drop_prob=0.0))(
        nnx.merge(graphdef, params), latents=latents, encoding=encoding, null=null, rng=jax.random.key(2)))
    figures[variant] = {"compile_cpu_s": round(compile_cpu, 2), "step_cpu_s": round(step_cpu, 4),
                        "train_loss_last50": round(float(np.mean(values[-50:])), 4),
                        "eval_loss": round(eval_loss, 4)}
    print(variant, figures[variant], flush=True)
  report(figures, args.out)


def dict_config(config, **overrides):
  import ml_collections  # pylint: disable=g-import-not-at-top
  out = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    out[key] = value
  return out


if __name__ == "__main__":
  main()
