"""The command line as a user runs it: `python -m flowar_jax COMMAND ...` in a subprocess."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def cli(*args, check_ok=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", "flowar_jax", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  if check_ok:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_summary_prints_flowar_s_size():
  out = cli("summary", "--config", "configs/flowar_s.py").stdout
  assert "total_params 171718072 (171.72M)" in out
  assert "backbone.encoder_blocks" in out and "flownet.res_blocks" in out


ABSL_OWN_FLAGS = ("logtostderr", "only_check_args", "pdb_post_mortem")  # absl's own, in its full help


def _assert_lists_commands(text: str):
  from flowar_jax.cli import COMMANDS  # pylint: disable=g-import-not-at-top
  flat = " ".join(text.split())
  for name, command in COMMANDS.items():
    assert f"\n  {name}  " in text and f"{name} {command.summary}" in flat, name
  assert "USAGE:" not in text and not any(flag in text for flag in ABSL_OWN_FLAGS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_commands(flag):
  proc = cli(flag)
  _assert_lists_commands(proc.stdout)
  assert "COMMAND --help" in proc.stdout


def test_no_command_lists_the_commands_and_exits_2():
  proc = cli(check_ok=False)
  assert proc.returncode == 2 and proc.stdout == ""
  _assert_lists_commands(proc.stderr)


def test_every_flag_of_the_cli_belongs_to_a_command():
  """A flag no command lists would be missing from every --help (and never checked against the command)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from flowar_jax import cli as cli_module  # pylint: disable=g-import-not-at-top
  defined = {flag.name for flag in flags.FLAGS.flags_by_module_dict()[cli_module.__name__]} - {"verbose"}
  listed = {name for command in cli_module.COMMANDS.values() for name in command.flags}
  assert defined and defined == listed


@pytest.mark.parametrize("command", ["train", "sample", "evaluate", "summary", "convert", "compile"])
def test_command_help_lists_its_own_flags(command):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from flowar_jax.cli import COMMANDS  # pylint: disable=g-import-not-at-top
  out = cli(command, "--help").stdout
  assert out.startswith(f"usage: python -m flowar_jax {command} ")
  ours = COMMANDS[command].flags
  for name in ours:
    assert f"--{name} " in out or f"--[no]{name} " in out, name
    first_words = " ".join(re.sub(r"^<[^>]*>: ", "", flags.FLAGS[name].help).split()[:3])  # no enum prefix
    assert first_words in " ".join(out.split()) or name in COMMANDS[command].notes, name
  others = {name for c in COMMANDS.values() for name in c.flags} - set(ours)
  assert not any(f"--{name} " in out or f"--[no]{name} " in out for name in others)
  assert "--config.KEY=VALUE" in out and "--config.batch_size=256" in out and "flowar_jax/config.py" in out
  assert "--verbose" in out
  assert "USAGE:" not in out and not any(flag in out for flag in ABSL_OWN_FLAGS)


def test_command_help_shows_defaults_and_comes_after_other_flags():
  out = " ".join(cli("sample", "--workdir", "runs/x", "--num_steps", "3", "-h").stdout.split())
  assert "--seed INT sample i draws its noise from (seed, i) (default: 0)" in out
  assert "--solver {euler|heun} ODE solver (default: config.sampling.solver)" in out
  assert "--workdir DIR (required)" in out


def test_helpfull_adds_every_flag():
  out = cli("summary", "--helpfull").stdout
  assert out.startswith("usage: python -m flowar_jax summary") and all(flag in out for flag in ABSL_OWN_FLAGS)


@pytest.mark.parametrize("args,message", [
    (["sampel"], "unknown command 'sampel'; did you mean 'sample'?"),
    (["evalute", "--help"], "unknown command 'evalute'; did you mean 'evaluate'?"),
    (["xyz"], "unknown command 'xyz'; the commands are train, sample, evaluate, edit, summary, convert, compile, serve"),
    (["summary", "extra", "--config", "configs/digits.py"], "unexpected argument 'extra'"),
    (["summary"], "--config is required"),
    (["train", "--config", "configs/digits.py", "--workdir", "runs/x", "--seed", "3"],
     "--seed does not apply to train (it is a flag of sample, evaluate, edit)"),
    (["sample", "--workdir", "runs/x", "--config.sampling.num_steps=3"],
     "--config.sampling.num_steps overrides a key of the --config file, and no --config is given"),
])
def test_command_line_mistakes_are_one_line(args, message):
  proc = cli(*args, check_ok=False)
  assert proc.returncode == 2 and proc.stdout == "", proc.stderr
  assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_unknown_config_key_fails_loudly(tmp_path):
  proc = cli("train", "--config", "configs/digits.py", "--config.model.widht=3", "--workdir", str(tmp_path),
             check_ok=False)
  assert proc.returncode != 0 and "widht" in proc.stderr


def _flowar_only_workdir(workdir: str, **model) -> None:
  """A FlowAR checkpoint of configs/digits.py (zeros, `model` overrides applied) with no VAE, as `convert`
  without --vae_torch leaves it; written without compiling anything."""
  import functools  # pylint: disable=g-import-not-at-top
  import runpy  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.params import split_params  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.registry import build_model  # pylint: disable=g-import-not-at-top
  from flowar_jax.runs.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  config = runpy.run_path(os.path.join(ROOT, "configs", "digits.py"))["get_config"]()
  config.model.update(model)
  _, abstract = split_params(nnx.eval_shape(functools.partial(build_model, config)))
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  with Checkpointer(os.path.join(workdir, "checkpoints"), keep=None, async_save=False) as checkpointer:
    checkpointer.save(0, {"step": np.asarray(0, np.int32), "params": params, "ema_params": params}, config=config)


@pytest.fixture(scope="module")
def flowar_only(tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp("flowar_only"))
  _flowar_only_workdir(workdir, num_classes=5)
  return workdir


@pytest.mark.parametrize("case", ["no_checkpoint", "no_config_file", "other_model", "no_vae"])
def test_path_errors_are_one_line_naming_the_fix(case, tmp_path, request):
  """Each stops before anything is compiled, with exit code 2 and one line naming the problem and the fix."""
  if case == "no_checkpoint":
    checkpoints = os.path.join(str(tmp_path), "checkpoints")
    args, expected = ["sample", "--workdir", str(tmp_path)], [f"no model checkpoint in {checkpoints!r}",
                                                              "train one", "convert"]
  elif case == "no_config_file":
    args = ["train", "--config", "configs/digit.py", "--workdir", str(tmp_path), "--config.batch_size=8"]
    expected = ["config file 'configs/digit.py' does not exist", "--config configs/digits.py"]
  else:
    workdir = request.getfixturevalue("flowar_only")
    if case == "other_model":  # the checkpoint has 5 classes, configs/digits.py 10
      args = ["sample", "--workdir", workdir, "--config", "configs/digits.py"]
      expected = ["does not match", "class_emb", "was the model config changed?"]
    else:  # the config stored with the checkpoint
      args, expected = ["sample", "--workdir", workdir], ["no VAE checkpoint found", "--config.vae_checkpoint"]
  proc = cli(*args, check_ok=False)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
  assert all(text in proc.stderr for text in expected), proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", [["-v"], ["-v", "0"]])  # a bare -v means --verbose
def test_verbose_adds_the_traceback(flag, tmp_path):
  proc = cli("sample", "--workdir", str(tmp_path), *flag, check_ok=False)
  assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("flowar-jax sample: error: no model checkpoint")


def test_missing_vae_checkpoint_is_named(tmp_path):
  proc = cli("train", "--config", "configs/digits.py", "--config.stage=flowar", "--workdir", str(tmp_path),
             check_ok=False)
  assert proc.returncode == 2 and "no VAE checkpoint found" in proc.stderr and str(tmp_path) in proc.stderr


def test_empty_image_folder_is_named(tmp_path):
  empty = tmp_path / "images"
  empty.mkdir()
  proc = cli("train", "--config", "configs/digits.py", "--config.data.name=image_folder",
             f"--config.data.data_dir={empty}", "--workdir", str(tmp_path / "run"), check_ok=False)
  assert proc.returncode == 2 and str(empty) in proc.stderr


@pytest.mark.parametrize("flags,message", [(["--num_steps", "0"], "num_steps"), (["--cfg", "-1"], "cfg"),
                                           (["--labels", "3,12"], "class label 12 is out of range"),
                                           (["--labels", "x"], "--labels")])
def test_sample_rejects_impossible_arguments(trained, flags, message):
  _, workdir, _ = trained
  proc = cli("sample", "--workdir", workdir, "--num_samples", "2", *flags, check_ok=False)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_sample_writes_npz_and_grid(trained, tmp_path):
  _, workdir, _ = trained
  import shutil
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run)
  cli("sample", "--workdir", run, "--num_samples", "5", "--labels", "3,5", "--seed", "1", "--cfg", "2",
      "--num_steps", "2", "--batch_size", "2")
  with np.load(os.path.join(run, "samples", "samples.npz")) as f:
    assert f["images"].shape == (5, 16, 16, 3) and f["images"].dtype == np.uint8
    np.testing.assert_array_equal(f["labels"], [3, 5, 3, 5, 3])
  assert os.path.exists(os.path.join(run, "samples", "grid.png"))


def test_console_script_runs():
  script = os.path.join(os.path.dirname(sys.executable), "flowar-jax")
  if not os.path.exists(script):
    pytest.skip("flowar_jax is not pip-installed in this interpreter's environment (no flowar-jax script)")
  proc = subprocess.run([script, "summary", "--config", "configs/digits.py"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0 and "total_params" in proc.stdout
