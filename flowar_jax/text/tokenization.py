"""Prompts -> token ids through the `tokenizers` library (a Hugging Face `tokenizer.json`).

Each encoder expects its special tokens around the prompt: BERT/MiniLM `[CLS] ... [SEP]`, CLIP
`<|startoftext|> ... <|endoftext|>`. The tokenizer.json's post-processor adds them; `PromptTokenizer` checks
that it does, pads to `max_length` and handles over-long prompts and unknown tokens:

- An over-long prompt (more than `max_length` tokens, special tokens included) is an error naming the prompt
  and its length, or with `truncate=True` is cut to `max_length` (the end token kept) and counted in a warning.
- An unknown token: WordPiece (MiniLM) maps a word it cannot spell with its vocabulary (e.g. an emoji) to
  `[UNK]`; the prompt still encodes, and the count is logged as a warning (`unknown="error"` refuses instead).
  CLIP's byte-level BPE spells every byte, so it has no unknown tokens.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from flowar_jax.runs import fs
from flowar_jax.text.base import TokenizedPrompts

log = logging.getLogger(__name__)

UNKNOWN_POLICIES = ("warn", "error")


def read_tokenizer(path: str) -> Tokenizer:
  """A `tokenizer.json` file (local or gs://) -> Tokenizer."""
  if not fs.exists(path):
    raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
  try:
    return Tokenizer.from_str(fs.read_text(path))
  except Exception as e:  # the library raises a bare Exception for a malformed file
    raise ValueError(f"{path!r} is not a Hugging Face tokenizer.json: {e}") from e


def _byte_characters() -> list[str]:
  """The character the ByteLevel pre-tokenizer writes for each byte 0..255: printable Latin-1 bytes stand for
  themselves, the others for the code points from 256 up, in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = [], 0
  for b in range(256):
    if b in printable:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def byte_level_tokenizer(start_token: str = "<|startoftext|>", end_token: str = "<|endoftext|>") -> Tokenizer:
  """A byte-level tokenizer with no merges: ids 0..255 are the bytes, then the start and end tokens.

  For randomly initialised encoders that have no tokenizer.json: every prompt encodes, one token a byte.
  """
  vocab = {c: b for b, c in enumerate(_byte_characters())}
  vocab.update({start_token: 256, end_token: 257})
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.add_special_tokens([start_token, end_token])
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{start_token} $A {end_token}",
      special_tokens=[(start_token, vocab[start_token]), (end_token, vocab[end_token])])
  return tokenizer


class PromptTokenizer:
  """Prompts -> `TokenizedPrompts` `[B, max_length]` with the encoder's special tokens, right-padded.

  `truncated_prompts` and `unknown_tokens` count, over this tokenizer's life, the prompts cut to fit and the
  tokens that became the unknown token (callers that cache encodings report them).
  """

  def __init__(self, tokenizer: Tokenizer, *, max_length: int, start_token: str, end_token: str,
               pad_token: str, truncate: bool = False, unknown: str = "warn", name: str = "the tokenizer"):
    if max_length < 2:
      raise ValueError(f"max_length {max_length} leaves no room for a prompt between the two special tokens")
    if unknown not in UNKNOWN_POLICIES:
      raise ValueError(f"unknown={unknown!r}: expected one of {UNKNOWN_POLICIES}")
    self.name, self.max_length, self.truncate, self.unknown = name, max_length, truncate, unknown
    ids = {}
    for role, token in (("start", start_token), ("end", end_token), ("padding", pad_token)):
      ids[role] = tokenizer.token_to_id(token)
      if ids[role] is None:
        raise ValueError(f"{name} does not match the encoder: it has no {role} token {token!r}")
    self.start_id, self.end_id, self.pad_id = ids["start"], ids["end"], ids["padding"]
    self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    model = tokenizer.model
    self.unk_token = getattr(model, "unk_token", None) if isinstance(model, models.WordPiece) else None
    # Our own padding; the file's own padding/truncation settings (MiniLM's pads to 128) must not apply. A copy,
    # so that a tokenizer shared with another PromptTokenizer keeps its settings.
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    tokenizer.no_padding()
    if truncate:
      tokenizer.enable_truncation(max_length)
    else:
      tokenizer.no_truncation()
    self.tokenizer = tokenizer
    empty = tokenizer.encode("").ids
    if empty != [self.start_id, self.end_id]:
      raise ValueError(f"{name} does not match the encoder: the empty prompt encodes to {empty}, expected the "
                       f"start and end tokens {[self.start_id, self.end_id]} ({start_token!r}, {end_token!r})")
    self.truncated_prompts = 0
    self.unknown_tokens = 0

  def __call__(self, prompts: Sequence[str]) -> TokenizedPrompts:
    """B prompts -> ids int32 and mask bool `[B, max_length]` (mask True at real tokens, special included)."""
    if isinstance(prompts, str):
      raise TypeError(f"expected a list of prompts, got the string {prompts!r}")
    prompts = list(prompts)
    for p in prompts:
      if not isinstance(p, str):
        raise TypeError(f"a prompt must be a string, got {type(p).__name__}: {p!r}")
    encodings = self.tokenizer.encode_batch(prompts, add_special_tokens=True) if prompts else []
    ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), self.max_length), bool)
    truncated, unknown = [], []
    for i, (prompt, enc) in enumerate(zip(prompts, encodings)):
      if len(enc.ids) > self.max_length:
        raise ValueError(f"prompt {prompt!r} is {len(enc.ids)} tokens long ({self.name}, special tokens "
                         f"included); the context is {self.max_length}: shorten it or set truncate=True")
      if enc.overflowing:
        truncated.append(prompt)
      if self.unk_token is not None:
        n = sum(1 for tok, special in zip(enc.tokens, enc.special_tokens_mask)
                if tok == self.unk_token and not special)
        if n:
          unknown.append((prompt, n))
      ids[i, :len(enc.ids)] = enc.ids
      mask[i, :len(enc.ids)] = True
    if unknown:
      count = sum(n for _, n in unknown)
      message = (f"{count} token(s) in {len(unknown)} prompt(s) are not in the vocabulary of {self.name} and "
                 f"became {self.unk_token}, e.g. {unknown[0][0]!r}")
      if self.unknown == "error":
        raise ValueError(message)
      self.unknown_tokens += count
      log.warning(message)
    if truncated:
      self.truncated_prompts += len(truncated)
      log.warning("%d prompt(s) longer than %d tokens were truncated, e.g. %r", len(truncated),
                  self.max_length, truncated[0])
    return TokenizedPrompts(ids=ids, mask=mask)
