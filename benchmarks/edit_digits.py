"""Zero-shot editing measured on the held-out real digits (docs/editing.md has the figures).

  python benchmarks/edit_digits.py --workdir runs/digits [--num_steps 25] [--cfg 3] [--guidance 0.9]
                                   [--solver euler] [--seed 0] [--json FILE]
                                   [--mask_rule hybrid] [--fit_steps 0] [--default_only]
                                   [--resample R[,R2,...] --resample_from T[,T2,...]]
  python benchmarks/edit_digits.py --workdir runs/var_digits [--cfg 3] [--top_k 0] [--seed 0]   # a VAR run

For each held-out digit (the digits metric's eval split, which neither network saw), the right half and,
separately, the bottom half are regenerated:
  accuracy_true   the digits classifier's accuracy on the edits under the digit's own label
  success_other   the share of edits under another label (label + 1 + i % 9, mod 10) read as that label
  kept_change     mean |grey difference| (0..1) to the original over the kept half; `roundtrip` is the same
                  for a plain VAE encode -> decode, the least any latent edit can move it; `_far` leaves out
                  the kept pixels within one latent token (the VAE's stride) of the mask
  seam            mean squared grey step across the mask boundary; `real` is the originals' own
for these methods, all with the same noise (sample i draws from (seed, i)):
  path            the default: kept tokens follow the real noised path inside the ODE, and the decode fades
                  into the original over `EditSettings().feather` kept pixels next to the mask (on a VAR run
                  the rows are named `codes*` instead of `path*`: the image's own codes kept at every scale)
  path_decoded    the same edits as decoded, no blend
  path_pasted     the same edits with the original pasted back outside the mask (`--blend`)
  path_feather_F  the same edits faded into the original over F kept pixels
  after_scale     kept tokens reset only at each scale's end, with the default blend
  paste           a fresh sample of the label with the kept half of the original pasted back
  path_resample   (with --resample R) R RePaint-style resampling rounds inside each scale's ODE from t <=
                  --resample_from, with the default blend; several rounds or times (paired in order; one
                  time serves every R) give one row each, path_resample_R_T
  path_fit        (with --fit_steps N) the generated tokens fitted to the kept pixels for N steps before
                  decoding (`fit_generated_tokens`), no blend
`plain_samples.accuracy` is the class-conditional sampler's accuracy on the same labels and seeds, the target
for `accuracy_true`; `accuracy_real_readable` is `accuracy_true` over the digits whose real image the
classifier reads correctly, and `plain_samples.accuracy_real_readable` the plain samples' on the same digits'
labels. `confidence*` gives the 2nd, 5th and 10th percentiles of the classifier's probability of the
intended label (`real_confidence`: the real held-out digits'). --mask_rule any / most compare the token
rules; --default_only measures the default alone (with the blends, which reuse its decodes), for more seeds
in less time. after_scale and path_fit are FlowAR's.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import report  # noqa: E402
from flowar_jax.commands.edit import load_editor  # noqa: E402
from flowar_jax.runs.stored_config import stored_config  # noqa: E402
from flowar_jax.sampling.generate import load_image_sampler, settings_from  # noqa: E402
from flowar_jax.evaluation.digits import digit_classifier, split_images  # noqa: E402
from flowar_jax.evaluation.edit_metrics import kept_change, seam_energy  # noqa: E402
from flowar_jax.models.time_grid import SOLVERS  # noqa: E402
from flowar_jax.sampling.editing import EditSettings, blend  # noqa: E402


def half_masks(n: int, size: int, region: str) -> np.ndarray:
  """bool `[n, size, size]`: the right or bottom half generated."""
  mask = np.zeros((size, size), bool)
  if region == "right":
    mask[:, size // 2:] = True
  else:
    mask[size // 2:] = True
  return np.broadcast_to(mask, (n, size, size))


def other_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """A label other than each one, spread over all the others: label + 1 + i % (classes - 1), mod classes."""
  shift = 1 + np.arange(len(labels)) % (num_classes - 1)
  return ((labels + shift) % num_classes).astype(np.int32)


def resample_variants(rounds: str, starts: str) -> list[tuple[int, float]]:
  """`--resample 2,1 --resample_from 0.5,0.7` -> [(2, 0.5), (1, 0.7)]; one start serves every round count;
  0 rounds are left out."""
  try:
    counts, times = [int(r) for r in rounds.split(",")], [float(t) for t in starts.split(",")]
  except ValueError:
    raise SystemExit(f"--resample takes round counts and --resample_from times, comma-separated, got {rounds!r} "
                     f"and {starts!r}") from None
  if len(times) == 1:
    times *= len(counts)
  if len(times) != len(counts):
    raise SystemExit(f"--resample_from gives {len(times)} times for {len(counts)} --resample counts")
  return [(r, t) for r, t in zip(counts, times) if r]


def confidence(classifier, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """The low percentiles of the classifier's probability of the intended label: how plainly the least clear
  images show their digit (a miss is an image whose probability falls below another class's)."""
  p = classifier.label_probability(images, labels)
  return {f"p{q:02d}": float(np.percentile(p, q)) for q in (2, 5, 10)}


def scores(classifier, masks, originals, true_labels, other, edits_true, edits_other, roundtrip, margin,
           readable) -> dict:
  """The figures of one method on one region (see the module docstring)."""
  keep_rt = kept_change(roundtrip, originals, masks)
  keep = kept_change(edits_true, originals, masks)
  far = kept_change(edits_true, originals, masks, margin)
  return {"accuracy_true": classifier.metrics(edits_true, true_labels)["digits_accuracy"],
          "confidence_true": confidence(classifier, edits_true, true_labels),
          "accuracy_real_readable": classifier.metrics(edits_true[readable], true_labels[readable])[
              "digits_accuracy"],
          "success_other": classifier.metrics(edits_other, other)["digits_accuracy"],
          "kept_change": keep, "kept_change_other": kept_change(edits_other, originals, masks),
          "kept_vs_roundtrip": keep / keep_rt, "kept_change_far": far,
          "kept_far_vs_roundtrip": far / kept_change(roundtrip, originals, masks, margin),
          "seam": seam_energy(edits_true, masks), "seam_other": seam_energy(edits_other, masks)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_steps", type=int)
  parser.add_argument("--cfg", type=float)
  parser.add_argument("--guidance", type=float, help="FlowAR runs only: CFG applies where t <= this")
  parser.add_argument("--solver", choices=SOLVERS, help="FlowAR runs only")
  parser.add_argument("--top_k", type=int, help="VAR runs only")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--mask_rule", choices=("hybrid", "any", "most"), default="hybrid")
  parser.add_argument("--fit_steps", type=int, default=0, help="also measure path_fit with this many steps")
  parser.add_argument("--default_only", action="store_true",
                      help="leave out after_scale (the blends and the paste baseline cost no extra edit)")
  parser.add_argument("--resample", default="0", help="also measure path_resample with this many rounds (a comma "
                      "list: one row each)")
  parser.add_argument("--resample_from", default="0.5", help="the time each round starts from (a comma list: "
                      "paired with --resample's)")
  parser.add_argument("--json", help="also write the figures to this file")
  args = parser.parse_args()
  resample = resample_variants(args.resample, args.resample_from)

  config = stored_config(args.workdir)
  try:
    settings = settings_from(config, num_steps=args.num_steps, cfg=args.cfg, top_k=args.top_k,
                             guidance=args.guidance, solver=args.solver)
  except ValueError as error:  # a flag the run's head has no use for
    raise SystemExit(str(error)) from None
  flowar = config.model.name == "flowar"
  if not flowar and (args.fit_steps or resample):
    raise SystemExit("--fit_steps and --resample act on the flow head's continuous latents: FlowAR runs only")
  size, fraction = config.data.image_size, config.data.eval_fraction
  originals, labels = split_images("eval", size, fraction)
  n, num_classes = len(labels), config.model.num_classes
  other = other_labels(labels, num_classes)
  classifier = digit_classifier(size, fraction)
  readable = classifier.predict(originals) == labels
  default_feather = EditSettings().feather
  figures = {"workdir": args.workdir, "model": config.model.name, "num_images": n,
             "settings": dataclasses.asdict(settings), "mask_rule": args.mask_rule, "default_feather": default_feather,
             "resample": resample, "seed": args.seed, "device": jax.devices()[0].platform,
             "real_heldout_accuracy": classifier.metrics(originals, labels)["digits_accuracy"],
             "real_readable": int(readable.sum()),
             "real_confidence": confidence(classifier, originals, labels)}

  start = time.perf_counter()
  sampler = load_image_sampler(config, args.workdir, settings)
  fresh_true = sampler(labels, args.seed)
  fresh_other = sampler(other, args.seed)
  figures["plain_samples"] = {"accuracy": classifier.metrics(fresh_true, labels)["digits_accuracy"],
                              "accuracy_real_readable": classifier.metrics(fresh_true[readable], labels[readable])[
                                  "digits_accuracy"],
                              "accuracy_other_labels": classifier.metrics(fresh_other, other)["digits_accuracy"],
                              "confidence": confidence(classifier, fresh_true, labels)}
  # Edits decoded as they are; every blend is then computed from the same decodes on the host.
  base = "path" if flowar else "codes"
  editors = {base: EditSettings(args.mask_rule, "path", feather=None)}
  if flowar and not args.default_only:
    editors["after_scale"] = EditSettings(args.mask_rule, "after_scale", feather=None)
  for rounds, from_t in resample:
    name = "path_resample" if len(resample) == 1 else f"path_resample_{rounds}_{from_t:g}"
    editors[name] = EditSettings(args.mask_rule, "path", feather=None, resample=rounds, resample_from=from_t)
  if args.fit_steps:
    editors["path_fit"] = EditSettings(args.mask_rule, "path", feather=None, fit_steps=args.fit_steps)
  editors = {name: load_editor(config, args.workdir, settings, edit) for name, edit in editors.items()}
  roundtrip = editors[base].round_trip(originals)
  figures["roundtrip_accuracy"] = classifier.metrics(roundtrip, labels)["digits_accuracy"]
  margin = size // editors[base].schedule.latent_side  # one latent token: the 'far' kept pixels lie beyond
  for region in ("right", "bottom"):
    masks = half_masks(n, size, region)
    out = {"real": {"seam": seam_energy(originals, masks)},
           "roundtrip": {"kept_change": kept_change(roundtrip, originals, masks),
                         "seam": seam_energy(roundtrip, masks)}}
    measure = lambda edits_true, edits_other: scores(classifier, masks, originals, labels, other, edits_true,
                                                     edits_other, roundtrip, margin, readable)
    for name, editor in editors.items():
      edits_true = editor(originals, masks, labels, args.seed)
      edits_other = editor(originals, masks, other, args.seed)
      if name == base:
        out[f"{base}_decoded"] = measure(edits_true, edits_other)
        out[f"{base}_pasted"] = measure(blend(edits_true, originals, masks), blend(edits_other, originals, masks))
        for feather in (1, 2, 3):
          out[f"{base}_feather_{feather}"] = measure(blend(edits_true, originals, masks, feather),
                                                   blend(edits_other, originals, masks, feather))
      if name != "path_fit" and default_feather is not None:
        edits_true = blend(edits_true, originals, masks, default_feather)
        edits_other = blend(edits_other, originals, masks, default_feather)
      out[name] = measure(edits_true, edits_other)
    out["paste"] = measure(blend(fresh_true, originals, masks), blend(fresh_other, originals, masks))
    figures[region] = out
    print(region, out, file=sys.stderr, flush=True)
  figures["seconds"] = time.perf_counter() - start
  report(figures, args.json)


if __name__ == "__main__":
  main()
