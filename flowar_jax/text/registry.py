"""`build_text_encoder(config.text)`: the frozen text encoder a text-conditional run names in its config.

Keys read from the `text` section: `encoder` ("minilm" | "clip"), `weights` ("" = the bundled MiniLM,
"random", or a Hugging Face model folder / .safetensors file), `tokenizer` ("" = the one that comes with the
weights, else a tokenizer.json path), `max_length` (the context T; 0 = the encoder's default), `truncate`,
and for random CLIP `clip_size`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from flax import nnx
from tokenizers import Tokenizer

from flowar_jax.runs import fs
from flowar_jax.text import clip, minilm
from flowar_jax.text.checkpoint import CONFIG_FILE, read_checkpoint
from flowar_jax.text.frozen import FrozenTextEncoder
from flowar_jax.text.tokenization import PromptTokenizer, byte_level_tokenizer, read_tokenizer

RANDOM = "random"
TOKENIZER_FILE = "tokenizer.json"


def _get(config: Any, key: str, default: Any) -> Any:
  value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  return default if value is None else value


def _tokenizer_beside(path: str) -> Tokenizer | None:
  """The tokenizer.json in a model folder (or beside a .safetensors file), if there is one."""
  folder = path if fs.is_dir(path) else (path.rsplit("/", 1)[0] if "/" in path else ".")
  candidate = fs.join(folder, TOKENIZER_FILE)
  return read_tokenizer(candidate) if fs.exists(candidate) else None


def _init(build: Callable[[], nnx.Module], abstract: bool) -> nnx.Module:
  """The module with random parameters, or only their shapes when a checkpoint fills every one."""
  return nnx.eval_shape(build) if abstract else build()


def _prompt_tokenizer(tokenizer: Tokenizer, name: str, special: dict[str, str], vocab_size: int,
                      max_length: int, limit: int, truncate: bool) -> PromptTokenizer:
  if not 2 <= max_length <= limit:
    raise ValueError(f"text.max_length={max_length}: the {name} encoder takes 2..{limit} tokens")
  prompts = PromptTokenizer(tokenizer, max_length=max_length, truncate=truncate, name=f"the {name} tokenizer",
                            **special)
  if prompts.vocab_size > vocab_size:
    raise ValueError(f"the tokenizer does not match the {name} encoder: its ids reach {prompts.vocab_size - 1}, "
                     f"the encoder's vocabulary has {vocab_size} entries")
  return prompts


def _build_minilm(weights: str, tokenizer_path: str, max_length: int, truncate: bool,
                  config: Any) -> FrozenTextEncoder:
  del config
  tensors, where, tokenizer = None, "", None
  if weights == "":
    tensors, hf_config, tokenizer_json = minilm.bundled_files()
    size, where, tokenizer = minilm.BertSize.from_hf_config(hf_config), minilm.bundled_archive(), None
    if not tokenizer_path:
      tokenizer = Tokenizer.from_str(tokenizer_json)
  elif weights == RANDOM:
    size = minilm.BertSize()
    if not tokenizer_path:
      tokenizer = Tokenizer.from_str(minilm.bundled_files()[2])
  else:
    tensors, hf_config, where = read_checkpoint(weights)
    size = minilm.BertSize.from_hf_config(hf_config)
    if not tokenizer_path:
      tokenizer = _tokenizer_beside(weights)
      if tokenizer is None:
        raise FileNotFoundError(f"no {TOKENIZER_FILE} beside {weights!r}: set text.tokenizer to the BERT "
                                "tokenizer's tokenizer.json")
  if tokenizer_path:
    tokenizer = read_tokenizer(tokenizer_path)
  prompts = _prompt_tokenizer(tokenizer, "minilm", minilm.SPECIAL_TOKENS, size.vocab_size,
                              max_length or min(minilm.CONTEXT_LENGTH, size.max_positions), size.max_positions,
                              truncate)
  module = _init(lambda: minilm.MiniLM(size, rngs=nnx.Rngs(0)), tensors is not None)
  if tensors is not None:
    minilm.load_bert_weights(module.bert, tensors, where)
  return FrozenTextEncoder("minilm", module, prompts, width=size.width, pooled_width=size.width)


def _build_clip(weights: str, tokenizer_path: str, max_length: int, truncate: bool,
                config: Any) -> FrozenTextEncoder:
  tensors, where, tokenizer, projection = None, "", None, True
  if weights == "":
    raise ValueError("text.weights='' means the bundled MiniLM; CLIP has no bundled weights: give a Hugging "
                     "Face CLIP folder / .safetensors file, or 'random'")
  if weights == RANDOM:
    name = _get(config, "clip_size", "L/14") or "L/14"
    if name not in clip.SIZES:
      raise ValueError(f"text.clip_size={name!r}: expected one of {sorted(clip.SIZES)}")
    size = clip.SIZES[name]
    if not tokenizer_path:
      tokenizer = byte_level_tokenizer(clip.SPECIAL_TOKENS["start_token"], clip.SPECIAL_TOKENS["end_token"])
  else:
    tensors, hf_config, where = read_checkpoint(weights)
    size = clip.ClipSize.from_hf_config(hf_config)
    projection = clip.has_projection(tensors)
    if not tokenizer_path:
      tokenizer = _tokenizer_beside(weights)
      if tokenizer is None:
        raise FileNotFoundError(f"no {TOKENIZER_FILE} beside {weights!r}: set text.tokenizer to CLIP's "
                                "tokenizer.json")
  if tokenizer_path:
    tokenizer = read_tokenizer(tokenizer_path)
  prompts = _prompt_tokenizer(tokenizer, "clip", clip.SPECIAL_TOKENS, size.vocab_size,
                              max_length or size.context_length, size.context_length, truncate)
  module = _init(lambda: clip.ClipText(size, projection=projection, rngs=nnx.Rngs(0)), tensors is not None)
  if tensors is not None:
    clip.load_clip_weights(module, tensors, where)
  return FrozenTextEncoder("clip", module, prompts, width=size.width,
                           pooled_width=size.projection_dim if projection else size.width)


class TextDims(NamedTuple):
  """The shapes a text encoder gives, known without building it."""

  context_length: int  # T
  width: int  # D of the token states
  pooled_width: int  # P of the pooled vector


def text_encoder_dims(text_config: Any) -> TextDims:
  """The encoder's T, D, P from its config (and a checkpoint's config.json), without building it or reading
  its weights: for presets, summaries and ahead-of-time compilation (CLIP-L has 123M parameters)."""
  name, weights = _get(text_config, "encoder", ""), str(_get(text_config, "weights", ""))
  max_length = int(_get(text_config, "max_length", 0))
  if name == "minilm":
    size = minilm.BertSize() if weights in ("", RANDOM) else minilm.BertSize.from_hf_config(_hf_config(weights))
    return TextDims(max_length or min(minilm.CONTEXT_LENGTH, size.max_positions), size.width, size.width)
  if name == "clip":
    if weights == RANDOM:
      size, projection = clip.SIZES.get(_get(text_config, "clip_size", "L/14") or "L/14"), True
      if size is None:
        raise ValueError(f"text.clip_size={_get(text_config, 'clip_size', '')!r}: expected one of "
                         f"{sorted(clip.SIZES)}")
    else:
      config = _hf_config(weights)
      size = clip.ClipSize.from_hf_config(config)
      # CLIPTextModel has no projection; CLIPTextModelWithProjection and CLIPModel do.
      projection = not set(config.get("architectures") or ["CLIPTextModelWithProjection"]) <= {"CLIPTextModel"}
    return TextDims(max_length or size.context_length, size.width,
                    size.projection_dim if projection else size.width)
  raise ValueError(f"unknown text encoder {name!r}: expected one of {sorted(BUILDERS)}")


def _hf_config(weights: str) -> dict[str, Any]:
  if not weights:
    raise ValueError("text.weights='' means the bundled MiniLM; CLIP has no bundled weights: give a Hugging "
                     "Face CLIP folder / .safetensors file, or 'random'")
  folder = weights if fs.is_dir(weights) else (weights.rsplit("/", 1)[0] if "/" in weights else ".")
  path = fs.join(folder, CONFIG_FILE)
  if not fs.exists(path):
    raise FileNotFoundError(f"no {CONFIG_FILE} for the text encoder weights {weights!r} (looked for {path})")
  return fs.read_json(path)


BUILDERS: dict[str, Callable[..., FrozenTextEncoder]] = {"minilm": _build_minilm, "clip": _build_clip}


def build_text_encoder(text_config: Any) -> FrozenTextEncoder:
  """A run's `config.text` (ConfigDict or dict) -> the frozen encoder with its tokenizer (see module doc)."""
  name = _get(text_config, "encoder", "")
  if name not in BUILDERS:
    raise ValueError(f"unknown text encoder {name!r}: expected one of {sorted(BUILDERS)}")
  weights = str(_get(text_config, "weights", ""))
  return BUILDERS[name](weights, str(_get(text_config, "tokenizer", "")), int(_get(text_config, "max_length", 0)),
                        bool(_get(text_config, "truncate", False)), text_config)
