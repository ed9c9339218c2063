"""Running a sweep: every point's config is checked before anything runs, then each point trains into
ROOT/<point name> (here, N at a time, or through the TPU pod launcher), finished points are skipped, and a
summary table is printed and written to ROOT/summary.md and ROOT/summary.json.

A point is finished when its workdir holds report.json, which `train` writes when it completes; a point
whose run stopped early resumes from its latest checkpoint when the sweep runs again.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

from etils import epath

from flowar_jax.config import validate_config
from flowar_jax.config_files import load_config, override_flags
from flowar_jax.runs import fs
from flowar_jax.runs.metrics import read_metrics
from flowar_jax.runs.progress import Progress
from flowar_jax.runs.workdir import REPORT_FILE
from flowar_jax.sweeps.spec import Point, Sweep

POINT_FILE = "sweep_point.json"  # what the point is: name, config, overrides
LOG_FILE = "train.log"  # a local point's output
POD_LAUNCHER = "launch/tpu_pod.sh"
COMPILE_CACHE = "jax_cache"  # ROOT/jax_cache: compiled programs shared by the local points


@dataclasses.dataclass
class PointRun:
  point: Point
  workdir: str
  command: list[str]
  status: str = "pending"
  readable: bool = True  # whether this machine can read the workdir's file system


def resolve_config(sweep: Sweep, sweep_file: str) -> str:
  """The sweep's config path as given when it exists from here, else relative to the repository that holds
  the sweep file (configs/sweeps/NAME.py -> the repository root)."""
  file, sep, arg = sweep.config.partition(":")
  if os.path.isfile(file) or os.path.isabs(file):
    return sweep.config
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sweep_file))))
  candidate = os.path.join(root, file)
  if os.path.isfile(candidate):
    return candidate + sep + arg
  raise FileNotFoundError(f"the sweep's config {file!r} exists neither from here nor in {root!r}")


def check_points(points: Sequence[Point], config_path: str) -> None:
  """Builds and validates every point's config; the first bad one raises an error naming the point and key."""
  for point in points:
    try:
      validate_config(load_config(config_path, point.overrides))
    except (KeyError, ValueError, TypeError) as error:
      message = error.args[0] if isinstance(error, KeyError) and error.args else error
      raise ValueError(f"sweep point {point.name}: {message}") from None


UNREADABLE = "unknown (workdir unreadable here)"


def _exists(path: epath.Path) -> bool | None:
  """Whether `path` exists; None where this machine cannot read its filesystem (e.g. gs:// without gcsfs)."""
  try:
    return path.exists()
  except (ImportError, OSError):
    return None


def check_records(runs: Sequence[PointRun]) -> None:
  """Refuses to reuse a point's workdir that an earlier sweep with other settings wrote."""
  for run in runs:
    record = epath.Path(run.workdir) / POINT_FILE
    if run.readable and _exists(record):
      stored = json.loads(record.read_text())
      if stored.get("overrides") != _jsonable(run.point.overrides):
        raise ValueError(f"{run.workdir} holds sweep point {stored.get('name')!r} with overrides "
                         f"{stored.get('overrides')}, not {_jsonable(run.point.overrides)}: use another --workdir")


def _jsonable(overrides: Mapping[str, Any]) -> dict:
  return json.loads(json.dumps(overrides))


def train_command(config_path: str, workdir: str, overrides: Mapping[str, Any]) -> list[str]:
  return [sys.executable, "-m", "flowar_jax", "train", "--config", config_path, "--workdir", workdir,
          *override_flags(overrides)]


def pod_command(pod: str, pod_args: Sequence[str], config_path: str, workdir: str,
                overrides: Mapping[str, Any]) -> list[str]:
  """`launch/tpu_pod.sh --name POD [POD_ARGS...] CONFIG WORKDIR -- OVERRIDES...`: the launcher trains CONFIG in
  WORKDIR with the overrides on every host of the slice POD (see docs/tpu_pods.md)."""
  return [POD_LAUNCHER, "--name", pod, *pod_args, config_path, workdir, "--", *override_flags(overrides)]


def plan(points: Sequence[Point], root: str, config_path: str, pod: str | None = None,
         pod_args: Sequence[str] = ()) -> list[PointRun]:
  runs = []
  for point in points:
    workdir = fs.join(root, point.name)
    command = (pod_command(pod, pod_args, config_path, workdir, point.overrides) if pod
               else train_command(config_path, workdir, point.overrides))
    runs.append(PointRun(point, workdir, command))
  # The points share ROOT's file system: once it proves unreadable from here (gs:// offline or without gcsfs,
  # where each probe can spend half a minute in retries), the others are not probed.
  readable = True
  for run in runs:
    done = _exists(epath.Path(run.workdir) / REPORT_FILE) if readable else None
    readable = run.readable = done is not None
    run.status = UNREADABLE if done is None else "done (earlier)" if done else "pending"
  return runs


def _start(run: PointRun, config_path: str) -> None:
  """Records what the point is in its workdir (best effort where this machine cannot write there)."""
  workdir = epath.Path(run.workdir)
  if not run.readable:
    print(f"cannot write {workdir / POINT_FILE} from here (its file system is unreadable); launching anyway",
          flush=True)
    return
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except (ImportError, OSError) as error:
    print(f"cannot write {workdir / POINT_FILE} from here ({error}); launching anyway", flush=True)
    return
  (workdir / POINT_FILE).write_text(json.dumps({"name": run.point.name, "config": config_path,
                                                "overrides": _jsonable(run.point.overrides),
                                                "command": shlex.join(run.command)}, indent=1))


LOG_UPLOAD_SECONDS = 30.0  # how often a point's train.log on GCS is rewritten


def _run_logged(command: Sequence[str], log_path: str, env: Mapping[str, str]) -> int:
  """Runs `command`, appending its output to `log_path` (local or gs://); -> its exit status."""
  log = fs.AppendFile(log_path, upload_every=LOG_UPLOAD_SECONDS)
  try:
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          env=env) as proc:
      for line in proc.stdout:
        log.write(line)
      return proc.wait()
  finally:
    log.close()


def run_local(runs: Sequence[PointRun], config_path: str, parallel: int = 1,
              env: Mapping[str, str] | None = None) -> None:
  """Trains the unfinished points, `parallel` at a time, each logging to WORKDIR/train.log (on GCS: uploaded
  every `LOG_UPLOAD_SECONDS` and at the end), in the environment `env` (default: this process's)."""
  todo = [run for run in runs if run.status == "pending"]
  if not todo:
    return

  # Points share compiled programs where theirs match (e.g. seeds, sampling settings): a persistent
  # compilation cache in the sweep's directory, unless the environment names one.
  env = dict(os.environ if env is None else env)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", fs.join(str(fs.as_path(todo[0].workdir).parent), COMPILE_CACHE))

  def execute(run: PointRun) -> PointRun:
    _start(run, config_path)
    started = time.perf_counter()
    code = _run_logged(run.command, fs.join(run.workdir, LOG_FILE), env)
    took = time.perf_counter() - started
    run.status = f"done in {took:.0f}s" if code == 0 else f"failed (exit {code}), see {run.point.name}/{LOG_FILE}"
    return run

  with Progress(len(todo), desc="sweep", unit="point") as progress:
    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
      for finished, run in enumerate(pool.map(execute, todo), start=1):
        progress.update(finished, {"last": run.point.name, "status": run.status})


def run_commands(runs: Sequence[PointRun], config_path: str) -> None:
  """Runs each unfinished point's (pod launch) command in turn, here; its output goes to this terminal."""
  for run in runs:
    if run.status not in ("pending", UNREADABLE):
      continue
    _start(run, config_path)
    print("$ " + shlex.join(run.command), flush=True)
    code = subprocess.run(run.command, check=False).returncode
    run.status = "launched" if code == 0 else f"launch failed (exit {code})"


def _final_metrics(workdir: str) -> dict[str, Any]:
  """The last logged step and loss of the FlowAR stage, and the numbers in report.json."""
  out: dict[str, Any] = {}
  metrics = epath.Path(workdir) / "metrics.jsonl"
  if _exists(metrics):
    for record in read_metrics(str(metrics)):
      if "loss" in record:
        out["step"], out["loss"] = record["step"], record["loss"]
  report = epath.Path(workdir) / REPORT_FILE
  if _exists(report):
    out.update({k: v for k, v in json.loads(report.read_text()).items() if isinstance(v, (int, float))})
  return out


def summarize(runs: Sequence[PointRun]) -> list[dict[str, Any]]:
  """One row per point: name, its own values, status, and its final step, loss and report numbers."""
  rows = []
  for run in runs:
    status = run.status
    if status == "pending" and run.readable and _exists(epath.Path(run.workdir) / "checkpoints"):
      status = "incomplete"
    values = ", ".join(f"{k}={v}" for k, v in run.point.values.items())
    metrics = _final_metrics(run.workdir) if run.readable else {}
    rows.append({"point": run.point.name, "overrides": values, "status": status, **metrics})
  return rows


def _cell(value: Any) -> str:
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.4g}"
  return "" if value is None else str(value)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table (readable as plain text too) with a column for every key any row has."""
  columns = list(dict.fromkeys(key for row in rows for key in row))
  cells = [[_cell(row.get(c)) for c in columns] for row in rows]
  widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
  return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def write_summary(root: str, rows: Sequence[Mapping[str, Any]], readable: bool = True) -> str:
  """Writes ROOT/summary.md and ROOT/summary.json; returns the table. Where ROOT is not `readable` from
  here, it only returns the table, with a line saying so."""
  table = format_table(rows)
  if not readable:
    return table + f"\n(not written to {root}: its file system is unreadable from here)"
  directory = epath.Path(root)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "summary.md").write_text(table + "\n")
  (directory / "summary.json").write_text(json.dumps(list(rows), indent=1))
  return table
