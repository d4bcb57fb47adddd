"""The distill CLI: replace+distill killed with SIGKILL then resumed ends with the same weights as an
uninterrupted run; a 2-process gloo run matches 1 process; one-line errors for bad data."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from surgery.cli import app

ROOT = Path(__file__).resolve().parents[1]


def tiny_bert_dir(tmp_path: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64))
    path = tmp_path / "tiny_bert"
    model.save_pretrained(path)
    return path


def surgery_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "surgery", *args]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_weights(tmp_path):
    model = tiny_bert_dir(tmp_path)
    steps = 240

    def replace(out: Path) -> list[str]:
        return surgery_command("replace", "--model", f"hf:{model}", "--with", "mhlstm", "--data", "random:32",
                               "--steps", str(steps), "--lr", "3e-3", "--out", str(out), "--quiet",
                               "--distill-set", "checkpoint_every=10", "--distill-set", "log_every=5")

    straight = tmp_path / "straight"
    done = subprocess.run(replace(straight), cwd=ROOT, env=environment(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(replace(killed), cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    # wait for progress, not for a time: a slow or busy machine only takes longer (the deadline is
    # a safety net against a hung run, far above what 40 tiny steps need anywhere)
    deadline = time.monotonic() + 400
    reached = False
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 8:  # past step 40
            reached = True
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    if not reached:
        process.kill()
        pytest.fail("the run logged no step 40 within 400 s: hung?")
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoint = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert 0 < checkpoint["step"] < steps

    resumed = subprocess.run(surgery_command("distill", str(killed), "--resume", "--json"), cwd=ROOT,
                             env=environment(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from"] == checkpoint["step"] and summary["steps"] == steps
    expected, got = weights(straight), weights(killed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(5, steps + 1, 5))


WORKER = textwrap.dedent("""
    import json, sys, torch
    from transformers import BertConfig, BertModel
    import surgery

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64)).eval()
    surgery.replace_attention(model, "mhlstm")
    generator = torch.Generator().manual_seed(1)
    small = [{"input_ids": torch.randint(0, 100, (4, 10), generator=generator),
              "attention_mask": torch.ones(4, 10, dtype=torch.long)} for _ in range(8)]
    world = int(sys.argv[2])
    # one process sees each pair of small batches as one batch: the same samples per step
    data = small if world == 2 else [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(small[::2], small[1::2])]
    result = surgery.distill(None, model, data, mode=sys.argv[3], steps=6, lr=3e-3, run_dir=sys.argv[1],
                             log_every=1, eval_data=small[:2])
    if result.run_dir and __import__("torch").distributed.is_initialized() is False:
        pass
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blockwise", "e2e"])
def test_two_gloo_processes_match_one(tmp_path, mode):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, str(script), str(one), "1", mode], cwd=ROOT, env=environment(),
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", "29531", str(script), str(two), "2", mode], cwd=ROOT,
                            env=environment(), capture_output=True, text=True)
    assert double.returncode == 0, double.stderr[-3000:]
    read = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(one), read(two)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
    for key, value in weights(one).items():
        torch.testing.assert_close(weights(two)[key], value, rtol=1e-4, atol=1e-5)


def test_cli_bad_data_is_one_line(tmp_path):
    model = tiny_bert_dir(tmp_path)
    result = CliRunner().invoke(app, ["replace", "--model", f"hf:{model}", "--data", "mnist", "--steps", "2",
                                      "--out", str(tmp_path / "run"), "--quiet", "--json"])
    assert result.exit_code == 2, result.output
    # (transformers prints its own weight-loading bar; ours is one "error:" line)
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: the data does not fit BertModel")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cli_distill_runs_and_prints_fidelity(tmp_path):
    model = tiny_bert_dir(tmp_path)
    run = tmp_path / "run"
    runner = CliRunner()
    first = runner.invoke(app, ["replace", "--model", f"hf:{model}", "--out", str(run), "--json"])
    assert first.exit_code == 0, first.output
    result = runner.invoke(app, ["distill", str(run), "--data", "random:8", "--steps", "6", "--mode", "e2e",
                                 "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["mode"] == "e2e" and summary["steps"] == 6 and len(summary["sites"]) == 2
    assert (run / "fidelity.json").is_file()
    again = runner.invoke(app, ["distill", str(run), "--steps", "4", "--quiet"])  # data from config.json
    assert again.exit_code == 0, again.output
    assert "fidelity per site" in again.output
