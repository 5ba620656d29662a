"""The command line: bad keys and values are rejected by name; train -> eval -> export works end to end."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_in_process import run as run_in_process
from flax import traverse_util

import hydra_jax as hydra_jax_lib
from hydra_jax import checkpoints
from hydra_jax import export
from hydra_jax import models
from hydra_jax import pipeline
from tests import cli_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hydra_jax(*args, check=True, env=None, python_code=None):
  """Runs the CLI (or `python -c python_code ARGS`) in a fresh single-device process."""
  env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **(env or {})}
  command = ["-c", python_code] if python_code else ["-m", "hydra_jax"]
  result = subprocess.run(
    [sys.executable, *command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  if check and result.returncode:
    raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
  return result


DEMO = os.path.join(ROOT, "configs", "digits_demo.py")
TRAIN = ["train", "--config", DEMO, "--config.stage=pretrain", "--workdir", "run"]
NO_RUN = ["--workdir", "no_run"]  # eval / export / certify: their flags are checked before the run is looked for
# Bad input as a new user gives it -> (exit status, text of the one stderr line). Workdirs and outputs are
# relative to the test's empty working directory, which must stay as it was.
BAD_INPUT = [
  (["trian"], 2, "hydra-jax: 'trian' is not a command; did you mean 'train'? (commands: train, eval, export, certify"),
  (["fit"], 2, "hydra-jax: 'fit' is not a command (commands: train, eval, export, certify"),
  (["train", "--config", "empty.py", "--workdir", "run"], 1, "config file empty.py must define get_config(arg=None)"),
  (["train", "--config", "syntax.py", "--workdir", "run"], 1, "config file syntax.py:3: "),
  (["train", "--config", "nosuch.py:model=cnn_tiny", "--workdir", "run"], 1, "config file nosuch.py does not exist"),
  (["train", "--config", "nosuch.py", "--config.k=0.5", "--workdir", "run"], 1, "config file nosuch.py does not exist"),
  (
    ["train", "--config", f"{DEMO}:modle=cnn_small", "--workdir", "run"],
    1,
    f"config file {DEMO}: config argument 'modle=cnn_small' is not NAME=VALUE with NAME one of model, objective "
    "(did you mean model?)",
  ),
  (
    ["train", "--config", os.path.join(ROOT, "configs", "adversarial.py:model=nope"), "--workdir", "run"],
    1,
    "configs/adversarial.py: config.model.name: Unknown model 'nope'; valid names: ResNet18,",
  ),
  ([*TRAIN, "--config.stages.pretrain.lr=inf"], 1, "config.stages.pretrain.lr=inf is not a finite number"),
  ([*TRAIN, "--config.eval.eps=nan"], 1, "config.eval.eps=nan is not a finite number"),
  (
    [*TRAIN, "--config.optimiser.lr=0.1"],
    1,
    "--config.optimiser.lr: the config has no key 'optimiser' (Did you mean \"optimizer\"",
  ),
  ([*TRAIN, "--config.some.key=1"], 1, "--config.some.key: the config has no key 'some'"),
  ([*TRAIN, "--config.k=abc"], 1, "flag --config.k=abc: could not convert string to float: 'abc'"),
  ([*TRAIN, "--config.k=2.0"], 1, "config.k=2.0 must lie in (0, 1]"),
  ([*TRAIN, "--config.k=0"], 1, "config.k=0.0 must lie in (0, 1]"),
  ([*TRAIN, "--config.model.name=resnet9"], 1, "config.model.name: Unknown model 'resnet9'"),
  ([*TRAIN, "--config.data.name=nope"], 1, "config.data.name: Unknown dataset 'nope'"),
  ([*TRAIN, "--config.objective.name=nope"], 1, "config.objective.name: unknown objective 'nope'"),
  ([*TRAIN, "--config.eval.methods=('nope',)"], 1, "config.eval.methods: unknown evaluation method 'nope'"),
  ([*TRAIN, "--config.objective.attack_chunk_size=-1"], 1, "config.objective.attack_chunk_size must be >= 0"),
  (
    [*TRAIN, "--config.data.name=cifar10", "--config.data.image_size=0", "--config.data.data_dir=/nonexistent"],
    1,
    "data_dir='/nonexistent' is not a folder",
  ),
  ([*TRAIN, "--config.data.name=cifar10"], 1, "image_size 16 of 'cifar10' must be a positive"),
  (
    [*TRAIN, "--config.data.name=cifar10", "--config.data.image_size=0"],
    1,
    "TFDS dataset 'cifar10' (split 'train') is not prepared in ArrayRecord format",
  ),
  (
    [*TRAIN, "--config.eval.methods=('smooth',)", "--config.eval.smooth.sigma=-0.5"],
    1,
    "config.eval: smoothing: sigma=-0.5 must be positive",
  ),
  (["train", "--config", DEMO], 1, "--workdir is required (see hydra-jax train --help)"),
  (["train", "--workdir", "run"], 1, "--config and --workdir are required"),
  (
    [*TRAIN[:-1], "xyz://bucket/run"],  # no local folder 'xyz:' appears
    1,
    "xyz://bucket/run: unknown URL scheme 'xyz://'; hydra_jax reads and writes local paths and gs:// URLs",
  ),
  ([*TRAIN[:-1], "a_file"], 1, "a_file is a file; give a directory"),
  ([*TRAIN[:-1], "a_file/run"], 1, "a_file/run: "),  # ... {cwd}/a_file is a file, not a directory
  (["eval", *NO_RUN], 1, "no checkpoint directory at no_run"),
  (["eval", "--config", DEMO, *NO_RUN, "--methods=pgd_linf,fgsm"], 1, "unknown evaluation method 'fgsm'; valid"),
  (["eval", *NO_RUN, "--per_example=x.json"], 1, "per-example file 'x.json' must end in .npz or .csv"),
  (["eval", *NO_RUN, "--curve=curve.pdf"], 1, "security curve 'curve.pdf' must end in .png"),
  (["eval", "--config", DEMO, "--config.eval.eps=nan", *NO_RUN], 1, "config.eval.eps=nan is not a finite number"),
  (["export", *NO_RUN], 1, "export needs --out FILE (.npz or .pth)"),
  (["export", *NO_RUN, "--out", "x.bin"], 1, "export file 'x.bin' must end in .npz, .pth or .pt"),
  (["export", *NO_RUN, "--compact", "--out", "x.pth"], 1, "compact export file 'x.pth' must end in .npz"),
  (["export", *NO_RUN, "--out", "a_folder.npz"], 1, "a_folder.npz is a directory; give a file"),
  (["certify", *NO_RUN, "--out", "a_file"], 1, "a_file is a file; give a directory"),
]


def tree(root):
  """Every path under `root`, relative to it."""
  return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files}


def assert_one_line_each(cases, results, cwd, before):
  """Each result: the case's exit status and one stderr line, 'hydra-jax COMMAND: error: ...' holding its text."""
  wrong = []
  for (argv, code, text), result in zip(cases, results, strict=True):
    lines = result.stderr.splitlines()
    start = f"hydra-jax {argv[0]}: error: " if code == 1 else "hydra-jax: "
    if not (result.returncode == code and len(lines) == 1 and lines[0].startswith(start) and text in lines[0]):
      wrong.append(f"{argv}: exit {result.returncode}, {len(lines)} lines: {result.stderr[-300:]}")
  assert not wrong, "\n".join(wrong)
  assert tree(cwd) == before  # nothing new, and nothing gone


def test_bad_input_is_one_line_naming_it_before_any_work_and_creates_nothing(tmp_path):
  (tmp_path / "empty.py").write_text("")
  (tmp_path / "syntax.py").write_text("from hydra_jax import config\n\nconfig.k = = 1\n")
  (tmp_path / "a_file").write_text("")
  (tmp_path / "a_folder.npz").mkdir()
  before = tree(tmp_path)
  shown = ([*TRAIN, "--config.k=2.0"], {"HYDRA_JAX_TRACEBACK": "1"})
  *results, traceback, bare, helped = cli_processes.run(
    [argv for argv, _, _ in BAD_INPUT] + [shown, [], ["--help"]], tmp_path
  )
  assert_one_line_each(BAD_INPUT, results, tmp_path, before)
  usage = "usage: hydra-jax {train,eval,export,certify} --config FILE[:ARG] --workdir DIR [flags]\n"
  assert bare.returncode == 2 and bare.stderr.startswith(usage) and not bare.stdout  # no command: the usage
  assert helped.returncode == 0 and helped.stdout.startswith(usage) and not helped.stderr
  stderr = lambda argv: results[[case[0] for case in BAD_INPUT].index(argv)].stderr.strip()
  assert stderr(["train", "--config", "syntax.py", "--workdir", "run"]).endswith("config.k = = 1")  # the line
  assert stderr([*TRAIN[:-1], "a_file/run"]).endswith(f"{tmp_path}/a_file is a file, not a directory")
  assert traceback.returncode == 1 and "Traceback" in traceback.stderr and "config.k=2.0 must lie" in traceback.stderr


def without_root_override():
  """The command prefix that makes this process's children respect file modes (root's CAP_DAC_OVERRIDE
  dropped), () when it is not root, None when it cannot."""
  if os.geteuid() != 0:
    return ()
  setpriv = shutil.which("setpriv")
  return (setpriv, "--bounding-set=-dac_override,-dac_read_search") if setpriv else None


def test_a_read_only_workdir_or_output_is_one_line_before_any_work(tmp_path):
  prefix = without_root_override()
  if prefix is None:
    pytest.skip("root without setpriv: read-only modes cannot be made to hold")
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  (read_only / "old.npz").write_text("")
  (tmp_path / "kept.npz").write_text("")
  (tmp_path / "kept.npz").chmod(0o444)
  read_only.chmod(0o555)
  cases = [
    ([*TRAIN[:-1], "read_only/run"], 1, "read_only/run: "),
    (["export", *NO_RUN, "--out", "read_only/x.npz"], 1, "read_only/x.npz: "),
    (["export", *NO_RUN, "--out", "read_only/old.npz"], 1, "read_only/old.npz: "),
    (["export", *NO_RUN, "--out", "kept.npz"], 1, "kept.npz: "),
    (["eval", *NO_RUN, "--per_example", "read_only/x.csv"], 1, "read_only/x.csv: "),
    (["certify", *NO_RUN, "--out", "read_only/certify"], 1, "read_only/certify: "),
  ]
  before = tree(tmp_path)
  try:
    results = cli_processes.run([argv for argv, _, _ in cases], tmp_path, prefix=prefix)
  finally:
    read_only.chmod(0o755)
  assert_one_line_each(cases, results, tmp_path, before)
  for result in results:
    assert result.stderr.strip().endswith("is not writable (permission denied or a read-only file system)"), result


# Four command-line processes (about 50 s of CPU). The default run covers each command: train against the library
# (test_the_command_line_and_the_library_give_the_same_run), eval (tests/test_channels.py's compact eval, by the
# command line), export (tests/test_export.py), and their one-line errors (above).
@pytest.mark.slow
def test_train_eval_export_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  tiny = [
    "--config",
    "configs/digits_demo.py:model=cnn_tiny",
    "--config.stage=pretrain",
    "--config.data.image_size=8",
    "--config.stages.pretrain.epochs=1",
    "--config.eval.steps=1",
    "--config.log.progress=false",
    "--workdir",
    workdir,
  ]
  summary = json.loads(hydra_jax("train", *tiny).stdout)
  assert summary["stage"] == "pretrain" and summary["step"] == summary["total_steps"] == 1437 // 64

  results = json.loads(hydra_jax("eval", *tiny, "--methods=pgd_linf").stdout)
  assert results["num_examples"] == 360
  assert 0 <= results["robust"] <= results["pgd_linf"] <= results["clean"] <= 1
  assert abs(results["clean"] - summary["clean"]) < 1e-6  # same model, same test split

  # Prune one step from that run, then export it: the file must hold the checkpoint's weights, masked.
  prune_dir = str(tmp_path / "prune")
  prune = [
    *tiny[:-1],
    prune_dir,
    "--config.stage=prune",
    f"--config.source={workdir}",
    "--config.k=0.1",
    "--config.stop_after_steps=1",
    "--config.objective.name=benign",
  ]
  assert json.loads(hydra_jax("train", *prune).stdout)["step"] == 1
  out = str(tmp_path / "model.npz")
  assert "wrote" in hydra_jax("export", *prune, f"--out={out}").stdout
  arrays = dict(np.load(out))
  trained, scores = restore_model(prune_dir)
  assert set(arrays) == {f"params/{name}" for name in trained}  # every variable, no scores (dense export)
  for name, weight in trained.items():
    exported = arrays[f"params/{name}"]
    if name not in scores:  # biases: as trained
      np.testing.assert_array_equal(exported, weight)
      continue
    kept = numpy_topk_mask(scores[name], 0.1).astype(bool)
    assert kept.sum() == weight.size - int(0.9 * weight.size)
    np.testing.assert_array_equal(exported[kept], weight[kept])  # kept entries: the trained weights
    assert np.all(exported[~kept] == 0) and not np.any(np.signbit(exported[~kept]))  # pruned: exactly +0.0
    assert np.count_nonzero(exported) == np.count_nonzero(weight[kept])


def test_an_internal_key_error_keeps_its_traceback(tmp_path):
  code = (
    "import sys\nfrom hydra_jax import cli, pipeline\n"
    "pipeline.train_and_evaluate = lambda config, workdir: {}['internal']\n"
    "cli.main(['hydra-jax', 'train', '--config', 'configs/digits_demo.py', '--workdir', sys.argv[1]])"
  )
  result = hydra_jax(str(tmp_path / "run"), check=False, python_code=code)
  assert result.returncode != 0 and "Traceback" in result.stderr and "KeyError: 'internal'" in result.stderr


def test_a_method_the_model_does_not_support_is_one_line(tmp_path, monkeypatch):
  # bounds raises NotImplementedError naming an operation it has no sound rule for (e.g. a while loop on x): the
  # user asked for a method the model does not support, which is not a bug of ours.
  message = "bounds: no rule for primitive 'while' with an x-dependent operand"

  def unsupported(*args, **kwargs):
    raise NotImplementedError(message)

  monkeypatch.setattr(export, "evaluate_checkpoint", unsupported)
  status, out, err = run_in_process(
    "eval", "--config", os.path.join(ROOT, "configs", "digits_demo.py"), "--workdir", str(tmp_path), "--methods=ibp"
  )
  assert status == 1 and "Traceback" not in err
  assert [line for line in err.splitlines() if line.startswith("hydra-jax eval")] == [
    f"hydra-jax eval: error: {message}"
  ]


def hydra_jax_in_process(*args):
  """Runs the CLI's `main` in this process, as the console script does; asserts exit 0."""
  status, _, err = run_in_process(*args)
  assert status == 0, err


def test_the_command_line_and_the_library_give_the_same_run(tmp_path):
  """The CLI only parses and calls the library: in one process (so one set of compiled programs, which makes equal
  inputs give equal bits), its run equals the library's, although the library call happens under the other PRNG
  flavour (the library decides it for the run)."""
  overrides = {
    "stage": "pretrain",
    "stop_after_steps": 2,
    "parallel.mode": "single",
    "log.progress": False,
    "checkpoint.async_save": False,
  }
  spec = os.path.join(ROOT, "configs/digits_demo.py") + ":model=cnn_tiny,objective=benign"
  cli_dir, library_dir = str(tmp_path / "cli"), str(tmp_path / "library")
  flags_ = [f"--config.{key}={str(value).lower()}" for key, value in overrides.items()]
  hydra_jax_in_process("train", "--config", spec, *flags_, "--workdir", cli_dir)
  config = hydra_jax_lib.load_config(spec)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    (config[parents[0]] if parents else config)[leaf] = value
  with open(os.path.join(cli_dir, "config.json")) as f:
    assert json.load(f) == json.loads(config.to_json_best_effort())  # load_config + overrides = the CLI's config
  with jax.threefry_partitionable(True):  # a notebook's JAX default; the library decides for the run
    pipeline.train_and_evaluate(config, library_dir)
  from_cli, from_library = export.load_run(cli_dir, config=config), export.load_run(library_dir, config=config)
  assert from_cli.meta["threefry_partitionable"] is False
  for a, b in zip(jax.tree.leaves(from_cli.trained_params), jax.tree.leaves(from_library.trained_params)):
    np.testing.assert_array_equal(a, b)


def numpy_topk_mask(scores, k):
  """The reference's GetSubnet in numpy: stable ascending sort of |s|, the first int((1 - k) n) get 0."""
  flat = np.abs(scores).ravel()
  mask = np.ones(flat.size)
  mask[np.argsort(flat, kind="stable")[: int((1 - k) * flat.size)]] = 0
  return mask.reshape(scores.shape)


def restore_model(workdir):
  """({'0/kernel': array, ...} of the trained params, {'0/kernel': scores} of the prunable kernels), read from
  the latest checkpoint with orbax directly (cnn_tiny on 8x8x1 digits)."""
  params = jax.eval_shape(
    lambda: models.get_model("cnn_tiny", 10).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  )["params"]
  scores = jax.tree_util.tree_map_with_path(lambda p, w: w if p[-1].key == "kernel" else None, params)
  items, _ = checkpoints.restore(workdir, {"model": {"params": params, "batch_stats": {}, "scores": scores}})
  flat = lambda tree: {"/".join(p): np.asarray(v) for p, v in traverse_util.flatten_dict(tree).items() if v is not None}
  return flat(items["model"]["params"]), flat(items["model"]["scores"])


@pytest.mark.parametrize(
  "command, own, foreign, says",
  [
    (
      "train",
      ["--config", "--workdir"],
      ["--methods", "--out", "--sigma", "--per_example", "--curve"],
      "created or resumed",
    ),
    (
      "eval",
      ["--config", "--workdir", "--methods", "--per_example", "--curve", "--curve_runs"],
      ["--out", "--sigma", "--dense"],
      "worst case",
    ),
    ("export", ["--config", "--workdir", "--out", "--dense"], ["--methods", "--sigma", "--per_example"], ".pth"),
    (
      "certify",
      ["--config", "--workdir", "--out", "--sigma", "--n0", "--n", "--alpha"],
      ["--methods"],
      "Output directory",
    ),
  ],
)
def test_help_lists_the_commands_own_flags_and_the_config_syntax(command, own, foreign, says):
  from hydra_jax import cli  # pylint: disable=g-import-not-at-top  (defines absl flags)

  text = cli.command_help(command)
  assert text.startswith(f"usage: hydra-jax {command} ") and "--config FILE[:ARG]" in text.splitlines()[0], text
  flag_lines = [line.split()[0] for line in text.split("config:\n")[0].splitlines() if line.startswith("  --")]
  assert set(own) <= set(flag_lines) and not set(foreign) & set(flag_lines), flag_lines
  assert says in text
  assert "--config.KEY=VALUE" in text and "get_config(ARG)" in text and "docs/configuration.md" in text


def test_help_is_the_commands_own_from_the_command_line():
  from hydra_jax import cli  # pylint: disable=g-import-not-at-top

  result = hydra_jax("eval", "--workdir", "x", "--help")
  assert result.stdout.strip() == cli.command_help("eval") and "Try --helpfull" not in result.stdout
