#!/usr/bin/env python3
"""Run a sweep declared in configs/sweeps/*.py (see docs/sweeps.md): one workdir per point, a summary at the end.

  python launch/sweep.py configs/sweeps/digits_lr.py --workdir runs/digits_lr [--parallel 2]
  python launch/sweep.py configs/sweeps/digits_lr.py --workdir runs/digits_lr --dry_run
  python launch/sweep.py configs/sweeps/flowar_s_lr.py --workdir gs://bucket/sweep --pod my-v5e-256 \
      --pod_args=--zone=us-west4-a --dry_run
  python launch/sweep.py configs/sweeps/digits_lr.py --workdir runs/digits_lr --summary_only

Every point's config is built and validated before anything runs (an unknown key fails, naming it). Points
whose workdir holds report.json are skipped, so running the same command again resumes the sweep.
`--set key=value` (repeatable) overrides a key in every point, e.g. a shorter run.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a clone, uninstalled

# This process only plans and reads files: it stays off accelerators, which the points get as this
# environment had them.
POINT_ENV = dict(os.environ)
os.environ["JAX_PLATFORMS"] = "cpu"

from flowar_jax.config_files import load_config, parse_override  # noqa: E402
from flowar_jax.sweeps import load_sweep  # noqa: E402
from flowar_jax.sweeps import runner  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("sweep", help="sweep file, e.g. configs/sweeps/digits_lr.py")
  parser.add_argument("--workdir", required=True, help="the sweep's directory: one subdirectory per point")
  parser.add_argument("--parallel", type=int, default=1, help="local points trained at once")
  parser.add_argument("--dry_run", action="store_true", help="print the points and commands, run nothing")
  parser.add_argument("--summary_only", action="store_true", help="print the summary of what has run")
  parser.add_argument("--only", default="", help="comma-separated point names to run (default: all)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key in every point")
  parser.add_argument("--pod", default="", help=f"run each point on this TPU pod through {runner.POD_LAUNCHER}")
  parser.add_argument("--pod_args", default="", help="extra arguments for the pod launcher (shell-quoted)")
  return parser.parse_args(argv)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  if args.parallel < 1:
    raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
  sweep = load_sweep(args.sweep)
  config_path = runner.resolve_config(sweep, args.sweep)
  base = load_config(config_path)
  extra = dict(parse_override(base, text) for text in args.set)
  points = [dataclasses.replace(p, overrides={**p.overrides, **extra}) for p in sweep.expand()]
  if args.only:
    wanted = set(args.only.split(","))
    unknown = wanted - {p.name for p in points}
    if unknown:
      raise ValueError(f"--only names no point of this sweep: {sorted(unknown)}")
    points = [p for p in points if p.name in wanted]
  runner.check_points(points, config_path)
  runs = runner.plan(points, args.workdir, config_path, pod=args.pod or None,
                     pod_args=shlex.split(args.pod_args))
  if args.dry_run:
    print(f"{len(runs)} points of {args.sweep} (config {config_path}):")
    for run in runs:
      print(f"  [{run.status}] {shlex.join(run.command)}")
    return 0
  if not args.summary_only:
    runner.check_records(runs)
    if args.pod:
      runner.run_commands(runs, config_path)
    else:
      runner.run_local(runs, config_path, parallel=args.parallel, env=POINT_ENV)
  print(runner.write_summary(args.workdir, runner.summarize(runs), readable=all(run.readable for run in runs)))
  return 1 if any(run.status.startswith(("failed", "launch failed")) for run in runs) else 0


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv[1:]))
  except (ValueError, KeyError, FileNotFoundError, TypeError) as error:
    print(f"sweep: error: {error.args[0] if isinstance(error, KeyError) else error}", file=sys.stderr)
    sys.exit(2)
