"""Zero-shot editing with VAR: the image's own codes kept outside the mask at every scale, the full-mask case,
the editor's checks, and the `edit` command on a converted VAR workdir (sharded over two devices)."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowar_jax.commands import edit as edit_command
from flowar_jax.config_files import load_config
from flowar_jax.convert import write_workdir
from flowar_jax.convert.var import var_state_dict, vqvae_state_dict
from flowar_jax.models import var as var_module
from flowar_jax.models.registry import build_model, build_vae
from flowar_jax.sampling import editing
from flowar_jax.sampling.generate import settings_from
from flowar_jax.sampling.sampler import image_sampler, sample_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = load_config(os.path.join(ROOT, "configs", "var_digits.py"))  # a tiny VAR: scales 1, 2, 3, 4 on 16x16


@pytest.fixture(scope="module")
def modules():
  return build_model(CONFIG, 1), build_vae(CONFIG, 2)


@pytest.fixture(scope="module")
def settings():
  return settings_from(CONFIG, cfg=2.0)


def _images(b=2):
  return np.asarray(jax.random.randint(jax.random.key(0), (b, 16, 16, 3), 0, 256), np.uint8)


def _masks():
  right = np.zeros((16, 16), bool)
  right[:, 8:] = True
  bottom = np.zeros((16, 16), bool)
  bottom[9:] = True  # 7 of 16 rows: less than half of the coarse tokens, more than none of the last scale's
  return np.stack([right, bottom])


def test_kept_codes_are_the_images_at_every_scale(modules, settings):
  model, vq = modules
  images = editing.to_model_input(_images())
  masks = editing.token_masks(_masks(), model.schedule)
  labels, keys = jnp.array([3, 8]), sample_keys(5, 0, 2)
  f_hat = editing.edit_var(model, vq, images, masks, labels, keys, settings)
  # The same edit through the sampler, to see its codes: VAR.sample draws from the keys this way.
  head = model.head_seam(settings.more_smooth)
  draws = [head.draw(keys, k, n) for k, n in enumerate(model.schedule.lengths)]
  generate = [m.reshape(2, -1) for m in masks]
  out = var_module.sample(model, vq, labels, settings, ([u for u, _ in draws], None),
                          var_module.KnownTokens(vq.encode(images), generate))
  np.testing.assert_allclose(f_hat, out.f_hat, atol=1e-6)
  indices = vq.encode(images)
  assert not np.asarray(generate[0]).any()  # hybrid: the 1x1 code is mostly kept area, so kept
  for k, (got, want, gen) in enumerate(zip(out.tokens, indices, generate)):
    keep = ~np.asarray(gen)
    np.testing.assert_array_equal(np.asarray(got)[keep], np.asarray(want)[keep])  # exactly the image's codes
    if k == len(indices) - 1:
      assert (np.asarray(got)[~keep] != np.asarray(want)[~keep]).any()  # the masked ones were drawn
  # f_hat accumulates exactly those codes.
  np.testing.assert_allclose(f_hat, vq.quantize.indices_to_fhat(out.tokens), atol=1e-5)


@pytest.fixture(scope="module")
def editor(modules, settings):
  model, vq = modules
  return editing.Editor(model, vq, 1.0, settings)


def test_full_mask_is_plain_sampling_and_the_default_fades(modules, settings, editor):
  model, vq = modules
  images, labels = _images(), np.array([4, 8])
  full = np.ones((2, 16, 16), bool)
  np.testing.assert_array_equal(editor(images, full, labels, seed=3),
                                image_sampler(model, vq, settings, 1.0)(labels, seed=3))
  masks = _masks()
  edits = editor(images, masks, labels, seed=3)
  far = ~editing.edit_weight(masks, 2).astype(bool)
  np.testing.assert_array_equal(edits[far], images[far])  # the original beyond the 2-pixel fade
  assert not np.array_equal(edits[masks], images[masks])
  assert not np.array_equal(edits, editor(images, masks, labels, seed=4))
  # The round trip is the tokenizer's reconstruction.
  np.testing.assert_array_equal(editor.round_trip(images)[:1], editor.round_trip(images[:1]))


def test_editor_checks(modules, settings, editor):
  model, vq = modules
  images, masks = _images(), _masks()
  with pytest.raises(ValueError, match="class label 11 is out of range: the model has 10 classes"):
    editor(images, masks, np.array([1, 11]), seed=0)
  with pytest.raises(ValueError, match="the mask of image 1 is empty: there is nothing to generate"):
    editor(images, np.stack([masks[0], np.zeros((16, 16), bool)]), np.array([1, 2]), seed=0)
  for edit in (editing.EditSettings(known="after_scale"), editing.EditSettings(fit_steps=3),
               editing.EditSettings(resample=1)):
    with pytest.raises(ValueError, match="known=.after_scale., fit_steps and resample are FlowAR.s"):
      editing.Editor(model, vq, 1.0, settings, edit)


def test_the_command_refuses_flowar_settings_for_var_before_loading(tmp_path):
  # No checkpoint, no image: the refusal comes first, as the editor's own.
  with pytest.raises(ValueError, match="known=.after_scale., fit_steps and resample are FlowAR.s"):
    edit_command.run(CONFIG, str(tmp_path), image=str(tmp_path / "none.png"), box="0,0.5,1,1", settings=None,
                     edit=edit_command.edit_settings(resample=1))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A workdir converted from official-format state dicts of a randomly initialised digits VAR."""
  workdir = str(tmp_path_factory.mktemp("var_edit_run"))
  write_workdir(CONFIG, workdir, var_state_dict(build_model(CONFIG, 1)),
                vqvae_state_dict(build_vae(CONFIG, 2), CONFIG.vae.share_quant_resi))
  return workdir


def _cli(*args, devices=1):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, "-m", "flowar_jax", "edit", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600)


def test_cli_edits_a_converted_var_sharded_like_the_python_function(converted, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.zeros((16, 16, 3), np.uint8)
  image[3:13, 6:10] = 255
  path = str(tmp_path / "digit.png")
  Image.fromarray(image).save(path)
  bad = _cli("--workdir", converted, "--image", path, "--box", "0,0.5,1,1", "--label", "10")
  assert bad.returncode == 2 and "--label 10 is out of range: the model has 10 classes (0..9)" in bad.stderr
  flowar_flag = _cli("--workdir", converted, "--image", path, "--box", "0,0.5,1,1", "--num_steps", "3")
  assert flowar_flag.returncode == 2, flowar_flag.stderr
  assert "--num_steps does not apply to var (a categorical head)" in flowar_flag.stderr
  out = str(tmp_path / "edits")
  # 3 edits in batches of 3, over 2 devices: each batch is padded to 4 and split in two.
  done = _cli("--workdir", converted, "--image", path, "--box", "0,0.5,1,1", "--label", "7", "--out", out,
              "--num_samples", "3", "--batch_size", "3", "--seed", "2", devices=2)
  assert done.returncode == 0, done.stderr
  with np.load(os.path.join(out, "edits.npz")) as f:
    cli_edits = f["images"]
  assert cli_edits.shape == (3, 16, 16, 3) and os.path.exists(os.path.join(out, "grid.png"))
  # The Python function on one device gives the same edits (a unit of decoder rounding at most).
  job = edit_command.prepare(path, 16, box="0,0.5,1,1")
  editor = edit_command.load_editor(CONFIG, converted, settings_from(CONFIG))
  edits = edit_command.edit_images(editor, job.image, job.mask, 7, num_samples=3, seed=2, batch_size=2)
  assert np.abs(edits.astype(int) - cli_edits.astype(int)).max() <= 1
  np.testing.assert_array_equal(edits[:, :, :6], np.broadcast_to(image[:, :6], (3, 16, 6, 3)))  # beyond the fade
