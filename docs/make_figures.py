"""Draws docs/architecture.png, the FlowAR scale pyramid, with PIL only:

  python docs/make_figures.py            # writes docs/architecture.png
  python docs/make_figures.py --scales 1,2,4   # the digits model instead
  python docs/make_figures.py --loss_of runs/digits   # also docs/digits_loss.png (needs matplotlib)

Columns are the scales (coarse to fine). Each scale's input tokens (the class token, then the previous
scale's latent upsampled) go through one scale-causal transformer; a flow head per scale integrates an ODE
from noise to that scale's latent, which is upsampled into the next column; the VAE decodes the last one.
"""
from __future__ import annotations

import argparse
import os

from PIL import Image, ImageDraw, ImageFont

INK = (33, 37, 41)
MUTED = (108, 117, 125)
BACKBONE = (214, 228, 255)
HEAD = (255, 232, 204)
LATENT = (120, 170, 120)
INPUT = (190, 190, 230)
CLASS = (240, 180, 180)
VAE = (225, 215, 245)


def _font(size: int) -> ImageFont.FreeTypeFont:
  return ImageFont.load_default(size=size)


def _centered(draw: ImageDraw.ImageDraw, center: tuple[float, float], text: str, size: int, fill=INK) -> None:
  draw.multiline_text(center, text, font=_font(size), fill=fill, anchor="mm", align="center", spacing=4)


def _grid(draw: ImageDraw.ImageDraw, center: tuple[float, float], side: int, extent: float, fill) -> None:
  """A side x side grid of tokens filling an extent x extent square."""
  x0, y0 = center[0] - extent / 2, center[1] - extent / 2
  cell = extent / side
  for r in range(side):
    for c in range(side):
      draw.rectangle([x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell, y0 + (r + 1) * cell], fill=fill,
                     outline=(255, 255, 255), width=1 if side > 8 else 2)
  draw.rectangle([x0, y0, x0 + extent, y0 + extent], outline=INK, width=2)


def _arrow(draw: ImageDraw.ImageDraw, start, end, fill=INK, width: int = 3) -> None:
  (x0, y0), (x1, y1) = start, end
  length = max(1.0, ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5)
  ux, uy = (x1 - x0) / length, (y1 - y0) / length
  draw.line([start, (x1 - ux * 10, y1 - uy * 10)], fill=fill, width=width)
  draw.polygon([(x1, y1), (x1 - ux * 14 - uy * 7, y1 - uy * 14 + ux * 7),
                (x1 - ux * 14 + uy * 7, y1 - uy * 14 - ux * 7)], fill=fill)


def architecture(scales: tuple[int, ...]) -> Image.Image:
  columns = len(scales)
  width, height = 260 + 200 * columns, 820
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  left, step = 150, 200
  xs = [left + step * k for k in range(columns)]
  extent = lambda side: 26 + 104 * (side / scales[-1]) ** 0.5
  y_input, y_backbone, y_head, y_latent = 150, 330, 470, 640

  _centered(draw, (width / 2, 34), "FlowAR: next-scale prediction with a flow-matching head per scale", 26)
  draw.text((20, y_input - 8), "inputs", font=_font(18), fill=MUTED)
  draw.text((20, y_latent - 8), "latents", font=_font(18), fill=MUTED)

  # Inputs: the class token, then each previous latent upsampled to this scale.
  for k, (x, side) in enumerate(zip(xs, scales)):
    if k == 0:
      draw.rounded_rectangle([x - 34, y_input - 24, x + 34, y_input + 24], radius=8, fill=CLASS, outline=INK,
                             width=2)
      _centered(draw, (x, y_input), "class", 18)
      _centered(draw, (x, y_input - 58), "label y", 17, MUTED)
    else:
      _grid(draw, (x, y_input), side, extent(side), INPUT)
      _centered(draw, (x, y_input - extent(side) / 2 - 18), f"upsampled {scales[k - 1]}->{side}", 17, MUTED)
    _arrow(draw, (x, y_input + max(24, extent(side) / 2) + 4), (x, y_backbone - 44))

  # Each latent feeds the next scale's input (the autoregressive step): a lane between the columns, drawn
  # first so that it passes behind the transformer.
  for k in range(columns - 1):
    lane = (xs[k] + xs[k + 1]) / 2
    draw.line([(xs[k] + extent(scales[k]) / 2 + 4, y_latent), (lane, y_latent), (lane, y_input)], fill=MUTED,
              width=2)
    _arrow(draw, (lane, y_input), (xs[k + 1] - extent(scales[k + 1]) / 2 - 4, y_input), fill=MUTED, width=2)

  # One transformer over every scale's tokens, scale-causal.
  draw.rounded_rectangle([xs[0] - 80, y_backbone - 42, xs[-1] + 80, y_backbone + 42], radius=14, fill=BACKBONE,
                         outline=INK, width=2)
  tokens = sum(s * s for s in scales)
  _centered(draw, ((xs[0] + xs[-1]) / 2, y_backbone),
            f"scale-wise transformer over all {tokens} tokens (2D RoPE, adaLN from the class)\n"
            "scale-causal attention: a token sees its own scale and every coarser one", 19)

  # A flow head per scale: noise -> latent by an ODE, conditioned on the backbone's tokens of that scale.
  for x, side in zip(xs, scales):
    _arrow(draw, (x, y_backbone + 44), (x, y_head - 36))
    draw.rounded_rectangle([x - 72, y_head - 34, x + 72, y_head + 34], radius=10, fill=HEAD, outline=INK, width=2)
    _centered(draw, (x, y_head), "flow head\nnoise -> latent", 17)
    _arrow(draw, (x, y_head + 36), (x, y_latent - extent(side) / 2 - 6))
    _grid(draw, (x, y_latent), side, extent(side), LATENT)
    _centered(draw, (x, y_latent + extent(side) / 2 + 20), f"{side}x{side}", 18)

  # The VAE decodes the finest latent.
  x_vae = xs[-1] + 170
  draw.rounded_rectangle([x_vae - 50, y_latent - 46, x_vae + 50, y_latent + 46], radius=10, fill=VAE, outline=INK,
                         width=2)
  _centered(draw, (x_vae, y_latent), "VAE\ndecoder", 18)
  _arrow(draw, (xs[-1] + extent(scales[-1]) / 2 + 6, y_latent), (x_vae - 52, y_latent))
  _centered(draw, (x_vae, y_latent + 74), "image", 18)
  _centered(draw, (width / 2, height - 40),
            "Training: all scales at once (teacher forcing, a flow-matching loss per scale). "
            "Sampling: scale by scale with a KV cache,\nan ODE per scale (classifier-free guidance ramped over "
            "the scales), then one VAE decode.", 17, MUTED)
  return image


def loss_per_scale(workdir: str, out: str) -> None:
  """Plots the FlowAR loss of every scale (and the total) logged in WORKDIR/metrics.jsonl."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from flowar_jax.runs.metrics import read_metrics  # pylint: disable=g-import-not-at-top

  records = [r for r in read_metrics(workdir) if "loss" in r]
  steps = [r["step"] for r in records]
  scales = sorted((k for k in records[0] if k.startswith("loss_scale_")), key=lambda k: int(k.rsplit("_", 1)[1]))
  fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
  for key in scales:
    side = key.rsplit("_", 1)[1]
    ax.plot(steps, [r[key] for r in records], label=f"scale {side}x{side}")
  ax.plot(steps, [r["loss"] for r in records], "k--", label="total")
  ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title="FlowAR loss per scale")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--scales", default="1,2,4,8,16", help="comma-separated sides, coarse to fine")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture.png"))
  parser.add_argument("--loss_of", default="", help="a FlowAR run directory: also plot its loss per scale")
  args = parser.parse_args()
  scales = tuple(int(s) for s in args.scales.split(","))
  architecture(scales).save(args.out, optimize=True)
  print(f"wrote {args.out}")
  if args.loss_of:
    out = os.path.join(os.path.dirname(args.out), "digits_loss.png")
    loss_per_scale(args.loss_of, out)
    print(f"wrote {out}")


if __name__ == "__main__":
  main()
