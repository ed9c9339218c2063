"""The official PyTorch FlowAR's training and sampling throughput on this machine, for comparison with
benchmarks/train_throughput.py and benchmarks/sample_throughput.py at the same sizes.

  python benchmarks/official_throughput.py --official /path/to/FlowAR [--preset reduced] [--batch 16]
      [--mode train|sample|both] [--sample_batch 16 --num_steps 25 --cfg 4.0] [--autocast bfloat16]

Needs torch (`pip install flowar_jax[torch]`) and a checkout of the official repository (the directory that
holds `models/flowar.py`). Training runs the official step: forward, backward, AdamW with gradient clipping at
3.0, EMA update; sampling runs `sample_tokens` (its float64 Euler ODE). `--autocast float32` (the default) runs
both in float32, as the official engine trains; `--autocast bfloat16` runs the training forward and
`sample_tokens` under `torch.autocast("cpu", dtype=torch.bfloat16)`, the CPU counterpart of the CUDA autocast
its engine samples under (products in bf16, the rest in float32). Model sizes follow
`benchmarks/throughput_common.py` and timing `benchmarks/timing.py`, without importing JAX. The process's peak
resident memory is reported as `peak_rss_mb`.
"""
from __future__ import annotations

import argparse
import importlib
import contextlib
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import median_seconds, report  # noqa: E402

SIZES = {  # mirrors benchmarks/throughput_common.SIZES: width, depth, heads, head variant, head depth, head width
    "reduced": (256, 2, 4, "v1", 1, 256),
    "S": (768, 6, 12, "v1", 2, 1024),
    "B": (1024, 6, 16, "v1", 4, 1024),
    "L": (1024, 8, 16, "v2", 12, 1024),
    "H": (1536, 15, 16, "v2", 12, 1536),
}


def official_model(path: str, preset: str):
  import torch  # pylint: disable=g-import-not-at-top
  torch.Tensor.cuda = lambda self, *a, **k: self  # the official code moves tensors with .cuda()
  torch.nn.Module.cuda = lambda self, *a, **k: self
  sys.path.insert(0, os.path.abspath(path))
  flowar = importlib.import_module("models.flowar")
  width, depth, heads, variant, head_depth, head_width = SIZES[preset]
  norm = lambda dim: torch.nn.LayerNorm(dim, eps=1e-6)
  return flowar.FlowAR(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
                       decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads, mlp_ratio=4,
                       norm_layer=norm, cross=variant == "v2", diffloss_d=head_depth, diffloss_w=head_width,
                       attn_dropout=0.1, proj_dropout=0.1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--official", required=True, help="checkout of the official FlowAR repository")
  parser.add_argument("--preset", choices=sorted(SIZES), default="reduced")
  parser.add_argument("--mode", choices=("train", "sample", "both"), default="both")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--sample_batch", type=int, default=16)
  parser.add_argument("--num_steps", type=int, default=25)
  parser.add_argument("--cfg", type=float, default=4.0)
  parser.add_argument("--guidance", type=float, default=0.9)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--autocast", choices=("float32", "bfloat16"), default="float32",
                      help="bfloat16: training forward and sampler under torch.autocast on the CPU")
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = official_model(args.official, args.preset)

  def autocast():
    if args.autocast == "float32":
      return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)

  out = {"implementation": "official-pytorch", "device": "cpu", "preset": args.preset, "autocast": args.autocast,
         "torch_threads": torch.get_num_threads(), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
  if args.mode in ("train", "both"):
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
    ema = [p.detach().clone() for p in params]
    images = torch.randn(args.batch, 16, 16, 16)
    labels = torch.randint(0, 1000, (args.batch,))

    def train_step():
      with autocast():  # the forward only; backward runs outside autocast, as torch recommends
        loss = model(images, labels)
      optimizer.zero_grad()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 3.0)
      optimizer.step()
      with torch.no_grad():
        for e, p in zip(ema, params):
          e.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)
      return loss.item()

    seconds, times = median_seconds(train_step, args.repeats)
    out.update(batch=args.batch, step_s=round(seconds, 4), step_s_all=[round(t, 4) for t in times],
               imgs_per_s=round(args.batch / seconds, 2))
  if args.mode in ("sample", "both"):
    model.eval()
    labels = torch.randint(0, 1000, (args.sample_batch,))

    def sample():
      with torch.no_grad(), autocast():
        model.sample_tokens(num_steps=args.num_steps, guidance=args.guidance, cfg=args.cfg, labels=labels)

    seconds, times = median_seconds(sample, max(2, args.repeats // 2))
    out.update(sample_batch=args.sample_batch, num_steps=args.num_steps, cfg=args.cfg,
               sample_s_per_img=round(seconds / args.sample_batch, 4),
               sample_imgs_per_s=round(args.sample_batch / seconds, 2))
  out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
  report(out)


if __name__ == "__main__":
  main()
