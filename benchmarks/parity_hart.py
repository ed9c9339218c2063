"""Numerical parity of flowar_jax's HART hybrid tokenizer and residual head with the official PyTorch HART
modules, on random weights.

  python benchmarks/parity_hart.py --official /path/to/hart --torch-python /path/to/torch/venv/bin/python \
      [--runs reduced] [--json OUT]

`--official` is a checkout of the official HART repository (the directory holding `hart/`). The official side
runs in a separate Python that has torch and numpy (`--torch-python`). `transformers` is stubbed there (only
its `PreTrainedModel` base class and registries are touched by the modules used), and `.cuda()` is a no-op.
It builds `HARTAutoEncoder` (quantizer `var_hybrid`) and `DiffLoss`, randomises every parameter
(`parity_var._randomize`), computes in float32 on the CPU and writes state dicts, inputs and outputs to an .npz.
This script converts the state dicts with `flowar_jax.convert.hart`, computes the same with the JAX modules and
compares:

  encode          discrete indices of random images (`img_to_idxBl_and_frest`): tokens that differ (must be 0)
  residual        the continuous last-scale token (rest before the last discrete scale) from the same call
  tf_input        the transformer's teacher-forcing inputs from the official indices (`idxBl_to_var_input`)
  decode          images from the official indices, discrete only: the official inference accumulation
                  (`get_next_autoregressive_input` per scale, the last one without phi), then `fhat_to_img`
  decode_hybrid   the same with the official residual added at the last scale (discrete + residual)
  reconstruct     our own encode then hybrid decode, against the official's (images -> images)
  train_discrete  the training forward's output with `skip_continuous_prob=1` (discrete path, unclamped)
  train_hybrid    the training forward's output with `skip_continuous_prob=0` (continuous path, unclamped)
  *_vq_loss       that forward's VQ loss; *_usage: its codebook usage in percent (must be equal)
  head_net        the MLP's output `[N, 2 C]` for random x, integer steps and conditions
  head_cond       decoder_norm(hidden + discrete embedding), the head's condition (LayerNorm)
  head_loss       per-token training loss (MSE + variational bound) at given steps and noise
  head_sample     a full 8-step guided sample from the same normal draws (`torch.randn` / `randn_like` replaced)

Transformer runs (group 'transformer'): the official `HARTForT2I` (attn_type 'llama'; its tokenizer a random
`HARTAutoEncoder` in place of `from_pretrained`, its CUDA RMSNorm kernel replaced by the formula) runs its own
training forward on random context embeddings, position ids and mask in place of Qwen2's outputs (see
`TransformerRun`); `load_transformer` / `load_residual_head` convert its state dict and
`models.hart.HARTTransformer` computes:

  t_logits        the logits `[B, L, V]` (the first scale's read from the last context token)
  t_hidden        the final hidden states the head's adaLN reads `[B, T + L - 1, C]` (all tokens)
  t_head_cond     the residual head's condition decoder_norm(hidden + word_embed(codebook[idx])) at the last scale

Errors are max|ours - official| / max|official|; the check passes when every relative error is at most --tol
(1e-4) and no token differs.

Runs: 'reduced' = a 32-channel tokenizer (vocab 64, Cvae 8, scales 1, 2, 3, 4 on 64 px) and a width-64,
depth-2 head on a 32-wide condition; 'published' = the published tokenizer layout (vocab 4096, Cvae 32, ch 160,
scales 1 .. 16 on 256 px, one image) and the head at the official configs' defaults (width 1024, depth 6,
condition width 1024); 't2i_llama' / 't2i_alt' = a width-64, depth-2 transformer (2 heads) on scales
1, 2, 3, 4 (vocab 64, Cvae 8) with 6 context tokens of width 24, in the Llama branches and in the other
ones; 't2i_hd64' = 4 blocks of width 256 in 4 heads of 64 with 300 context tokens of width 1536 (the sampling
script's `max_token_length` and Qwen2-VL-1.5B's width), in the Llama branches.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN_METRICS = ("encode", "train_discrete_usage", "train_hybrid_usage")  # must be exactly equal


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  patch_nums: tuple[int, ...]
  vocab_size: int
  cvae: int
  ch: int
  cond_dim: int
  head_width: int
  head_depth: int
  num_steps: str = "8"
  batch: int = 2
  cfg: float = 1.5
  head_rows: int = 64

  def tokenizer_kwargs(self) -> dict:
    return dict(vocab_size=self.vocab_size, z_channels=self.cvae, ch=self.ch, patch_nums=self.patch_nums)

  def head_kwargs(self) -> dict:
    return dict(channels=self.cvae, cond_dim=self.cond_dim, width=self.head_width, depth=self.head_depth,
                num_steps=self.num_steps)


RUNS = {
    "reduced": (Run("reduced", (1, 2, 3, 4), 64, 8, 32, 32, 64, 2),),
    # HART's tokenizer (VAR's vae_ch160v4096z32 layout, 256 px) and its head at the configs' defaults
    # (diff_width 1024, diff_depth 6, on the default transformer width 1024).
    "published": (Run("published", (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 4096, 32, 160, 1024, 1024, 6, batch=1),),
}


@dataclasses.dataclass(frozen=True)
class TransformerRun:
  """The official `HARTForT2I` (attn_type 'llama') driven with random context embeddings in place of Qwen2's.
  The last scale must hold at most 16 tokens: the official forward then masks none of them (its MaskGIT
  masking keeps at least 32), and a vocabulary under 600 makes its top-600 sampling of the last scale fail
  over to the given codes, so both sides condition the head on the same codes."""
  name: str
  mlp: str  # the official mlp_type
  adaln: bool  # not disable_aln
  timestep_level: bool  # use_timestep_embed
  pooling: str  # sep_aln_pooling_mode
  attn_l2_norm: bool
  context_norm: bool  # use_context_norm
  patch_nums: tuple[int, ...] = (1, 2, 3, 4)
  vocab_size: int = 64
  cvae: int = 8
  ch: int = 32
  depth: int = 2
  width: int = 64
  num_heads: int = 2
  context_tokens: int = 6
  context_dim: int = 24
  batch: int = 2

  def model_kwargs(self) -> dict:
    return dict(depth=self.depth, width=self.width, num_heads=self.num_heads, conditioning="context",
                context_tokens=self.context_tokens, context_dim=self.context_dim, context_norm=self.context_norm,
                pooling=self.pooling, vocab_size=self.vocab_size, cvae=self.cvae, patch_nums=self.patch_nums,
                mlp=self.mlp, adaln=self.adaln, timestep_level=self.timestep_level, attn_l2_norm=self.attn_l2_norm)

  def head_kwargs(self) -> dict:
    return dict(channels=self.cvae, cond_dim=self.width, width=32, depth=1, norm="rms")


TRANSFORMER_RUNS = {
    "transformer": (
        # The released HART models' choices (Llama MLP, timestep level embedding, context norm, max pooling).
        TransformerRun("t2i_llama", mlp="llama", adaln=True, timestep_level=True, pooling="max",
                       attn_l2_norm=False, context_norm=True),
        # The other branches: GELU MLP, no adaLN, level table, masked-mean pooling, L2-normalised attention.
        TransformerRun("t2i_alt", mlp="gpt2", adaln=False, timestep_level=False, pooling="avg", attn_l2_norm=True,
                       context_norm=False),
        # Heads of 64 and the sampling script's context shape (300 tokens, Qwen2-VL-1.5B's width 1536).
        TransformerRun("t2i_hd64", mlp="llama", adaln=True, timestep_level=True, pooling="max", attn_l2_norm=False,
                       context_norm=True, depth=4, width=256, num_heads=4, context_tokens=300, context_dim=1536)),
}


def _select(name: str) -> tuple[Run | TransformerRun | None, ...]:
  groups = {**RUNS, **TRANSFORMER_RUNS}
  if name in groups:
    return groups[name]
  return tuple(r for group in groups.values() for r in group if r.name == name) or (None,)


def rel_err(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


# ------------------------------------------------------------------------------------------------ official side


def _import_official(path: str):
  import torch  # pylint: disable=g-import-not-at-top
  torch.Tensor.cuda = lambda self, *a, **k: self
  torch.nn.Module.cuda = lambda self, *a, **k: self

  class PreTrainedModel(torch.nn.Module):
    def __init__(self, config, *args, **kwargs):
      super().__init__()
      self.config = config

  class PretrainedConfig:
    def __init__(self, *args, **kwargs):
      pass

  registry = types.SimpleNamespace(register=lambda *a, **k: None)
  sys.modules.setdefault("transformers", types.SimpleNamespace(
      PreTrainedModel=PreTrainedModel, PretrainedConfig=PretrainedConfig, AutoConfig=registry, AutoModel=registry,
      PreTrainedTokenizer=object))  # a type annotation in hart.utils
  sys.path.insert(0, os.path.abspath(path))
  from hart.modules.diffusion.diffloss import DiffLoss  # pylint: disable=g-import-not-at-top
  from hart.modules.models.autoencoder.configuration import HARTAutoEncoderConfig  # pylint: disable=g-import-not-at-top
  from hart.modules.models.autoencoder.hart_autoencoder import HARTAutoEncoder  # pylint: disable=g-import-not-at-top
  return HARTAutoEncoderConfig, HARTAutoEncoder, DiffLoss


def _import_official_transformer(path: str):
  """The official `HARTForT2I` and its config. Its `huggingface_hub` mixin is stubbed, and the CUDA RMSNorm
  kernel (`hart_backend.fused_kernels.rms_norm`) is replaced by its formula w x / sqrt(mean x^2 + eps) in
  float32."""
  import torch  # pylint: disable=g-import-not-at-top

  def rms_norm(out, x, weight, eps, use_quant):
    assert not use_quant
    out.copy_(weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

  kernels = types.SimpleNamespace(rms_norm=rms_norm)
  sys.modules.setdefault("hart_backend", types.SimpleNamespace(fused_kernels=kernels))
  sys.modules.setdefault("hart_backend.fused_kernels", kernels)
  sys.modules.setdefault("huggingface_hub", types.SimpleNamespace(PyTorchModelHubMixin=object))
  _import_official(path)
  from hart.modules.models.transformer.configuration import HARTForT2IConfig  # pylint: disable=g-import-not-at-top
  from hart.modules.models.transformer.hart_transformer_t2i import HARTForT2I  # pylint: disable=g-import-not-at-top
  return HARTForT2IConfig, HARTForT2I


def _official_sample(torch, diffloss, z, draws, cfg):
  """`DiffLoss.sample` with its `torch.randn` / `randn_like` draws replaced, in order, by `draws`."""
  queue = [torch.from_numpy(d) for d in draws]
  randn, randn_like = torch.randn, torch.randn_like

  def next_draw(shape):
    d = queue.pop(0)
    rows = int(np.prod(shape[:-1]))
    if d.shape[0] < rows:  # the unconditional rows' noise of a step: never kept, any draw does
      d = torch.cat([d, torch.zeros(rows - d.shape[0], d.shape[1])], 0)
    return d.reshape(shape)

  torch.randn = lambda *shape, **k: next_draw(shape[0] if isinstance(shape[0], (tuple, list)) else shape)
  torch.randn_like = lambda x, **k: next_draw(tuple(x.shape))
  try:
    out = diffloss.sample(z=z, temperature=1.0, cfg=cfg)
  finally:
    torch.randn, torch.randn_like = randn, randn_like
  assert not queue, "the official sampler drew a different number of times"
  return out


def official_side(official: str, run: Run, seed: int, out_path: str) -> None:
  """Runs in the torch interpreter: builds, randomises and evaluates the official modules; writes an .npz."""
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from parity_var import _randomize  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  config_cls, autoencoder_cls, diffloss_cls = _import_official(official)
  config = config_cls(vocab_size=run.vocab_size, z_channels=run.cvae, ch=run.ch, v_patch_nums=run.patch_nums,
                      quantizer_type="var_hybrid", share_quant_resi=4)
  vae = autoencoder_cls(config)
  _randomize(vae, seed)
  vae.eval()
  q = vae.quantize
  rng = np.random.default_rng(seed)
  side, b, k = 16 * run.patch_nums[-1], run.batch, len(run.patch_nums)
  images = torch.from_numpy(rng.uniform(-1, 1, (b, 3, side, side)).astype(np.float32))
  out = {"images": images.numpy()}
  tokens = vae.img_to_idxBl_and_frest(images)
  idx, rest = tokens[:k], tokens[k]
  out["indices"] = torch.cat(idx, 1).numpy()
  out["residual"] = rest.numpy()
  out["tf_input"] = q.idxBl_to_var_input(idx).numpy()

  def inference_decode(indices, last):  # the official sampler's accumulation, then the decoder
    f_hat = torch.zeros(b, run.cvae, run.patch_nums[-1], run.patch_nums[-1])
    for si, pn in enumerate(run.patch_nums[:-1]):
      h = q.embedding(indices[si]).transpose(1, 2).reshape(b, run.cvae, pn, pn)
      f_hat, _ = q.get_next_autoregressive_input(si, k, f_hat, h, patch_nums=run.patch_nums)
    f_hat, _ = q.get_next_autoregressive_input(k - 1, k, f_hat, last.transpose(1, 2).reshape(f_hat.shape),
                                               patch_nums=run.patch_nums)
    return vae.fhat_to_img(f_hat)

  out["decode"] = inference_decode(idx, q.embedding(idx[-1])).numpy()
  out["decode_hybrid"] = inference_decode(idx, rest).numpy()
  out["reconstruct"] = out["decode_hybrid"]  # the official reconstruction is its encode then hybrid decode
  for name, skip in (("train_discrete", 1.0), ("train_hybrid", 0.0)):
    result = vae(images, skip_continuous_prob=skip)
    out[name], out[f"{name}_vq_loss"] = result["out"].numpy(), result["vq_loss"].numpy()
    out[f"{name}_usage"] = np.float64(result["usages"])
  for name, v in vae.state_dict().items():
    out[f"vae/{name}"] = v.numpy()

  # The residual head.
  diffloss = diffloss_cls(target_channels=run.cvae, z_channels=run.cond_dim, depth=run.head_depth,
                          width=run.head_width, num_sampling_steps=run.num_steps)
  decoder_norm = torch.nn.LayerNorm(run.cond_dim, eps=1e-6)
  _randomize(diffloss, seed + 1)
  _randomize(decoder_norm, seed + 2)
  n = run.head_rows
  x = rng.standard_normal((n, run.cvae)).astype(np.float32)
  t = rng.integers(0, 1000, n)
  t[:2] = (0, 999)  # the decoder-likelihood branch and the last step
  z = rng.standard_normal((n, run.cond_dim)).astype(np.float32)
  out.update(head_x=x, head_t=t, head_z=z)
  out["head_net"] = diffloss.net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(z)).numpy()
  hidden, discrete = (rng.standard_normal((b, 4, run.cond_dim)).astype(np.float32) for _ in range(2))
  out.update(head_hidden=hidden, head_discrete=discrete)
  out["head_cond"] = decoder_norm(torch.from_numpy(hidden + discrete)).numpy()
  target = (0.5 * rng.standard_normal((n, run.cvae))).astype(np.float32)
  noise = rng.standard_normal((n, run.cvae)).astype(np.float32)
  out.update(head_target=target, head_noise=noise)
  out["head_loss"] = diffloss.train_diffusion.training_losses(
      diffloss.net, torch.from_numpy(target) / diffloss.vae_scale, torch.from_numpy(t), dict(c=torch.from_numpy(z)),
      noise=torch.from_numpy(noise))["loss"].numpy()
  # A guided sample: B rows of L tokens, conditional then unconditional conditions, as the official sampler.
  rows, steps = b * 4, int(run.num_steps)
  zc = rng.standard_normal((rows, run.cond_dim)).astype(np.float32)
  zu = rng.standard_normal((rows, run.cond_dim)).astype(np.float32)
  draws = [rng.standard_normal((rows, run.cvae)).astype(np.float32) for _ in range(steps + 1)]
  out.update(sample_zc=zc, sample_zu=zu, sample_draws=np.stack(draws))
  sample = _official_sample(torch, diffloss, torch.from_numpy(np.concatenate([zc, zu])), draws, run.cfg)
  out["head_sample"] = sample[:rows].numpy()
  for name, v in diffloss.state_dict().items():
    out[f"head/diffloss.{name}"] = v.numpy()
  for name, v in decoder_norm.state_dict().items():
    out[f"head/decoder_norm.{name}"] = v.numpy()
  np.savez(out_path, **out)


def official_transformer_side(official: str, run: TransformerRun, seed: int, out_path: str) -> None:
  """Runs in the torch interpreter: the official transformer's own training forward on random context
  embeddings; writes its logits, the hidden states the head reads and the head's condition to an .npz."""
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from parity_var import _randomize  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  config_cls, model_cls = _import_official_transformer(official)
  ae_config_cls, autoencoder_cls, _ = _import_official(official)
  from hart.modules.models.autoencoder import HARTAutoEncoderWithDisc  # pylint: disable=g-import-not-at-top
  vae = autoencoder_cls(ae_config_cls(vocab_size=run.vocab_size, z_channels=run.cvae, ch=run.ch,
                                      v_patch_nums=run.patch_nums, quantizer_type="var_hybrid"))
  _randomize(vae, seed + 3)
  HARTAutoEncoderWithDisc.from_pretrained = classmethod(lambda cls, *a, **k: types.SimpleNamespace(vae=vae))
  config = config_cls(vae_path="random", context_token=run.context_tokens, context_dim=run.context_dim,
                      depth=run.depth, embed_dim=run.width, num_heads=run.num_heads, patch_nums=run.patch_nums,
                      attn_type="llama", mlp_type=run.mlp, disable_aln=not run.adaln,
                      use_timestep_embed=run.timestep_level, sep_aln_pooling_mode=run.pooling,
                      attn_l2_norm=run.attn_l2_norm, use_context_norm=run.context_norm, cond_drop_rate=-1e9,
                      diff_width=32, diff_depth=1, fused_if_available=False, flash_if_available=False)
  model = model_cls(config)
  model.gradient_checkpointing = False
  _randomize(model, seed)
  with torch.no_grad():  # the level MLP at 1 / sqrt(fan_in) like the other matrices, not the tables' 0.5
    for name, p in model.named_parameters():
      if name.startswith("lvl_embed.mlp.") and p.ndim == 2:
        p.mul_(2.0 / np.sqrt(p.shape[1]))
  model.eval()
  rng = np.random.default_rng(seed)
  b, t, last = run.batch, run.context_tokens, run.patch_nums[-1] ** 2
  context = rng.standard_normal((b, t, run.context_dim)).astype(np.float32)
  context_mask = np.ones((b, t), np.int64)
  context_mask[1:, t - 2:] = 0  # padding at the end of the second row
  positions = np.cumsum(context_mask, 1) - 1  # as the official `encode_prompts` derives them
  inputs = rng.standard_normal((b, sum(p * p for p in run.patch_nums) - 1, run.cvae)).astype(np.float32)
  last_codes = rng.integers(0, run.vocab_size, (b, last))
  last_gt = rng.standard_normal((b, last, run.cvae)).astype(np.float32)
  seen = {}
  model.head_nm.register_forward_pre_hook(lambda m, args: seen.__setitem__("hidden", args[0].clone()))
  model.decoder_norm.register_forward_hook(lambda m, args, out: seen.__setitem__("head_cond", out.clone()))
  model.vae_quant_proxy[0].embedding.register_forward_hook(
      lambda m, args, out: seen.__setitem__("codes", args[0].clone()))
  logits, _, kept = model(torch.from_numpy(context), torch.from_numpy(inputs), torch.from_numpy(positions),
                          torch.from_numpy(context_mask), torch.from_numpy(last_gt), torch.from_numpy(last_codes))
  assert kept[0].numel() == b * last, "the official forward masked last-scale tokens"
  assert torch.equal(seen["codes"], torch.from_numpy(last_codes)), "the head was conditioned on sampled codes"
  out = dict(context=context, positions=positions, context_mask=context_mask, inputs=inputs, last_codes=last_codes,
             logits=logits.numpy(), hidden=seen["hidden"].numpy(), head_cond=seen["head_cond"].numpy(),
             codebook=vae.quantize.embedding.weight.numpy())
  for name, v in model.state_dict().items():
    out[f"model/{name}"] = v.numpy()
  np.savez(out_path, **out)


# ------------------------------------------------------------------------------------------------ our side


def our_transformer_side(run: TransformerRun, data) -> dict[str, float]:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flowar_jax.convert.hart import load_residual_head, load_transformer  # pylint: disable=g-import-not-at-top

  state = {k[len("model/"):]: data[k] for k in data.files if k.startswith("model/")}
  model = load_transformer(state, run.model_kwargs())
  head = load_residual_head(state, run.head_kwargs())
  hidden, cond = model.hidden(jnp.asarray(data["context"]), jnp.asarray(data["inputs"]),
                              context_positions=jnp.asarray(data["positions"].astype(np.int32)),
                              context_mask=jnp.asarray(data["context_mask"].astype(np.int32)))
  codes = jnp.asarray(data["codebook"])[jnp.asarray(data["last_codes"].astype(np.int32))]
  return {"t_logits": rel_err(model.logits(hidden, cond), data["logits"]),
          "t_hidden": rel_err(hidden, data["hidden"]),
          "t_head_cond": rel_err(head.condition(*model.head_inputs(hidden, codes)), data["head_cond"])}



def our_side(run: Run, data) -> dict[str, float]:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flowar_jax.convert.hart import load_hybrid, load_residual_head  # pylint: disable=g-import-not-at-top
  from flowar_jax.heads.residual import ResidualSampling  # pylint: disable=g-import-not-at-top
  from flowar_jax.tokenizers.hybrid import HybridTokens  # pylint: disable=g-import-not-at-top

  tok = load_hybrid({k[len("vae/"):]: data[k] for k in data.files if k.startswith("vae/")}, run.tokenizer_kwargs())
  head = load_residual_head({k[len("head/"):]: data[k] for k in data.files if k.startswith("head/")},
                            run.head_kwargs())
  nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)
  lengths = np.cumsum([0] + [p * p for p in run.patch_nums])
  split = lambda flat: [jnp.asarray(flat[:, a:b]) for a, b in zip(lengths[:-1], lengths[1:])]
  images = jnp.asarray(nhwc(data["images"]))
  out = {}
  tokens = tok.encode(images)
  out["encode"] = int(np.sum(np.concatenate([np.asarray(i) for i in tokens.indices], 1) != data["indices"]))
  out["residual"] = rel_err(tokens.rest_before_last, data["residual"])
  theirs = HybridTokens(split(data["indices"].astype(np.int32)), jnp.asarray(data["residual"]))
  out["tf_input"] = rel_err(tok.teacher_forcing(theirs)[1], data["tf_input"])
  out["decode"] = rel_err(tok.decode_tokens(theirs, continuous=False), nhwc(data["decode"]))
  out["decode_hybrid"] = rel_err(tok.decode_tokens(theirs, continuous=True), nhwc(data["decode_hybrid"]))
  out["reconstruct"] = rel_err(tok.reconstruct_hybrid(images), nhwc(data["reconstruct"]))
  f = tok.features(images)
  for name, continuous in (("train_discrete", False), ("train_hybrid", True)):
    f_hat, vq_loss, usage = tok.training_forward(f, continuous)
    out[name] = rel_err(tok.decoder(tok.post_quant_conv(f_hat)), nhwc(data[name]))
    out[f"{name}_vq_loss"] = rel_err(vq_loss, data[f"{name}_vq_loss"])
    out[f"{name}_usage"] = abs(float(usage) - float(data[f"{name}_usage"]))
  t = jnp.asarray(data["head_t"].astype(np.int32))
  x, z = jnp.asarray(data["head_x"]), jnp.asarray(data["head_z"])
  out["head_net"] = rel_err(head.network(x, t, z), data["head_net"])
  out["head_cond"] = rel_err(head.condition(jnp.asarray(data["head_hidden"]), jnp.asarray(data["head_discrete"])),
                             data["head_cond"])
  out["head_loss"] = rel_err(head.loss_terms(z, jnp.asarray(data["head_target"]), t, jnp.asarray(data["head_noise"])),
                             data["head_loss"])
  b, length = run.batch, 4
  zc = jnp.asarray(data["sample_zc"]).reshape(b, length, -1)
  zu = jnp.asarray(data["sample_zu"]).reshape(b, length, -1)
  draws = jnp.asarray(data["sample_draws"]).reshape(-1, b, length, run.cvae).transpose(1, 0, 2, 3)
  k = len(run.patch_nums)
  sample = head.sample(zc, zu, draws, ResidualSampling(cfg=run.cfg), k - 1, k)
  out["head_sample"] = rel_err(sample.reshape(b * length, -1), data["head_sample"])
  return out


def failures(results: dict[str, dict[str, float]], tol: float) -> list[str]:
  return [f"{name} {k}" for name, r in results.items() for k, v in r.items()
          if v > (0 if k in TOKEN_METRICS else tol)]


def table(results: dict[str, dict[str, float]], tol: float) -> str:
  names = list(results)
  metrics = list(dict.fromkeys(k for r in results.values() for k in r))
  lines = ["| metric | " + " | ".join(names) + " | tolerance | result |", "|---|" + "---|" * (len(names) + 2)]
  for metric in metrics:
    token = metric in TOKEN_METRICS
    fmt = (lambda v: f"{v:g} differ") if token else (lambda v: f"{v:.1e}")
    cells = [fmt(results[n][metric]) if metric in results[n] else "-" for n in names]
    ok = all(results[n].get(metric, 0) <= (0 if token else tol) for n in names)
    lines.append(f"| {metric} | " + " | ".join(cells) + f" | {'0 differ' if token else f'{tol:.0e}'} | "
                 f"{'PASS' if ok else 'FAIL'} |")
  failed = failures(results, tol)
  lines.append(f"\n{'PASS' if not failed else 'FAIL: ' + ', '.join(failed)} (tolerance {tol:.0e}; tokens must "
               "match exactly)")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--official", required=True, help="checkout of the official HART code (holds hart/)")
  parser.add_argument("--torch-python", default=sys.executable, help="a Python interpreter that has torch")
  parser.add_argument("--runs", default="reduced,transformer",
                      help=f"comma-separated groups {sorted(RUNS) + sorted(TRANSFORMER_RUNS)} or runs")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tol", type=float, default=1e-4)
  parser.add_argument("--json", help="also write the results here")
  parser.add_argument("--official-side", help=argparse.SUPPRESS)  # internal: run name, in the torch interpreter
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.official_side:
    run = _select(args.official_side)[0]
    side = official_transformer_side if isinstance(run, TransformerRun) else official_side
    side(args.official, run, args.seed, args.out)
    return
  selected = [run for name in args.runs.split(",") for run in _select(name)]
  if not all(selected):
    parser.error(f"unknown runs in {args.runs!r}; choose from {sorted(RUNS) + sorted(TRANSFORMER_RUNS)}")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_default_matmul_precision", "highest")
  sys.path.insert(0, _REPO)
  results = {}
  for run in selected:
    began = time.time()
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "official.npz")
      subprocess.run([args.torch_python, os.path.abspath(__file__), "--official", args.official,
                      "--official-side", run.name, "--seed", str(args.seed), "--out", path], check=True)
      with np.load(path) as data:
        results[run.name] = (our_transformer_side if isinstance(run, TransformerRun) else our_side)(run, data)
    print(f"{run.name} ({time.time() - began:.0f} s): "
          + "  ".join(f"{k} {v:g}" if k in TOKEN_METRICS else f"{k} {v:.1e}" for k, v in results[run.name].items()),
          flush=True)
  print()
  print(table(results, args.tol))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  if failures(results, args.tol):
    sys.exit(1)


if __name__ == "__main__":
  main()
