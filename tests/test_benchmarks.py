"""The hydra_jax-vs-PyTorch benchmark runs at toy size and gives a well-formed table and JSON (no timing asserted)."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import bench_vs_torch  # noqa: E402  (needs torch)
from benchmarks import torch_hydra  # noqa: E402
from hydra_jax import masking  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  path = tmp_path_factory.mktemp("bench") / "result.json"
  result = bench_vs_torch.main(["--tiny", "--workloads", "prune,topk,bounds,smoothing", "--json", str(path)])
  return result, path


# The tiny run of four workloads on both sides takes about 40 CPU s: slow. The default run times the attack and input
# workloads below.
@pytest.mark.slow
def test_tiny_run_reports_every_requested_workload(tiny_run, capsys):
  result, _ = tiny_run
  assert [(r["workload"], r["model"]) for r in result["rows"]] == [
    ("prune", "resnet_tiny"),
    ("topk", "n=1e+03"),
    ("topk", "n=1e+04"),
    ("bounds", "cnn_tiny"),
    ("bounds", "cnn_tiny"),
    ("bounds", "cnn_tiny"),
    ("smoothing", "resnet_tiny"),
  ]
  prune = result["rows"][0]
  assert prune["batch"] == 4 and prune["note"] == "prune TRADES-1 k=0.01"
  assert prune["speedup"] == pytest.approx(prune["torch_s"] / prune["jax_s"])
  assert prune["jax_img_s"] == pytest.approx(4 / prune["jax_s"])
  for key in ("jax_s", "torch_s", "compile_s", "jax_gflop_s", "matmul_gflop_s", "mask_s", "jax_plan_mb"):
    assert prune[key] > 0, key
  assert prune["roofline_pct"] == pytest.approx(100 * prune["jax_gflop_s"] / prune["matmul_gflop_s"])
  forward, ibp, crown = result["rows"][3:6]
  assert [row["note"] for row in (forward, ibp, crown)] == [f"{m}, eps 2/255" for m in ("forward", "ibp", "crown_ibp")]
  assert forward["jax_x_forward"] == forward["torch_x_forward"] == 1.0
  for row in (ibp, crown):
    assert row["jax_x_forward"] == pytest.approx(row["jax_s"] / forward["jax_s"])
    assert row["torch_x_forward"] == pytest.approx(row["torch_s"] / forward["torch_s"])
  noise = result["rows"][6]
  assert noise["batch"] == 4 and noise["jax_img_s"] == pytest.approx(4 / noise["jax_s"]) and noise["torch_s"] > 0
  assert result["machine"]["device"].startswith("cpu")


@pytest.mark.slow
def test_json_holds_the_returned_rows(tiny_run):
  result, path = tiny_run
  with open(path) as f:
    written = json.load(f)
  assert written["rows"] == json.loads(json.dumps(result["rows"]))
  assert written["args"]["batch"] == 4 and written["args"]["workloads"] == ["prune", "topk", "bounds", "smoothing"]


def test_table_has_a_header_and_aligned_rows():
  rows = [
    {
      "workload": "prune",
      "model": "resnet18",
      "batch": 128,
      "jax_s": 12.5,
      "torch_s": 30.0,
      "speedup": 2.4,
      "note": "x",
    },
    {"workload": "bounds", "model": "-", "note": "skipped: later"},
  ]
  lines = bench_vs_torch.format_table(rows).splitlines()
  assert lines[0].split()[:6] == ["workload", "model", "batch", "jax_s", "torch_s", "speedup"]
  assert lines[1].split()[:6] == ["prune", "resnet18", "128", "12.5000", "30.0000", "2.40x"]
  assert lines[2].split() == ["bounds", "-", "skipped:", "later"]
  assert lines[1].index("12.5000") + len("12.5000") == lines[0].index("jax_s") + len("jax_s")  # right-aligned


def test_torch_sample_noise_counts_every_sample_of_a_constant_model():
  net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
  with torch.no_grad():
    net[1].weight.zero_()
    net[1].bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
  counts = torch_hydra.sample_noise(net, torch.zeros(3, 2, 2), num=10, batch_size=4, num_classes=3)
  np.testing.assert_array_equal(counts, [0, 10, 0])  # chunks of 4, 4, 2: every sample counted once


def test_unknown_workload_is_rejected():
  with pytest.raises(SystemExit):
    bench_vs_torch.parse_args(["--workloads", "prune,everything"])


def test_reference_getsubnet_gives_our_masks():
  scores = np.random.default_rng(0).normal(size=(3, 3, 8, 16)).astype(np.float32)
  for k in (0.5, 0.1, 0.01):
    theirs = torch_hydra.GetSubnet.apply(torch.from_numpy(np.abs(scores)), k).numpy()
    np.testing.assert_array_equal(theirs, masking.topk_mask(jax.numpy.asarray(scores), k))


@pytest.mark.parametrize("name, prunable", [("resnet18", 11_164_352), ("wrn_28_4", 5_841_840)])
def test_torch_baseline_has_the_zoo_architecture(name, prunable):
  net = torch_hydra.build(name)
  scores = {n: p.numel() for n, p in net.named_parameters() if n.endswith("popup_scores")}
  used = sum(v for n, v in scores.items() if not n.startswith("sub_block1"))
  assert used == prunable  # docs/models.md's prunable-weight counts of the JAX zoo
  torch_hydra.prepare(net, "prune", 0.01)
  trainable = {n for n, p in net.named_parameters() if p.requires_grad}
  assert trainable and all(
    n.endswith(("popup_scores", "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", ".1.weight", ".1.bias"))
    for n in trainable
  )
  with torch.no_grad():
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_compare_xla_conv_times_the_step_with_xla_kernel_gradients_too():
  row = bench_vs_torch.main(["--tiny", "--workloads", "finetune", "--compare-xla-conv"])["rows"][0]
  assert row["workload"] == "finetune" and row["jax_xla_conv_s"] > 0 and row["jax_xla_conv_peak_mb"] >= 0


@pytest.mark.slow  # 20 CPU s; the default run times the other workloads
def test_compare_whole_batch_attack_times_the_attack_unchunked_too():
  row = bench_vs_torch.main(
    ["--tiny", "--workloads", "pgd", "--attack-chunk-size", "2", "--compare-whole-batch-attack"]
  )["rows"][0]
  assert row["workload"] == "pgd" and row["jax_whole_batch_s"] > 0 and row["jax_s"] > 0


@pytest.mark.slow
def test_memory_workload_measures_each_side_in_its_own_process():
  row = bench_vs_torch.main(["--tiny", "--workloads", "memory"])["rows"][0]
  assert (row["workload"], row["model"], row["batch"]) == ("memory", "resnet_tiny", 4)
  assert row["jax_s"] > 0 and row["torch_s"] > 0 and row["jax_plan_mb"] > 0
  for side in ("jax", "torch"):
    assert row[f"{side}_peak_mb"] >= 0 and row[f"{side}_base_mb"] > 0
    assert row[f"{side}_peak_rss_mb"] == pytest.approx(row[f"{side}_base_mb"] + row[f"{side}_peak_mb"])


def test_input_workload_times_both_recipes_on_the_same_jpegs():
  row = bench_vs_torch.main(["--tiny", "--workloads", "input"])["rows"][0]
  assert (row["workload"], row["model"], row["batch"]) == ("input", "imagenet_rrc", 4)
  assert row["jax_s"] > 0 and row["torch_s"] > 0
  assert row["jax_img_s"] == pytest.approx(4 / row["jax_s"]) and row["speedup"] == pytest.approx(
    row["torch_s"] / row["jax_s"]
  )
  # Per CPU second too; main() raised had the two sides' float32 outputs differed.
  assert row["jax_cpu_img_s"] > 0 and row["cpu_speedup"] == pytest.approx(row["jax_cpu_img_s"] / row["torch_cpu_img_s"])


@pytest.mark.slow
def test_autoattack_benchmark_runs_both_sides_at_tiny_size():
  """`python -m benchmarks.bench_autoattack --tiny` (about 2 CPU minutes): the export's logits match and both
  sides report every stage."""
  pytest.importorskip("torchattacks")
  from benchmarks import bench_autoattack

  (row,) = bench_autoattack.main(["--tiny"])
  assert row["logit_parity_max_abs"] < 1e-4
  assert set(row["hydra_jax"]) == set(row["torchattacks"]) == set(bench_autoattack.STAGES)


def test_autoattack_each_on_all_report_gives_ratios_and_paper_count_extrapolation():
  """`bench_autoattack`'s --each_on_all table from hand-made timings: the ratio, seconds per step (targets x
  iterations) and the extrapolation to the paper's counts (100, 9 x 100, 9 x 100, 5000)."""
  from benchmarks import bench_autoattack

  counts = dict(apgd_steps=10, fab_steps=5, square_queries=100, num_targets=2)
  seconds = dict(apgd_ce=2.0, apgd_t=8.0, fab_t=5.0, square=4.0)
  ours = {
    name: dict(robust=3, seconds=s, compile_s=1.0, flops=0, matmul_gflops=1.0, roofline=float("nan"))
    for name, s in seconds.items()
  }
  theirs = {name: dict(robust=4, seconds=3 * s) for name, s in seconds.items()}
  table = bench_autoattack._report_each(ours, theirs, counts, 8)["per_attack"]
  assert {name: row["steps"] for name, row in table.items()} == dict(apgd_ce=10, apgd_t=20, fab_t=10, square=100)
  assert all(row["speedup"] == pytest.approx(3.0) for row in table.values())
  assert table["apgd_t"]["hydra_jax_step_s"] == pytest.approx(8.0 / 20)
  assert table["apgd_t"]["hydra_jax_paper_s"] == pytest.approx(8.0 / 20 * 900)
  assert table["fab_t"]["torchattacks_paper_s"] == pytest.approx(15.0 / 10 * 900)
  assert table["square"]["hydra_jax_paper_s"] == pytest.approx(4.0 / 100 * 5000)
  assert table["apgd_ce"]["hydra_jax_paper_s"] == pytest.approx(2.0 / 10 * 100)


def test_autoattack_against_whole_batch_report_gives_the_median_speedup_and_compares_counts():
  from benchmarks import bench_autoattack

  robust = {"apgd_ce": 5, "square": 3}
  row = bench_autoattack._report_gathered(
    {"whole batch": [9.0, 12.0, 10.0], "gathered": [6.0, 4.0, 5.0]}, {"whole batch": robust, "gathered": robust}, 8
  )
  assert row["seconds"] == {"whole batch": 10.0, "gathered": 5.0} and row["speedup"] == pytest.approx(2.0)
  assert row["same_counts"]
  other = bench_autoattack._report_gathered(
    {"whole batch": [1.0], "gathered": [1.0]}, {"whole batch": robust, "gathered": {**robust, "square": 2}}, 8
  )
  assert not other["same_counts"]


def test_autoattack_each_on_all_rejects_an_unknown_stage():
  from benchmarks import bench_autoattack

  with pytest.raises(ValueError, match="unknown --stages"):
    bench_autoattack.main(["--tiny", "--each_on_all", "--stages", "apgd_ce,fab"])
