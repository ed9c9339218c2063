"""Copies a TPU worker's local training log into the run directory, so it can be read there (`gcloud storage
cat WORKDIR/logs/worker_0.log`) while the job runs and after its slice is gone.

  log_sync.py [--every SECONDS] LOCAL DEST   copy LOCAL to DEST every SECONDS until SIGTERM (or until the
                                             process that started it is gone)
  log_sync.py --once LOCAL DEST              copy once
  log_sync.py --seed LOCAL DEST              if LOCAL is missing and DEST exists, start LOCAL from DEST

DEST may be gs:// (written through flowar_jax.runs.fs, with the same credentials as the trainer's
checkpoints, so whatever can write the workdir can write the log; no gcloud CLI needed). GCS objects cannot
be appended to, so each copy uploads the whole file: fine for logs of a few MB at one copy a minute.
A failed copy (a network blip) is reported on stderr and retried at the next tick; it never stops the job.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from flowar_jax.runs import fs


def copy(local: str, dest: str) -> bool:
  """Uploads LOCAL whole to DEST; False (and a line on stderr) when it could not."""
  try:
    with open(local, "rb") as f:
      data = f.read()
    fs.write_bytes(dest, data)
    return True
  except FileNotFoundError:
    return False
  except Exception as error:  # pylint: disable=broad-except  # keep syncing through transient errors
    print(f"log_sync: copying {local} to {dest} failed: {error}", file=sys.stderr, flush=True)
    return False


def seed(local: str, dest: str) -> None:
  if not os.path.exists(local) and fs.exists(dest):
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    with open(local, "wb") as f:
      f.write(fs.read_bytes(dest))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("local")
  parser.add_argument("dest")
  parser.add_argument("--every", type=float, default=60.0, help="seconds between copies")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--once", action="store_true")
  mode.add_argument("--seed", action="store_true")
  args = parser.parse_args(argv)
  if args.seed:
    seed(args.local, args.dest)
    return
  if args.once:
    sys.exit(0 if copy(args.local, args.dest) else 1)
  done = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: done.set())
  parent = os.getppid()
  while not done.wait(args.every):
    copy(args.local, args.dest)
    if os.getppid() != parent:  # the job's runner was killed: nobody will stop this loop
      break


if __name__ == "__main__":
  main()
