"""Zero-shot editing: kept tokens, mask reduction, the full-mask case, and the errors bad input gets."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from flowar_jax.models.flowar import FlowAR
from flowar_jax.sampling import editing
from flowar_jax.heads.flow_sampling import integrate
from flowar_jax.sampling.sampler import SamplingSettings, sample_keys, sample_latents
from flowar_jax.models.time_grid import time_grid
from flowar_jax.scales import ScaleSchedule, scale_targets


def _randomize(model):
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


@pytest.fixture(scope="module")
def model():
  # Random weights everywhere: the zero-initialised head would predict the same velocity for every input.
  return _randomize(FlowAR(tiny_config().model, 4, rngs=nnx.Rngs(0)))


def _half_masks(b=2, size=16):
  right = np.zeros((size, size), bool)
  right[:, size // 2:] = True
  box = np.zeros((size, size), bool)
  box[5:7, 9:10] = True  # 2 pixels wide, inside one latent token (stride 4)
  return np.stack([right, box])[:b]


def test_reduce_mask_any_and_most():
  mask = np.zeros((1, 16, 16), bool)
  mask[0, 0:3, 0:3] = True  # 9 of the 16 pixels of latent token (0, 0): more than half
  mask[0, 4, 4] = True  # 1 of the 16 pixels of token (1, 1)
  any_ = np.asarray(editing.reduce_mask(mask, 4, "any"))[0]
  most = np.asarray(editing.reduce_mask(mask, 4, "most"))[0]
  expected_any = np.zeros((4, 4), bool)
  expected_any[0, 0] = expected_any[1, 1] = True
  np.testing.assert_array_equal(any_, expected_any)
  expected_most = np.zeros((4, 4), bool)
  expected_most[0, 0] = True
  np.testing.assert_array_equal(most, expected_most)
  # Coarser scales: 'any' marks the 1x1 token; 'most' does not (10 of 256 pixels).
  assert bool(editing.reduce_mask(mask, 1, "any")[0, 0, 0]) and not bool(editing.reduce_mask(mask, 1, "most")[0, 0, 0])
  half = np.zeros((1, 16, 16), bool)
  half[0, :, 8:] = True
  np.testing.assert_array_equal(np.asarray(editing.reduce_mask(half, 2, "any"))[0], [[False, True], [False, True]])
  assert not bool(editing.reduce_mask(half, 1, "most")[0, 0, 0])  # exactly half is not most
  with pytest.raises(ValueError, match="mask rule"):
    editing.reduce_mask(half, 2, "all")


def test_hybrid_rule_is_most_on_coarse_scales_and_any_on_the_finest():
  schedule = ScaleSchedule((1, 2, 4))
  mask = np.zeros((1, 16, 16), bool)
  mask[0, :, 9:] = True  # 7 of 16 columns: less than half of the 1x1 token
  mask[0, 0, 0] = True  # one pixel of the top-left token of every scale
  hybrid = [np.asarray(m)[0] for m in editing.token_masks(mask, schedule)]
  any_ = [np.asarray(m)[0] for m in editing.token_masks(mask, schedule, "any")]
  assert not hybrid[0].any() and any_[0].all()
  np.testing.assert_array_equal(hybrid[1], [[False, True], [False, True]])
  np.testing.assert_array_equal(any_[1], [[True, True], [False, True]])
  expected = np.zeros((4, 4), bool)
  expected[:, 2:] = True
  expected[0, 0] = True  # the finest scale regenerates every masked pixel
  np.testing.assert_array_equal(hybrid[2], expected)
  np.testing.assert_array_equal(any_[2], expected)
  with pytest.raises(ValueError, match="mask_rule must be one of"):
    editing.token_masks(mask, schedule, "all")


@pytest.mark.parametrize("known,rule", [("path", "hybrid"), ("after_scale", "any")])
def test_kept_tokens_are_the_images_pyramid_at_every_scale(model, known, rule):
  schedule = model.schedule
  latents = jax.random.normal(jax.random.key(3), (2, 4, 4, 4))
  masks = editing.token_masks(_half_masks(), schedule, rule)
  labels, keys = jnp.array([1, 5]), sample_keys(0, 0, 2)
  settings = SamplingSettings(cfg=2.0, guidance=0.9, num_steps=4)
  seen = []
  original = editing.next_scale_input

  def spy(x, schedule_, k):  # the finished scale k, as it feeds scale k + 1
    seen.append(x)
    return original(x, schedule_, k)

  editing.next_scale_input = spy
  try:
    out = editing.edit_latents(model, latents, masks, labels, keys, settings, known)
  finally:
    editing.next_scale_input = original
  finished = seen + [out]
  targets = scale_targets(latents, schedule)
  assert len(finished) == schedule.num_scales
  for k, (x, y, m) in enumerate(zip(finished, targets, masks)):
    keep = ~np.asarray(m)
    assert k == 0 or (keep.any() and (~keep).any()), k  # scale 0: one token, kept by 'hybrid', not by 'any'
    np.testing.assert_array_equal(np.asarray(x)[keep], np.asarray(y)[keep])  # exactly
    if (~keep).any():
      assert not np.allclose(np.asarray(x)[~keep], np.asarray(y)[~keep]), k  # the masked ones were generated


def test_kept_tokens_follow_the_noised_path_inside_the_ode():
  b, n, c = 1, 4, 2
  y = jax.random.normal(jax.random.key(0), (b, n, c))
  eps = jax.random.normal(jax.random.key(1), (b, n, c))
  keep = jnp.array([True, False, True, False])[None, :, None]
  states = []

  def head(x, t, z):
    states.append((x, t))
    return jnp.sin(x) + z  # anything but the path's velocity

  velocity = editing._follow_path(head, keep, y, eps)  # pylint: disable=protected-access
  grid = time_grid(6)
  # Unrolled Python loop instead of the scan, to record the state at every step.
  x = eps
  for t_cur, t_next in zip(grid[:-1], grid[1:]):
    x = integrate(velocity, x, jnp.ones((b, n, c)), None, 1.0, np.array([t_cur, t_next]), 1.0)
    path = (1 - t_next) * y + t_next * eps
    np.testing.assert_allclose(np.asarray(x)[:, [0, 2]], np.asarray(path)[:, [0, 2]], atol=1e-5)
    assert not np.allclose(np.asarray(x)[:, [1, 3]], np.asarray(path)[:, [1, 3]], atol=1e-3)


def test_resampling_keeps_the_kept_tokens_and_redraws_the_others(model):
  latents = jax.random.normal(jax.random.key(3), (2, 4, 4, 4))
  masks = editing.token_masks(_half_masks(), model.schedule)
  labels, keys = jnp.array([1, 5]), sample_keys(0, 0, 2)
  settings = SamplingSettings(cfg=2.0, guidance=0.9, num_steps=4)
  plain = editing.edit_latents(model, latents, masks, labels, keys, settings)
  again = editing.edit_latents(model, latents, masks, labels, keys, settings, resample=2, resample_from=0.5)
  keep = ~np.asarray(masks[-1])
  np.testing.assert_array_equal(np.asarray(again)[keep], np.asarray(latents)[keep])
  assert not np.allclose(np.asarray(again)[~keep], np.asarray(plain)[~keep])
  with pytest.raises(ValueError, match="resample must be an integer >= 0, got -1"):
    editing.EditSettings(resample=-1)
  with pytest.raises(ValueError, match=r"resample_from must be in \(0, 1\], got 0.0"):
    editing.EditSettings(resample_from=0.0)


def test_after_scale_differs_from_path(model):
  latents = jax.random.normal(jax.random.key(3), (2, 4, 4, 4))
  masks = editing.token_masks(_half_masks(), model.schedule)
  labels, keys = jnp.array([1, 5]), sample_keys(0, 0, 2)
  settings = SamplingSettings(cfg=1.0, num_steps=4)
  a = editing.edit_latents(model, latents, masks, labels, keys, settings, "path")
  b = editing.edit_latents(model, latents, masks, labels, keys, settings, "after_scale")
  assert not np.allclose(a, b)


@pytest.mark.parametrize("cfg,resample", [(1.0, 0), (3.0, 1)])
def test_full_mask_is_plain_sampling(model, cfg, resample):
  latents = jax.random.normal(jax.random.key(3), (2, 4, 4, 4))
  full = editing.token_masks(np.ones((2, 16, 16), bool), model.schedule)
  labels, keys = jnp.array([2, 7]), sample_keys(4, 0, 2)
  settings = SamplingSettings(cfg=cfg, guidance=0.9, num_steps=4)
  edited = editing.edit_latents(model, latents, full, labels, keys, settings, resample=resample)
  plain = sample_latents(model, labels, keys, settings)
  np.testing.assert_allclose(edited, plain, rtol=0, atol=1e-6)


def test_edit_settings_are_checked():
  with pytest.raises(ValueError, match="mask_rule"):
    editing.EditSettings(mask_rule="half")
  with pytest.raises(ValueError, match="known"):
    editing.EditSettings(known="never")
  with pytest.raises(ValueError, match=r"feather must be None or an integer >= 0 \(pixels\), got -1"):
    editing.EditSettings(feather=-1)
  with pytest.raises(ValueError, match="fit_steps must be an integer >= 0, got -2"):
    editing.EditSettings(fit_steps=-2)
  with pytest.raises(ValueError, match="fit_learning_rate must be > 0, got 0.0"):
    editing.EditSettings(fit_learning_rate=0.0)


def test_fit_generated_tokens_moves_only_them_and_brings_the_kept_pixels_back():
  from flowar_jax.models.vae import AutoencoderKL  # pylint: disable=g-import-not-at-top
  vae = AutoencoderKL(tiny_config().vae, rngs=nnx.Rngs(1))
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
  latents = vae.encode(images).mode()
  generated = jnp.zeros((2, 4, 4), bool).at[:, :, 2:].set(True)
  edited = jnp.where(generated[..., None], jax.random.normal(jax.random.key(1), latents.shape), latents)
  keep = np.zeros((2, 16, 16), bool)
  keep[:, :, :8] = True  # the pixels of the kept tokens (VAE stride 4)

  def kept_error(z):
    return float(jnp.mean((vae.decode(z) - images)[keep] ** 2))

  fitted = editing.fit_generated_tokens(vae, edited, generated, images, jnp.asarray(keep), 1.0, steps=20,
                                        learning_rate=0.1)
  np.testing.assert_array_equal(np.asarray(fitted)[:, :, :2], np.asarray(edited)[:, :, :2])  # kept: exactly
  assert not np.allclose(fitted[:, :, 2:], edited[:, :, 2:])
  assert kept_error(fitted) < 0.9 * kept_error(edited)
  # Each image is fitted on its own: the first image's result does not depend on the second.
  alone = editing.fit_generated_tokens(vae, edited[:1], generated[:1], images[:1], jnp.asarray(keep[:1]), 1.0,
                                       steps=20, learning_rate=0.1)
  np.testing.assert_allclose(alone, fitted[:1], atol=1e-5)


def test_blend_keeps_the_original_outside_the_mask():
  edited = np.full((1, 4, 4, 3), 200, np.uint8)
  original = np.zeros((1, 4, 4, 3), np.uint8)
  mask = np.zeros((1, 4, 4), bool)
  mask[0, :, 2:] = True
  out = editing.blend(edited, original, mask)
  assert (out[0, :, :2] == 0).all() and (out[0, :, 2:] == 200).all()
  # Feathered: the kept column next to the mask takes 1 - 1/2 of the edit, the next one none of it.
  out = editing.blend(edited, original, mask, feather=1)
  assert (out[0, :, 2:] == 200).all() and (out[0, :, 1] == 100).all() and (out[0, :, 0] == 0).all()
  np.testing.assert_allclose(editing.edit_weight(mask, 2)[0, 0], [1 / 3, 2 / 3, 1, 1])
  with pytest.raises(ValueError, match="feather must be >= 0 pixels, got -1"):
    editing.blend(edited, original, mask, feather=-1)


def test_editor_encodes_edits_and_decodes(model):
  from flowar_jax.models.vae import AutoencoderKL  # pylint: disable=g-import-not-at-top
  from flowar_jax.sampling.sampler import image_sampler  # pylint: disable=g-import-not-at-top
  vae = AutoencoderKL(tiny_config().vae, rngs=nnx.Rngs(1))
  settings = SamplingSettings(cfg=2.0, guidance=0.9, num_steps=2)
  editor = editing.Editor(model, vae, 1.0, settings)
  images = np.asarray(jax.random.randint(jax.random.key(0), (2, 16, 16, 3), 0, 256), np.uint8)
  full = np.ones((2, 16, 16), bool)
  labels = np.array([4, 8])
  # A full mask is plain sampling, image for image.
  np.testing.assert_array_equal(editor(images, full, labels, seed=3),
                                image_sampler(model, vae, settings, 1.0)(labels, seed=3))
  masks = _half_masks()
  a = editor(images, masks, labels, seed=3)
  assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
  # The default fades the decode into the original over 2 kept pixels: beyond them the original exactly,
  # next to the mask the decode as `feather=None` gives it, weighted.
  assert editor.edit.feather == 2
  decoded = editing.Editor(model, vae, 1.0, settings, editing.EditSettings(feather=None))(images, masks, labels, 3)
  far = ~editing.edit_weight(masks, 2).astype(bool)
  np.testing.assert_array_equal(a[far], images[far])
  assert not np.array_equal(decoded[far], images[far])  # the decoder moved them
  np.testing.assert_array_equal(a, editing.blend(decoded, images, masks, 2))
  assert not np.array_equal(a, editor(images, masks, labels, seed=4))
  with pytest.raises(ValueError, match="class label 11 is out of range"):
    editor(images, masks, np.array([1, 11]), seed=0)
  with pytest.raises(ValueError, match="the mask of image 1 is empty: there is nothing to generate"):
    editor(images, np.stack([masks[0], np.zeros((16, 16), bool)]), labels, seed=0)


# The command's input checks: all run before anything loads or compiles.
from flowar_jax.commands import edit as edit_command  # noqa: E402


def _png(path, array):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(array).save(path)
  return str(path)


@pytest.fixture
def digit(tmp_path):
  image = np.zeros((16, 16, 3), np.uint8)
  image[3:13, 6:10] = 255
  return _png(tmp_path / "digit.png", image)


def test_mask_file_inpainting(tmp_path, digit):
  mask = np.zeros((16, 16), np.uint8)
  mask[:, 8:] = 255
  got = edit_command.prepare(digit, 16, mask_path=_png(tmp_path / "m.png", mask))
  np.testing.assert_array_equal(got.mask, mask > 0)
  assert got.image.shape == (16, 16, 3) and not got.notes and not got.full


def test_box_and_outpaint(digit):
  got = edit_command.prepare(digit, 16, box="0.5,0,1,1")
  assert got.mask[8:].all() and not got.mask[:8].any()
  got = edit_command.prepare(digit, 16, outpaint="4,4,4,4")  # 24x24 canvas, shrunk to 16x16
  assert got.mask[0].all() and got.mask[:, 0].all() and not got.mask[4:12, 4:12].any()
  assert got.image.shape == (16, 16, 3) and "resized to the model's 16x16" in got.notes[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(box="0.5,0.5,0.5,1"), "is not a box"),
    (dict(box="0,0,1"), "--box must be y0,x0,y1,x1"),
    (dict(box="0.01,0.01,0.02,0.02"), "the mask is empty"),  # rounds to no pixel
    (dict(outpaint="0,0,0,0"), "not all 0"),
    (dict(outpaint="1,2,a,4"), "--outpaint must be L,R,T,B"),
    (dict(), "give exactly one of --mask"),
    (dict(box="0,0,1,1", outpaint="1,1,1,1"), "got --box, --outpaint"),
])
def test_bad_regions_are_named(digit, kwargs, match):
  with pytest.raises(ValueError, match=match):
    edit_command.prepare(digit, 16, **kwargs)


def test_bad_masks_and_images_are_named(tmp_path, digit):
  with pytest.raises(ValueError, match=r"the mask .* is 8x16 \(WxH\) but the image is 16x16: they must be the same"):
    edit_command.prepare(digit, 16, mask_path=_png(tmp_path / "small.png", np.full((16, 8), 255, np.uint8)))
  with pytest.raises(ValueError, match="the mask is empty"):
    edit_command.prepare(digit, 16, mask_path=_png(tmp_path / "empty.png", np.zeros((16, 16), np.uint8)))
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"not a png")
  with pytest.raises(ValueError, match="cannot read image .*garbage.png"):
    edit_command.prepare(str(garbage), 16, box="0,0,1,1")
  with pytest.raises(FileNotFoundError, match="image file .*missing.png' does not exist"):
    edit_command.prepare(str(tmp_path / "missing.png"), 16, box="0,0,1,1")


def test_full_mask_notes_plain_sampling_and_other_sizes_are_resized(tmp_path, digit):
  got = edit_command.prepare(digit, 16, box="0,0,1,1")
  assert got.full and got.notes == ["note: the mask covers the whole image: nothing is kept, this is plain sampling"]
  wide = _png(tmp_path / "wide.png", np.zeros((16, 32, 3), np.uint8))
  got = edit_command.prepare(wide, 16, box="0,0.5,1,1")
  assert got.image.shape == (16, 16, 3) and got.mask[:, 8:].all() and not got.mask[:, :8].any()
  assert got.notes == ["warning: the image is 32x16; resized to the model's 16x16 (not square: stretched), the "
                       "mask with it; the edits are written at that size"]


def test_prepare_array_takes_images_in_memory(digit):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(Image.open(digit).convert("RGB"))
  mask = np.zeros((16, 16), bool)
  mask[4:8, 4:8] = True
  got = edit_command.prepare_array(image, 16, mask=mask)
  np.testing.assert_array_equal(got.mask, mask)
  np.testing.assert_array_equal(got.image, image)
  assert not got.notes
  by_file = edit_command.prepare(digit, 16, outpaint="4,4,4,4")
  by_array = edit_command.prepare_array(image, 16, outpaint="4,4,4,4")
  np.testing.assert_array_equal(by_array.image, by_file.image)
  np.testing.assert_array_equal(by_array.mask, by_file.mask)
  with pytest.raises(ValueError, match=r"the mask is 8x16 \(WxH\) but the image is 16x16"):
    edit_command.prepare_array(image, 16, mask=np.ones((16, 8), bool))
  with pytest.raises(ValueError, match="the mask is empty"):
    edit_command.prepare_array(image, 16, mask=np.zeros((16, 16), bool))
  with pytest.raises(ValueError, match=r"the image must be uint8 \[H, W, 3\], got float32"):
    edit_command.prepare_array(image.astype(np.float32), 16, box="0,0,1,1")
  with pytest.raises(ValueError, match="give exactly one of --mask"):
    edit_command.prepare_array(image, 16, mask=mask, box="0,0,1,1")


def test_labels_are_checked():
  assert edit_command.check_label(None, 10) == 10 and edit_command.check_label(3, 10) == 3
  with pytest.raises(ValueError, match=r"--label 10 is out of range: the model has 10 classes \(0..9\)"):
    edit_command.check_label(10, 10)
  with pytest.raises(ValueError, match="--label -1 is out of range"):
    edit_command.check_label(-1, 10)


def test_seam_energy_and_kept_change():
  from flowar_jax.evaluation.edit_metrics import kept_change, seam_energy  # pylint: disable=g-import-not-at-top
  images = np.zeros((1, 4, 4, 3), np.uint8)
  images[0, :, 2:] = 255  # a full step exactly on the boundary of the right half
  right = np.zeros((1, 4, 4), bool)
  right[0, :, 2:] = True
  assert seam_energy(images, right) == 1.0
  bottom = np.zeros((1, 4, 4), bool)
  bottom[0, 2:] = True
  assert seam_energy(images, bottom) == 0.0  # no step across the rows
  moved = images.copy()
  moved[0, 0, 0] = 51  # one kept pixel of 8 moves by 0.2
  assert kept_change(moved, images, right) == pytest.approx(0.2 / 8)
  assert kept_change(moved, images, right, margin=1) == pytest.approx(0.2 / 4)  # column 1 is left out
  with pytest.raises(ValueError, match="no boundary"):
    seam_energy(images, np.ones((1, 4, 4), bool))


def test_cli_edit_help_lists_its_flags():
  from test_cli import cli  # pylint: disable=g-import-not-at-top
  out = " ".join(cli("edit", "--help").stdout.split())
  for flag in ("--image FILE (required)", "--mask FILE", "--box Y0,X0,Y1,X1", "--outpaint L,R,T,B", "--label L",
               "--out DIR", "--[no]blend", "--num_samples N number of edits (default: 8)", "--resample R",
               "--resample_from T"):
    assert flag in out, flag


@pytest.mark.parametrize("kwargs,match", [
    (dict(resample=-1), r"--resample must be >= 0 \(resampling rounds per scale; 0 = none\), got -1"),
    (dict(resample=1, resample_from=0.0), r"--resample_from must be in \(0, 1\] .*, got 0.0"),
    (dict(resample=1, resample_from=1.5), r"--resample_from must be in \(0, 1\] .*, got 1.5"),
    (dict(resample=0, resample_from=0.7), "--resample_from has no effect without resampling rounds"),
    (dict(feather=-2), r"--feather must be >= 0 .* or -1 \(the decode as it is\), got -2"),
])
def test_edit_flags_are_checked(kwargs, match):
  with pytest.raises(ValueError, match=match):
    edit_command.edit_settings(**kwargs)


def test_edit_flags_build_the_settings():
  assert edit_command.edit_settings() == editing.EditSettings()
  got = edit_command.edit_settings(feather=-1, resample=2, resample_from=0.7)
  assert got == editing.EditSettings(feather=None, resample=2, resample_from=0.7)


def test_cli_edit_names_a_bad_resampling_flag_before_reading_anything(tmp_path):
  from test_cli import cli  # pylint: disable=g-import-not-at-top
  # No checkpoint and no image: the flag is checked first.
  proc = cli("edit", "--workdir", str(tmp_path), "--image", str(tmp_path / "none.png"), "--box", "0,0.5,1,1",
             "--resample", "1", "--resample_from", "2", check_ok=False)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
  assert "flowar-jax edit: error: --resample_from must be in (0, 1]" in proc.stderr and "got 2.0" in proc.stderr


def test_cli_edit_writes_edits_and_names_bad_input(trained, tmp_path):
  from test_cli import cli  # pylint: disable=g-import-not-at-top
  _, workdir, _ = trained
  image = np.zeros((16, 16, 3), np.uint8)
  image[3:13, 6:10] = 255
  path = _png(tmp_path / "digit.png", image)
  proc = cli("edit", "--workdir", workdir, "--image", path, "--label", "12", "--box", "0,0.5,1,1", check_ok=False)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
  assert "--label 12 is out of range: the model has 10 classes (0..9)" in proc.stderr
  out = str(tmp_path / "edits")
  proc = cli("edit", "--workdir", workdir, "--image", path, "--box", "0,0.5,1,1", "--label", "3", "--out", out,
             "--num_samples", "3", "--batch_size", "2", "--num_steps", "2", "--blend")
  with np.load(os.path.join(out, "edits.npz")) as f:
    edits = f["images"]
    assert edits.shape == (3, 16, 16, 3) and int(f["label"]) == 3
  np.testing.assert_array_equal(edits[:, :, :8], np.broadcast_to(image[:, :8], (3, 16, 8, 3)))  # --blend
  assert os.path.exists(os.path.join(out, "grid.png")) and os.path.exists(os.path.join(out, "edit_002.png"))
