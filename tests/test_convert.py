"""Converting official PyTorch state dicts (names, layouts, errors) and writing a workdir that `sample` reads.

The official names and shapes come from tests/data/official_keys_tiny.txt (written from the official
modules at tiny sizes); the weights are our own modules' parameters, renamed by the inverse mapping.
"""
import dataclasses
import functools
import importlib.util
import os
import zipfile

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from flowar_jax.commands import convert
from flowar_jax.convert import load_state_dict, names, select_weights
from flowar_jax.convert.params import state_dict_from_params
from flowar_jax.convert.sizes import PUBLISHED, FlowARSize, check_published_heads, describe_flowar, flowar_size
from flowar_jax.convert.state_dict import file_format
from flowar_jax.convert.workdir import converted_config, flowar_params, vae_params
from flowar_jax.models.params import flat_params
from flowar_jax.models.params import split_params
from flowar_jax.models.registry import build_model
from flowar_jax.models.time_grid import time_grid
from flowar_jax.models.vae_trainable import VAETrainable
from flowar_jax.runs.checkpointing import Checkpointer
from flowar_jax.runs.loaders import load_params
from flowar_jax.runs.stored_config import stored_config
from flowar_jax.runs.workdir import checkpoint_dir
from flowar_jax.sampling.generate import sample_to_workdir, settings_from

_KEYS = os.path.join(os.path.dirname(__file__), "data", "official_keys_tiny.txt")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def official_keys(section: str, variant: str | None = None) -> dict[str, tuple[int, ...]]:
  out, current = {}, None
  with open(_KEYS) as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      if line.startswith("["):
        current = line[1:-1]
        continue
      name, shape, *which = line.split()
      if current == section and (not which or which[0] in ("both", variant)):
        out[name] = tuple(int(s) for s in shape.split("x"))
  return out


def flowar_config(variant: str):
  """Sized like the official tiny model in the keys file."""
  c = tiny_config(variant)
  c.model.num_classes = 1000  # the official class embedding always has 1001 rows
  c.model.head.width = c.model.head.head_dim = 64
  return c


def vae_config():
  c = tiny_config()
  c.vae.encoder_blocks, c.vae.decoder_blocks = 1, 2  # official num_res_blocks=1: the decoder has one more
  return c


def random_params(factory, seed=0):
  """Our parameter tree with every leaf random (so no transpose or swap can hide behind a symmetric init)."""
  _, abstract = split_params(nnx.eval_shape(factory))
  rng = np.random.default_rng(seed)
  leaves = [rng.standard_normal(leaf.shape).astype(np.float32) for leaf in jax.tree.leaves(abstract)]
  return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def official_flowar_state_dict(config, seed=0):
  params = random_params(functools.partial(build_model, config), seed)
  sd = state_dict_from_params(params, to_torch=names.flowar_to_torch)
  sd["mask"] = np.zeros((1, 1, 21, 21), np.float32)  # buffers the converter must skip
  sd["encoder_blocks.0.attn.rope.freqs"] = np.zeros((4,), np.float32)
  return params, sd


def official_vae_state_dict(config, seed=0):
  params = random_params(functools.partial(VAETrainable, config), seed)["vae"]
  sd = state_dict_from_params(params, to_torch=names.vae_to_torch)
  sd["loss.logvar"] = np.zeros((), np.float32)  # training-loss entries the converter must skip
  return params, sd


def assert_same_tree(a, b):
  fa, fb = flat_params(a), flat_params(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_flowar_names_and_shapes_match_the_official_state_dict(variant):
  config = flowar_config(variant)
  params, sd = official_flowar_state_dict(config)
  # The RoPE frequencies and the mask are buffers the config determines: skipped, so not written back.
  expected = {k: v for k, v in official_keys("flowar", variant).items() if not names.flowar_skipped(k)}
  got = {k: tuple(v.shape) for k, v in sd.items() if not names.flowar_skipped(k)}
  assert len(expected) < len(official_keys("flowar", variant))
  assert got.keys() == expected.keys(), (sorted(got.keys() - expected.keys()), sorted(expected.keys() - got.keys()))
  assert got == expected
  flat = flat_params(params)
  # Linear weights are [out, in]; the class embedding and norms keep their layout.
  np.testing.assert_array_equal(sd["z_proj.weight"], flat["backbone.z_proj.kernel"].T)
  np.testing.assert_array_equal(sd["encoder_blocks.0.ada_lin.1.weight"],
                                flat["backbone.encoder_blocks.0.ada_lin.kernel"].T)
  np.testing.assert_array_equal(sd["flownet.time_embed.mlp.2.weight"], flat["flownet.time_embed.mlp.1.kernel"].T)
  np.testing.assert_array_equal(sd["flownet.final_layer.adaLN_modulation.1.bias"],
                                flat["flownet.final_layer.adaLN_modulation.bias"])
  np.testing.assert_array_equal(sd["class_emb.weight"], flat["backbone.class_emb.embedding"])
  np.testing.assert_array_equal(sd["encoder_pos_embed_learned"], flat["backbone.encoder_pos_embed_learned"])
  head_ada = "ada_lin_attn" if variant == "v2" else "ada_lin"
  np.testing.assert_array_equal(sd[f"flownet.res_blocks.0.{head_ada}.weight"],
                                flat[f"flownet.res_blocks.0.{head_ada}.kernel"].T)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_flowar_round_trip(variant):
  config = flowar_config(variant)
  params, sd = official_flowar_state_dict(config, seed=1)
  assert_same_tree(flowar_params(config, sd), params)


def test_vae_names_and_shapes_match_the_official_state_dict():
  config = vae_config()
  params, sd = official_vae_state_dict(config)
  sd.pop("loss.logvar")
  assert {k: tuple(v.shape) for k, v in sd.items()} == official_keys("vae")
  flat = flat_params(params)
  # Conv [O, I, kh, kw] <-> [kh, kw, I, O]; GroupNorm weight <-> scale.
  np.testing.assert_array_equal(sd["encoder.conv_in.weight"], flat["encoder.conv_in.kernel"].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(sd["decoder.mid.attn_1.q.weight"][:, :, 0, 0],
                                flat["decoder.mid.attn_1.q.kernel"][0, 0].T)
  np.testing.assert_array_equal(sd["encoder.norm_out.weight"], flat["encoder.norm_out.scale"])


def test_vae_round_trip():
  config = vae_config()
  params, sd = official_vae_state_dict(config, seed=2)
  assert_same_tree(vae_params(config, sd)["vae"], params)


def test_a_checkpoint_of_another_size_names_the_first_mismatch():
  _, sd = official_flowar_state_dict(flowar_config("v1"))
  bigger = flowar_config("v1")
  bigger.model.width = 64
  with pytest.raises(ValueError, match=r"parameter '[\w.]+' has shape \(.*\) in the checkpoint but the config builds"):
    flowar_params(bigger, sd)
  sd["encoder_blocks.0.attn.qkv.weight"] = np.zeros((5, 32), np.float32)
  with pytest.raises(ValueError) as e:
    flowar_params(flowar_config("v1"), sd)
  assert "'encoder_blocks.0.attn.qkv.weight' has shape (5, 32)" in str(e.value)
  assert "builds (96, 32)" in str(e.value)


def test_missing_and_unexpected_keys_are_listed():
  config = flowar_config("v1")
  _, sd = official_flowar_state_dict(config)
  del sd["decoder_norm.weight"], sd["flownet.final_layer.linear.bias"]
  sd["extra.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(ValueError) as e:
    flowar_params(config, sd, "the FlowAR checkpoint")
  msg = str(e.value)
  assert "the FlowAR checkpoint" in msg
  assert "missing from the checkpoint: " in msg and "decoder_norm.weight" in msg
  assert "flownet.final_layer.linear.bias" in msg
  assert "not in the model: extra.weight" in msg
  # A v1 checkpoint for a v2 config: the head's own names differ.
  with pytest.raises(ValueError, match="crossattn"):
    flowar_params(flowar_config("v2"), official_flowar_state_dict(config)[1])


def preset_config(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(_REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def size_keys(size) -> dict[str, np.ndarray]:
  """The parameters a size is read from, as zero-strided views (no memory): enough for `flowar_size`."""
  zero = np.zeros((), np.float32)
  sd = {"class_emb.weight": np.broadcast_to(zero, (1001, size.width)),
        "flownet.input_proj.weight": np.broadcast_to(zero, (size.head_width, 16))}
  for i in range(size.depth):
    sd[f"encoder_blocks.{i}.ada_lin.1.weight"] = np.broadcast_to(zero, (6 * size.width, size.width))
  attn = "crossattn.q" if size.head_variant == "v2" else "attn.qkv"
  for i in range(size.head_depth):
    sd[f"flownet.res_blocks.{i}.{attn}.weight"] = np.broadcast_to(zero, (size.head_width, size.head_width))
  return sd


def test_a_released_size_is_recognised_and_its_preset_named():
  for name, (size, _, _, _) in PUBLISHED.items():
    assert flowar_size(size_keys(size)) == size, name
  assert str(PUBLISHED["FlowAR-S"][0]) == "width 768, 6 + 6 blocks, head v1 with 2 blocks of width 1024"
  with pytest.raises(ValueError) as e:
    flowar_params(flowar_config("v2"), size_keys(PUBLISHED["FlowAR-L"][0]))
  msg = str(e.value)
  assert "'class_emb.weight' has shape (1001, 1024) in the checkpoint but the config builds (1001, 32)" in msg
  assert "The checkpoint is FlowAR-L (width 1024, 8 + 8 blocks" in msg and "--config configs/flowar_l.py" in msg
  # Head counts change no shape: a released checkpoint read with other counts is refused, naming the keys.
  check_published_heads(size_keys(PUBLISHED["FlowAR-S"][0]), 12, 64)
  with pytest.raises(ValueError, match=r"FlowAR-S, which has 12 attention heads .* config.model.num_heads is 8"):
    check_published_heads(size_keys(PUBLISHED["FlowAR-S"][0]), 8, 64)
  tiny_sd = official_flowar_state_dict(flowar_config("v2"))[1]
  check_published_heads(tiny_sd, 8, 64)  # not a released size: any head count
  assert flowar_size(tiny_sd) == FlowARSize(32, 1, "v2", 1, 64)
  assert "none of the released sizes" in describe_flowar(tiny_sd)
  assert "is it a FlowAR checkpoint" in describe_flowar({"encoder.conv_in.weight": np.zeros((1, 1, 1, 1))})


def test_presets_carry_the_published_sampling_settings():
  # (cfg, guidance, steps) as published, and (ODE steps, guided steps) per scale as the official sampler runs
  # them: FlowAR-H's guidance 0.7 is a point of its 50-step grid, and that step is guided.
  for name, expected, official_steps in (("flowar_s", (4.3, 0.9, 25), (24, 22)), ("flowar_l", (2.4, 0.9, 25), (24, 22)),
                                         ("flowar_h", (2.4, 0.7, 50), (50, 35))):
    stored = converted_config(preset_config(name))
    assert (stored.sampling.cfg, stored.sampling.guidance, stored.sampling.num_steps) == expected, name
    grid = time_grid(stored.sampling.num_steps)
    assert (len(grid) - 1, int(np.sum(grid[:-1] <= stored.sampling.guidance))) == official_steps, name
    assert stored.vae.latent_scale == pytest.approx(0.2325)
    size, preset, heads, head_dim = PUBLISHED[f"FlowAR-{name[-1].upper()}"]
    assert preset == f"configs/{name}.py"
    m = stored.model
    assert (m.width, m.depth, m.head.variant, m.head.depth, m.head.width) == dataclasses.astuple(size)
    assert (m.num_heads, m.head.head_dim) == (heads, head_dim)


def _torch_installed() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def test_files_that_are_not_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint file"):
    load_state_dict(str(tmp_path / "absent.pth"))
  # Whatever the name says, the content decides: none of these is a checkpoint, with or without torch.
  rng = np.random.default_rng(0)
  for name, content in (("random.pth", rng.bytes(256)), ("notes.ckpt", b"not a checkpoint"),
                        ("notes.npz", b"not a checkpoint"), ("empty.pth", b"")):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"is not a checkpoint: neither a PyTorch file"):
      load_state_dict(str(path))
  array = tmp_path / "array.npy"
  np.save(array, np.zeros(3))
  with pytest.raises(ValueError, match="is not a checkpoint"):
    load_state_dict(str(array))
  with pytest.raises(ValueError, match="not a checkpoint: it holds a list"):
    select_weights([1, 2], use_ema=None)
  with pytest.raises(ValueError, match="not a model checkpoint"):
    select_weights({"epoch": 3, "args": None}, use_ema=None)


def test_file_formats_are_read_from_the_content(tmp_path):
  sd = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  npz = tmp_path / "weights.pth"  # an .npz under a torch-like name
  np.savez(npz.with_suffix(".npz"), **sd)
  os.rename(npz.with_suffix(".npz"), npz)
  assert file_format(str(npz)) == "npz"
  loaded, which = load_state_dict(str(npz))
  assert which == "state dict"
  np.testing.assert_array_equal(loaded["w"], sd["w"])
  # torch.save's zip layout and the legacy pickle stream are recognised without torch.
  with zipfile.ZipFile(tmp_path / "zip.ckpt", "w") as z:
    z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    z.writestr("archive/version", b"3")
  (tmp_path / "legacy.pth").write_bytes(b"\x80\x02\x8a\x0alz\xfc\x9cF\xf9 j\xa8P\x19.")
  header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
  (tmp_path / "w.bin").write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 4)
  assert file_format(str(tmp_path / "zip.ckpt")) == "torch"
  assert file_format(str(tmp_path / "legacy.pth")) == "torch"
  assert file_format(str(tmp_path / "w.bin")) == "safetensors"
  if not _torch_installed():
    for name in ("zip.ckpt", "legacy.pth"):
      with pytest.raises(ImportError, match=r"is a PyTorch checkpoint; .*pip install flowar_jax\[torch\]"):
        load_state_dict(str(tmp_path / name))


def test_weight_selection():
  model, ema = {"w": np.zeros(2)}, {"w": np.ones(2)}
  assert select_weights({"model": model, "model_ema": ema, "epoch": 1}, use_ema=None) == (ema, "model_ema")
  assert select_weights({"model": model, "model_ema": ema}, use_ema=False) == (model, "model")
  assert select_weights({"model": model, "model_ema": None}, use_ema=None) == (model, "model")
  with pytest.raises(ValueError, match="no 'model_ema'"):
    select_weights({"model": model, "model_ema": None}, use_ema=True)
  assert select_weights(model, use_ema=None) == (model, "state dict")
  with pytest.raises(ValueError, match="without separate EMA weights"):
    select_weights(model, use_ema=True)


def test_convert_npz_then_sample(tmp_path):
  config = flowar_config("v1")
  config.vae.encoder_blocks, config.vae.decoder_blocks = 1, 2
  config.sampling.cfg, config.sampling.guidance, config.sampling.num_steps = 3.5, 0.8, 2
  raw, raw_sd = official_flowar_state_dict(config, seed=3)
  ema, ema_sd = official_flowar_state_dict(config, seed=4)
  vae, vae_sd = official_vae_state_dict(config, seed=5)
  flowar_file, vae_file = str(tmp_path / "flowar.npz"), str(tmp_path / "kl16.npz")
  np.savez(flowar_file, **{f"model/{k}": v for k, v in raw_sd.items()},
           **{f"model_ema/{k}": v for k, v in ema_sd.items()})
  np.savez(vae_file, **{f"model/{k}": v for k, v in vae_sd.items()})
  workdir = str(tmp_path / "out")

  convert.run(config, workdir, flowar_path=flowar_file, vae_path=vae_file)
  stored = stored_config(workdir)
  assert stored.vae.latent_scale == pytest.approx(0.2325)
  assert (stored.sampling.cfg, stored.sampling.guidance, stored.sampling.num_steps) == (3.5, 0.8, 2)
  for use_ema in (True, False):  # the file's EMA weights, under both names
    loaded = load_params(functools.partial(build_model, stored), checkpoint_dir(workdir), use_ema=use_ema)
    assert_same_tree(split_params(loaded)[1], ema)
  with Checkpointer(checkpoint_dir(os.path.join(workdir, "vae"))) as c:
    assert c.all_steps() == [0]

  images, labels = sample_to_workdir(stored, workdir, num_samples=3, seed=0,
                                     settings=settings_from(stored), labels=[1, 2], batch_size=3)
  assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [1, 2, 1])
  assert os.path.exists(os.path.join(workdir, "samples", "samples.npz"))

  with pytest.raises(ValueError, match="already holds checkpoints"):
    convert.run(config, workdir, flowar_path=flowar_file, vae_path=vae_file)
  raw_dir = str(tmp_path / "raw")
  convert.run(config, raw_dir, flowar_path=flowar_file, use_ema=False)
  loaded = load_params(functools.partial(build_model, config), checkpoint_dir(raw_dir), use_ema=True)
  assert_same_tree(split_params(loaded)[1], raw)


def test_convert_hart_tokenizer_into_a_workdir(tmp_path):
  """`convert --vae_torch` with a HART config: the released wrapper layout (`vae.*` read; `disc.*` and the
  codebook bookkeeping not) becomes WORKDIR/vae, loaded back as the same hybrid tokenizer; the official
  transformer is refused with the reason."""
  from flowar_jax.config_files import load_config  # pylint: disable=g-import-not-at-top
  from flowar_jax.convert.hart import hybrid_state_dict  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.registry import build_vae  # pylint: disable=g-import-not-at-top
  from flowar_jax.runs.loaders import load_vae  # pylint: disable=g-import-not-at-top
  from flowar_jax.tokenizers.hybrid import HybridTokenizer  # pylint: disable=g-import-not-at-top
  config = load_config(os.path.join(_REPO, "configs", "hart_digits.py"))
  config.vae.vocab_size = 16  # small; the layout is what is checked
  tokenizer = build_vae(config, 7)
  rng = np.random.default_rng(0)
  sd = {f"vae.{k}": v + 0.1 * rng.standard_normal(v.shape).astype(v.dtype)
        for k, v in hybrid_state_dict(tokenizer, config.vae.share_quant_resi).items()}
  sd["vae.quantize.ema_vocab_hit_SV"] = np.ones((4, 16), np.float32)
  sd["disc.conv.weight"] = np.ones((3, 3), np.float32)
  path = str(tmp_path / "tokenizer.pth")  # an .npz under the released file's name: read by content
  with open(path, "wb") as f:
    np.savez(f, **sd)
  workdir = str(tmp_path / "hart")
  convert.run(config, workdir, flowar_path=None, vae_path=path)
  assert not os.path.exists(checkpoint_dir(workdir))  # the tokenizer only
  loaded = load_vae(config, workdir)
  assert isinstance(loaded, HybridTokenizer)
  back = hybrid_state_dict(loaded, config.vae.share_quant_resi)
  assert set(back) == {k[len("vae."):] for k in sd if k.startswith("vae.") and "ema_vocab" not in k}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[f"vae.{k}"], err_msg=k)

  with pytest.raises(ValueError, match="text-conditional.*class-conditional"):
    convert.run(config, str(tmp_path / "t"), flowar_path=path, vae_path=path)
  with pytest.raises(ValueError, match="--from_torch.*--vae_torch"):
    convert.run(config, str(tmp_path / "none"), flowar_path=None)
  del sd["vae.quantize.embedding.weight"]
  with open(path, "wb") as f:
    np.savez(f, **sd)
  with pytest.raises(ValueError, match="embedding"):
    convert.run(config, str(tmp_path / "missing"), flowar_path=None, vae_path=path)
