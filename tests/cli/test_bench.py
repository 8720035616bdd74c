"""memopt-bench: argument errors (message on stderr, exit code 2), the strategy registry, and the files it writes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memopt import strategies as strategies_module
from memopt.cli import bench
from memopt.models import get_family
from memopt.strategies import STRATEGIES, Strategy, StrategyContext, StrategyUnavailable, get_strategies
from memopt.trace import MemoryTrace


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    return exit_info.value.code


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "sora"], "unknown model family 'sora'"),
        (["--model", "wan", "--tiny", "--strategies", "baseline,turbo"], "unknown strategy 'turbo'"),
        (["--model", "wan", "--tiny", "--strategies", "baseline,,ffn"], "empty strategy name"),
        (["--model", "wan", "--tiny", "--height", "100"], "multiples of 16"),
        (["--model", "ltx", "--tiny", "--width", "48"], "multiples of 32"),
        (["--model", "cosmos", "--tiny", "--frames", "17"], "more than the model's [4, 16, 16] (max_size)"),
        (["--model", "wan", "--tiny", "--frames", "-3"], "--frames must be >= 1, got -3"),
        (["--model", "wan", "--tiny", "--height", "0"], "--height must be >= 1, got 0"),
        (["--model", "wan", "--tiny", "--size", "4k"], "unknown size '4k' for wan"),
        (["--model", "flux", "--tiny", "--frames", "9"], "flux is an image model"),
        (["--model", "wan", "--variant", "huge"], "wan has no config 'huge'"),
        (["--model", "flux", "--variant", "small"], "--variant small exists for wan"),
        (["--model", "wan", "--tiny", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--model", "wan", "--tiny", "--repeats", "-1"], "--repeats must be >= 0"),
        (["--model", "wan", "--tiny", "--device", "tpu"], "--device"),
        (["--model", "wan", "--tiny", "--simulate", "--device", "cuda"], "--device"),
        (["--model", "wan"], "add --simulate"),  # Wan-14B in fp32 does not fit in host memory
        (["--model", "wan", "--dtype", "int8"], "invalid choice: 'int8'"),
    ],
)
def test_argument_errors_exit_2_with_a_clear_message(argv, message, capsys) -> None:
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("usage: memopt-bench")


def test_config_file_errors(tmp_path, capsys) -> None:
    missing = tmp_path / "missing.json"
    assert _exit_code(["--config", str(missing)]) == 2
    assert "missing.json" in capsys.readouterr().err

    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert _exit_code(["--config", str(unknown)]) == 2
    assert "not UNet2DConditionModel" in capsys.readouterr().err

    both = tmp_path / "both.json"
    both.write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    assert _exit_code(["--config", str(both), "--model", "wan"]) == 2
    assert "--config replaces --model" in capsys.readouterr().err


def test_config_file_run(tmp_path) -> None:
    config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1",
              **{key: list(value) if isinstance(value, tuple) else value
                 for key, value in get_family("wan").configs["tiny"].items()}}
    path = tmp_path / "my-wan.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    assert bench.main(["--config", str(path), "--simulate", "--strategies", "baseline", "--out", str(out)]) == 0
    summary = _check_outputs(out, ["baseline"])
    assert summary["run"]["config"] == "my-wan" and summary["run"]["hidden"] == 32
    assert (summary["run"]["height"], summary["run"]["width"]) == (48, 80)  # a small config gets the tiny size


def test_list_prints_models_sizes_and_strategies(capsys) -> None:
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ["wan", "hunyuanvideo", "flux", "720p", *STRATEGIES]:
        assert name in out


def test_strategy_parsing() -> None:
    assert [s.name for s in get_strategies(None)] == [name for name in STRATEGIES
                                                      if name not in ("checkpointing", "sequence-host",
                                                                      "sequence-offload")]
    # baseline first (errors are measured against it), aliases expanded, duplicates dropped.
    assert [s.name for s in get_strategies("all, ffn,baseline,ffn-hidden")] == ["baseline", "all", "ffn-hidden"]
    assert [s.name for s in get_strategies("offload")] == ["baseline", "group-offload", "group-offload-stream",
                                                             "model-cpu-offload"]
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        get_strategies("nope")


def test_training_strategy_parsing() -> None:
    forward = [s.name for s in get_strategies(None)]
    training = [s.name for s in get_strategies(None, training=True)]
    assert "checkpointing" not in forward and "sequence-host" not in forward and "group-offload" in forward
    assert "checkpointing" in training and "sequence-host" in training and "group-offload" not in training
    assert [s.name for s in get_strategies("training")] == ["baseline", "checkpointing", "sequence", "sequence-host",
                                                             "sequence-offload", "all"]


def test_unavailable_reasons() -> None:
    model = torch.nn.Linear(2, 2)
    cpu = StrategyContext(device=torch.device("cpu"), tokens=16)
    simulated = StrategyContext(device=torch.device("cpu"), tokens=16, simulate=True)
    assert "needs a CUDA device" in STRATEGIES["group-offload"].unavailable_reason(cpu)
    assert "needs a CUDA device" in STRATEGIES["kernel"].unavailable_reason(cpu)
    assert STRATEGIES["baseline"].unavailable_reason(simulated) is None
    assert "run with --training" in STRATEGIES["checkpointing"].unavailable_reason(cpu)
    cuda_training = StrategyContext(device=torch.device("cuda"), tokens=16, training=True)
    assert "the backward needs them again" in STRATEGIES["group-offload"].unavailable_reason(cuda_training)
    assert "'sequence-offload'" in STRATEGIES["group-offload"].unavailable_reason(cuda_training)
    assert "needs a CUDA device" in STRATEGIES["sequence-offload"].unavailable_reason(
        StrategyContext(device=torch.device("cpu"), tokens=16, training=True))
    with pytest.raises(StrategyUnavailable, match="Linear does not support diffusers' gradient checkpointing"):
        STRATEGIES["checkpointing"].apply(model, cpu)
    missing = Strategy("future", "not written yet", lambda m, c: None, modules=("memopt.hooks.not_written_yet",))
    assert "memopt.hooks.not_written_yet is not available" in missing.unavailable_reason(cpu)
    with pytest.raises(StrategyUnavailable, match="not supported by Linear"):
        STRATEGIES["diffusers-chunking"].apply(model, cpu)


def test_compact_timeline_keeps_the_peak_and_the_envelope() -> None:
    live = [(i * 37) % 101 for i in range(10_000)]
    live[7_777] = 500
    trace = MemoryTrace(peak_bytes=500, baseline_bytes=1, peak_op="mul", peak_module="m", peak_index=7_777,
                        num_ops=len(live), ops=["op"] * len(live), modules=["m"] * len(live), live_bytes=live,
                        module_stats={})
    compact = bench.compact_timeline(trace, 1_000)
    assert len(compact.live_bytes) <= 1_002
    assert compact.live_bytes[compact.peak_index] == 500 and compact.num_ops == 10_000
    assert min(compact.live_bytes) == min(live) and compact.meta["timeline_compacted_from"] == 10_000
    assert bench.compact_timeline(trace, 0) is trace


def _check_outputs(out: Path, names: list[str]) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["version"] == 1 and summary["command"].startswith("memopt-bench")
    for key in ("family", "class", "config", "height", "width", "num_frames", "batch_size", "dtype", "device",
                "tokens", "hidden", "ld_bytes", "versions"):
        assert key in summary["run"], key
    rows = summary["strategies"]
    assert [row["strategy"] for row in rows] == names
    with open(out / "summary.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == bench.SUMMARY_FIELDS
        assert [row["strategy"] for row in reader] == names
    for row in rows:
        assert set(row) == set(bench.SUMMARY_FIELDS)
        if row["status"] != "ok":
            assert row["reason"] and row["trace_file"] is None
            continue
        trace = MemoryTrace.load(out / row["trace_file"])
        assert trace.peak_bytes == row["activation_peak_bytes"] > 0
        assert row["total_peak_bytes"] == trace.baseline_bytes + trace.peak_bytes
        assert trace.meta["strategy"] == row["strategy"] and trace.meta["ld_bytes"] == summary["run"]["ld_bytes"]
        assert trace.live_bytes[trace.peak_index] == trace.peak_bytes
    assert (out / "timelines.png").stat().st_size > 1000
    return summary


def test_real_run_writes_traces_table_and_summaries(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["--model", "wan", "--tiny", "--batch-size", "2", "--strategies", "baseline,ffn-hidden,diffusers-chunking",
            "--repeats", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "not supported by" in printed
    summary = _check_outputs(out, ["baseline", "ffn-hidden", "diffusers-chunking"])
    baseline, ffn, chunking = summary["strategies"]
    assert summary["run"]["tokens"] == 2 * 2 * 3 * 5 and summary["run"]["dtype"] == "float32"
    assert baseline["status"] == "ok" and baseline["rel_error"] == 0.0 and baseline["time_s"] > 0
    assert chunking["status"] == "unavailable"
    if ffn["status"] == "ok":  # memopt.hooks.feedforward exists in this build
        assert ffn["rel_error"] <= 1e-5 and ffn["time_vs_baseline"] > 0


def test_simulated_run(tmp_path) -> None:
    out = tmp_path / "sim"
    assert bench.main(["--model", "flux", "--tiny", "--simulate", "--strategies", "baseline,group-offload",
                       "--out", str(out)]) == 0
    summary = _check_outputs(out, ["baseline", "group-offload"])
    baseline, offload = summary["strategies"]
    assert summary["run"]["simulated"] and summary["run"]["dtype"] == "bfloat16"
    assert baseline["time_s"] is None and baseline["rel_error"] is None  # fake tensors: no time, no values
    assert offload["status"] == "unavailable"


def test_training_run(tmp_path, capsys) -> None:
    """--training: a training step per strategy; the parameters' gradients match the unmodified model's, and what
    autograd keeps shrinks with checkpointing, sequence chunks and the saved inputs on the host."""
    out = tmp_path / "train"
    argv = ["--model", "wan", "--tiny", "--batch-size", "2", "--training", "--strategies", "training", "--repeats", "1",
            "--num-chunks", "4", "--out", str(out)]
    assert bench.main(argv) == 0
    assert "a training step" in capsys.readouterr().out
    names = ["baseline", "checkpointing", "sequence", "sequence-host", "sequence-offload", "all"]
    summary = _check_outputs(out, names)
    assert summary["run"]["training"] and summary["run"]["name"].endswith("-training")
    rows = {row["strategy"]: row for row in summary["strategies"]}
    assert rows.pop("sequence-offload")["status"] == "unavailable"  # needs CUDA
    assert all(row["status"] == "ok" and row["rel_error"] <= 1e-5 for row in rows.values()), rows
    peak = {name: row["activation_peak_bytes"] for name, row in rows.items()}
    assert peak["sequence-host"] < peak["sequence"] < peak["checkpointing"] < peak["baseline"], peak
    # The planner's budget is the baseline's weights, gradients and inputs plus half its activations.
    assert rows["all"]["total_peak_bytes"] <= rows["baseline"]["resident_bytes"] + peak["baseline"] // 2
    assert "training step" in rows["all"]["report"]
    parameters = sum(p.numel() for p in get_family("wan").build("tiny").parameters())
    assert rows["baseline"]["resident_bytes"] >= 2 * 4 * parameters  # weights and their gradients


def test_simulated_training_run(tmp_path) -> None:
    out = tmp_path / "sim-train"
    assert bench.main(["--model", "wan", "--tiny", "--simulate", "--training", "--strategies",
                       "baseline,checkpointing,sequence", "--out", str(out)]) == 0
    rows = _check_outputs(out, ["baseline", "checkpointing", "sequence"])["strategies"]
    assert [row["status"] for row in rows] == ["ok"] * 3
    assert rows[2]["activation_peak_bytes"] < rows[1]["activation_peak_bytes"] < rows[0]["activation_peak_bytes"]


def test_a_failing_strategy_is_reported_and_exits_1(tmp_path, monkeypatch, capsys) -> None:
    def broken(model, context):
        raise RuntimeError("boom")

    monkeypatch.setitem(strategies_module.STRATEGIES, "broken", Strategy("broken", "raises", broken))
    out = tmp_path / "broken"
    assert bench.main(["--model", "wan", "--tiny", "--strategies", "broken", "--repeats", "0",
                       "--out", str(out)]) == 1
    assert "RuntimeError: boom" in capsys.readouterr().out
    rows = json.loads((out / "summary.json").read_text())["strategies"]
    assert [(row["strategy"], row["status"]) for row in rows] == [("baseline", "ok"), ("broken", "error")]


def test_console_script(tmp_path) -> None:
    script = Path(sys.executable).with_name("memopt-bench")
    assert script.exists(), "memopt-bench is not installed next to this interpreter (pip install -e .)"
    out = tmp_path / "cli"
    run = subprocess.run([str(script), "--model", "wan", "--tiny", "--strategies", "baseline", "--repeats", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "baseline" in run.stdout and f"to {out}" in run.stdout.replace("\n", "")
    _check_outputs(out, ["baseline"])


def test_a_model_returning_per_sample_lists_and_reading_its_index_tensors(tmp_path) -> None:
    """Cosmos 3 Omni returns a list of predictions, names its block count ``num_hidden_layers`` and reads its index
    tensors as values: its run compares the flattened list, reports its layers, and simulates at a size (the family's
    inputs keep those tensors real under FakeTensorMode)."""
    out = tmp_path / "cosmos3"
    assert bench.main(["--model", "cosmos3_omni", "--tiny", "--strategies", "baseline,sequence", "--repeats", "1",
                       "--out", str(out)]) == 0
    summary = _check_outputs(out, ["baseline", "sequence"])
    baseline, sequence = summary["strategies"]
    assert summary["run"]["num_layers"] == 2 and baseline["status"] == sequence["status"] == "ok"
    assert sequence["rel_error"] <= 1e-5
    sim = tmp_path / "cosmos3-sim"
    assert bench.main(["--model", "cosmos3_omni", "--tiny", "--simulate", "--strategies", "baseline,sequence",
                       "--out", str(sim)]) == 0
    assert all(s["status"] == "ok" for s in _check_outputs(sim, ["baseline", "sequence"])["strategies"])
