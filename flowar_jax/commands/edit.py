"""`edit`: inpainting, outpainting and class editing of one image with a trained FlowAR or VAR (docs/editing.md).

Every input is checked before anything compiles: an unreadable image or mask, a mask of another size than
the image, an empty mask, a box or padding that makes no sense, a label out of range. An image of another
size than the model's is resized (with a warning), its mask with it: the model generates at one resolution,
and a resize keeps the mask aligned with what the user marked, where a crop would cut part of it away.
"""
from __future__ import annotations

import dataclasses
import io
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image

from flowar_jax.parallel.batch import round_up_to_data_parallel
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.runs import fs
from flowar_jax.sampling.editing import Editor, EditSettings, blend
from flowar_jax.runs.images import enlarge, make_grid
from flowar_jax.scales.resize import area_matrix

EDITABLE = ("flowar", "var")  # the families whose samplers keep known tokens


@dataclasses.dataclass
class EditInput:
  """An image at the model's resolution and its mask, with what was done to get there.

  image: uint8 `[S, S, 3]`; mask: bool `[S, S]` (True = generate); notes: warnings and notes for the user.
  """
  image: np.ndarray
  mask: np.ndarray
  notes: list[str]

  @property
  def full(self) -> bool:
    return bool(self.mask.all())


def read_image(path: str, what: str = "image") -> Image.Image:
  """A PIL image from a local or gs:// path; an error naming the path when it is missing or not an image."""
  if not fs.exists(path):
    raise FileNotFoundError(f"{what} file {path!r} does not exist")
  try:
    image = Image.open(io.BytesIO(fs.read_bytes(path)))
    image.load()
  except Exception as e:  # PIL raises several types for undecodable data
    raise ValueError(f"cannot read {what} {path!r}: not an image PIL can decode ({e})") from e
  return image


def to_rgb(image: Image.Image) -> np.ndarray:
  """uint8 `[H, W, 3]`; transparency composited on black."""
  if image.mode in ("RGBA", "LA", "P"):
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (0, 0, 0, 255))
    image = Image.alpha_composite(background, image)
  return np.asarray(image.convert("RGB"), np.uint8)


def to_mask(image: Image.Image) -> np.ndarray:
  """bool `[H, W]`: True where the mask image is white (grey level >= 128): those pixels are generated."""
  return np.asarray(image.convert("L")) >= 128


def box_mask(box: str | tuple[float, ...], height: int, width: int) -> np.ndarray:
  """`y0,x0,y1,x1` in fractions of the image -> bool `[H, W]`, True inside the box (ends rounded to pixels)."""
  values = _numbers(box, 4, "--box", "y0,x0,y1,x1 (fractions of the image, e.g. 0,0.5,1,1 = the right half)",
                    float)
  y0, x0, y1, x1 = values
  if not all(0.0 <= v <= 1.0 for v in values) or y0 >= y1 or x0 >= x1:
    raise ValueError(f"--box {y0},{x0},{y1},{x1} is not a box: need 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1")
  r0, r1, c0, c1 = (int(round(y0 * height)), int(round(y1 * height)), int(round(x0 * width)),
                    int(round(x1 * width)))
  mask = np.zeros((height, width), bool)
  mask[r0:r1, c0:c1] = True
  return mask


def _numbers(raw, count: int, flag: str, form: str, kind) -> tuple:
  parts = raw.split(",") if isinstance(raw, str) else list(raw)
  try:
    values = tuple(kind(p) for p in parts)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{flag} must be {form}, got {raw!r}") from e
  if len(values) != count:
    raise ValueError(f"{flag} must be {form}, got {raw!r}")
  return values


def outpaint_canvas(image: np.ndarray, pads: str | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """uint8 `[H, W, 3]` and `L,R,T,B` pixels -> the grown canvas `[H + T + B, W + L + R, 3]` (the new area filled
  by repeating the edge pixels, so the VAE sees no artificial frame) and its mask (True on the new area)."""
  left, right, top, bottom = _numbers(pads, 4, "--outpaint", "L,R,T,B (pixels to add on each side)", int)
  if min(left, right, top, bottom) < 0 or left + right + top + bottom == 0:
    raise ValueError(f"--outpaint {left},{right},{top},{bottom}: the pixels to add must be >= 0, and not all 0")
  h, w = image.shape[:2]
  canvas = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="edge")
  mask = np.ones(canvas.shape[:2], bool)
  mask[top:top + h, left:left + w] = False
  return canvas, mask


def resize_to_model(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Image (PIL bicubic, as the digits data) and mask to `[size, size]`; a resized mask pixel is generated
  when any part of it was (the area share > 0, the rule `token_masks` uses)."""
  resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC), np.uint8)
  share = area_matrix(mask.shape[0], size) @ mask.astype(np.float64) @ area_matrix(mask.shape[1], size).T
  return resized, share > 0


def prepare(image_path: str, image_size: int, *, mask_path: str | None = None, box: str | None = None,
            outpaint: str | None = None) -> EditInput:
  """The image file and exactly one of a mask file, a box or outpainting margins -> an `EditInput` at the
  model's resolution `image_size`. Raises ValueError / FileNotFoundError naming the problem."""
  _one_region(mask_path, box, outpaint)
  image = to_rgb(read_image(image_path))
  mask = None
  if mask_path:
    mask = to_mask(read_image(mask_path, "mask"))
    if mask.shape != image.shape[:2]:
      raise ValueError(f"the mask {mask_path!r} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is "
                       f"{image.shape[1]}x{image.shape[0]}: they must be the same size")
  return prepare_array(image, image_size, mask=mask, box=box, outpaint=outpaint)


def _one_region(mask, box, outpaint) -> None:
  given = [name for name, v in (("--mask", mask), ("--box", box), ("--outpaint", outpaint)) if v is not None
           and (not isinstance(v, str) or v)]
  if len(given) != 1:
    raise ValueError("give exactly one of --mask FILE, --box y0,x0,y1,x1 or --outpaint L,R,T,B (what to "
                     f"generate), got {', '.join(given) if given else 'none'}")


def prepare_array(image: np.ndarray, image_size: int, *, mask: np.ndarray | None = None, box: str | None = None,
                  outpaint: str | None = None) -> EditInput:
  """`prepare` for an image already in memory: uint8 `[H, W, 3]` and exactly one of a bool mask `[H, W]`
  (True = generate), a box `y0,x0,y1,x1` (fractions) or outpainting margins `L,R,T,B` (pixels)."""
  _one_region(mask, box, outpaint)
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"the image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  notes = []
  if mask is not None:
    mask = np.asarray(mask, bool)
    if mask.shape != image.shape[:2]:
      raise ValueError(f"the mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is "
                       f"{image.shape[1]}x{image.shape[0]}: they must be the same size")
  elif box:
    mask = box_mask(box, *image.shape[:2])
  else:
    image, mask = outpaint_canvas(image, outpaint)
  if not mask.any():
    raise ValueError("the mask is empty (no white pixel): there is nothing to generate")
  h, w = image.shape[:2]
  if (h, w) != (image_size, image_size):
    what = "the outpainting canvas" if outpaint else "the image"
    stretch = " (not square: stretched)" if h != w else ""
    notes.append(f"warning: {what} is {w}x{h}; resized to the model's {image_size}x{image_size}{stretch}, "
                 "the mask with it; the edits are written at that size")
    image, mask = resize_to_model(image, mask, image_size)
  if mask.all():
    notes.append("note: the mask covers the whole image: nothing is kept, this is plain sampling")
  return EditInput(image, mask, notes)


def load_editor(config: ml_collections.ConfigDict, workdir: str, settings,
                edit: EditSettings = EditSettings(), use_ema: bool = True, plan: ShardingPlan | None = None
                ) -> Editor:
  """An `Editor` for the latest FlowAR or VAR checkpoint in WORKDIR (trained or converted) and its tokenizer,
  sharded by `plan` (default: the sampling plan of `sample`). `settings`: the model's sampling settings
  (`settings_from(config)`)."""
  # Imported here so that input errors come before the loaders' imports.
  from flowar_jax.sampling.generate import load_trained, sampling_plan  # pylint: disable=g-import-not-at-top
  plan = plan or sampling_plan(config)
  model, tokenizer, latent_scale = load_trained(config, workdir, use_ema, plan)
  return Editor(model, tokenizer, latent_scale, settings, edit, plan)


def edit_settings(*, feather: int = 2, resample: int | None = None, resample_from: float | None = None
                  ) -> EditSettings:
  """The command line's `--feather`, `--resample` and `--resample_from` -> `EditSettings`; None keeps
  `EditSettings`' default. Errors name the flag."""
  default = EditSettings()
  if feather < -1:
    raise ValueError(f"--feather must be >= 0 (kept pixels to fade over) or -1 (the decode as it is), got {feather}")
  if resample is not None and resample < 0:
    raise ValueError(f"--resample must be >= 0 (resampling rounds per scale; 0 = none), got {resample}")
  rounds = default.resample if resample is None else resample
  if resample_from is not None:
    if not 0 < resample_from <= 1:
      raise ValueError(f"--resample_from must be in (0, 1] (the flow time the generated tokens are noised back to, "
                       f"1 = pure noise), got {resample_from}")
    if not rounds:
      raise ValueError("--resample_from has no effect without resampling rounds: give --resample R > 0 with it")
  return EditSettings(feather=None if feather == -1 else feather, resample=rounds,
                      resample_from=default.resample_from if resample_from is None else resample_from)


def check_label(label: int | None, num_classes: int) -> int:
  """The label to generate under; None -> num_classes (no class: unconditional, needs label dropout)."""
  if label is None:
    return num_classes
  if not 0 <= label < num_classes:
    raise ValueError(f"--label {label} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
  return int(label)


def edit_images(editor: Editor, image: np.ndarray, mask: np.ndarray, label: int, *, num_samples: int, seed: int,
                batch_size: int, blend_original: bool = False) -> np.ndarray:
  """`num_samples` edits of one image: uint8 `[N, S, S, 3]`; edit i draws its noise from (seed, i).

  The editor's `EditSettings.feather` fades each edit into the original next to the mask; `blend_original`
  pastes the original back exactly everywhere outside the mask (`--blend`).

  Every batch has the same size (the last one padded), so one program serves them all.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  batch_size = round_up_to_data_parallel(editor.plan, min(batch_size, num_samples))
  images = np.broadcast_to(image, (batch_size,) + image.shape)
  masks = np.broadcast_to(mask, (batch_size,) + mask.shape)
  labels = np.full((batch_size,), label, np.int32)
  out = []
  for start in range(0, num_samples, batch_size):
    out.append(editor(images, masks, labels, seed, first_index=start)[:num_samples - start])
  edits = np.concatenate(out)
  return blend(edits, images[:1], masks[:1]) if blend_original else edits


def mask_view(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The image with the generated area tinted, for the grid."""
  view = image.astype(np.float32)
  view[mask] = 0.5 * view[mask] + 0.5 * np.array([255.0, 0.0, 255.0])
  return view.astype(np.uint8)


def write_edits(directory: str, original: np.ndarray, mask: np.ndarray, edits: np.ndarray, label: int
                ) -> list[str]:
  """DIR/edits.npz (edits, original, mask, label), DIR/edit_###.png and DIR/grid.png (the original, the mask
  tinted on it, then the edits, enlarged to >= 64 pixels). Returns the paths written."""
  fs.makedirs(directory)
  paths = [fs.join(directory, "edits.npz")]
  fs.save_npz(paths[0], images=edits, original=original, mask=mask, label=np.int64(label))

  def png(path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    fs.write_bytes(path, buffer.getvalue())
    paths.append(path)

  for i, image in enumerate(edits):
    png(fs.join(directory, f"edit_{i:03d}.png"), image)
  row = np.concatenate([original[None], mask_view(original, mask)[None], edits[:62]])
  png(fs.join(directory, "grid.png"), make_grid(enlarge(row), columns=min(len(row), 8)))
  return paths


def run(config: ml_collections.ConfigDict, workdir: str, *, image: str, mask: str | None = None,
        box: str | None = None, outpaint: str | None = None, label: int | None = None, out: str | None = None,
        num_samples: int = 8, seed: int = 0, settings, batch_size: int = 64,
        use_ema: bool = True, blend_original: bool = False, edit: EditSettings = EditSettings()) -> np.ndarray:
  """The command: checks every input, then edits and writes to `out` (default WORKDIR/edits). Returns the edits."""
  if config.model.name not in EDITABLE:
    raise ValueError(f"the edit command edits {' and '.join(EDITABLE)} runs; this run is {config.model.name}")
  edit.check_family(config.model.name)  # before any file is read or weights are loaded
  prepared = prepare(image, config.data.image_size, mask_path=mask, box=box, outpaint=outpaint)
  label_id = check_label(label, config.model.num_classes)
  no_guidance = 1.0 if config.model.name == "flowar" else 0.0  # FlowAR's cfg is a weight, VAR's a ramp's slope
  if label is None and settings.cfg != no_guidance:
    settings = dataclasses.replace(settings, cfg=no_guidance)  # no class: guidance would compare the null class with itself
    prepared.notes.append("note: no --label: generating without a class (classifier-free guidance off)")
  for line in prepared.notes:
    print(f"flowar-jax edit: {line}", file=sys.stderr, flush=True)
  editor = load_editor(config, workdir, settings, edit, use_ema=use_ema)
  edits = edit_images(editor, prepared.image, prepared.mask, label_id, num_samples=num_samples, seed=seed,
                      batch_size=batch_size, blend_original=blend_original)
  if jax.process_index() == 0:
    paths = write_edits(out or fs.join(workdir, "edits"), prepared.image, prepared.mask, edits, label_id)
    print(f"wrote {paths[0]}, {len(edits)} edit_###.png and {paths[-1]}", flush=True)
  return edits
