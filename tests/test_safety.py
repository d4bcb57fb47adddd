"""Data safety and trust (issue #18): no code from a run directory, no lost saves, no silent
overwrites, one-line errors, and checked manifests. Every test here failed before the fix."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery import checkpoint
from surgery.cli import app
from surgery.cli.recipe import MARKER, claim_run_directory
from surgery.errors import ManifestError, OutputExistsError, StorageError, SurgeryError

HERE = Path(__file__).parent
ROOT = HERE.parent
runner = CliRunner()
FACTORY = "py:models:hand_written_factory"  # tests/models.py: two hand-written attention blocks


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def encoder(seed: int = 0):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))


def replaced(seed: int = 0):
    model = encoder(seed)
    surgery.replace_attention(model, "conv", X)
    return model.eval()


def child_env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@pytest.fixture
def factory_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


# ------------------------------------------------------------------ 1. no code from files, no prompt
def custom_code_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A HuggingFace directory whose config.json names its own Python code (auto_map)."""
    directory, marker = tmp_path / "hf_custom", tmp_path / "CODE_RAN"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "model_type": "surgery_test_custom", "hidden_size": 8,
        "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel"}}))
    (directory / "custom.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").write("the directory's code ran")
        from transformers import PretrainedConfig, PreTrainedModel
        class CustomConfig(PretrainedConfig):
            model_type = "surgery_test_custom"
        class CustomModel(PreTrainedModel):
            config_class = CustomConfig
        """))
    return directory, marker


@pytest.mark.parametrize("stdin,through", [("y\n", "manifest"), (None, "manifest"), ("y\n", "model spec")])
def test_hf_directory_with_custom_code_never_runs_it_nor_asks(tmp_path, stdin, through):
    directory, marker = custom_code_dir(tmp_path)
    run = tmp_path / "run"
    checkpoint.save(replaced(), run, source=f"hf:{directory}")  # a run directory handed over by someone
    command = (["export", str(run), "--out", str(tmp_path / "m.pt2")] if through == "manifest"
               else ["inspect", "--model", f"hf:{directory}"])
    result = subprocess.run([sys.executable, "-m", "surgery", *command], cwd=tmp_path, env=child_env(),
                            input=stdin, stdin=None if stdin else subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=300)
    assert not marker.exists(), "the directory's Python code was executed"
    assert result.returncode == 2, result.stderr
    assert "[y/N]" not in result.stdout + result.stderr  # never asked
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--allow-code" in lines[0], result.stderr


def test_allow_code_is_what_lets_transformers_run_code(tmp_path, monkeypatch):
    import transformers

    from surgery.models import load_model

    seen = []

    def from_pretrained(location, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "absent"))
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", from_pretrained)
    load_model(f"hf:{tmp_path}")
    load_model(f"hf:{tmp_path}", allow_code=True)
    assert seen == [False, True]  # never None: None is what makes transformers ask on stdin


# ------------------------------------------------------------------ 2. a save is one atomic step
CHILD_SAVE = """
import json, os, sys, torch
sys.path[:0] = [{root!r}]
import surgery

torch.manual_seed(1)
layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
surgery.replace_attention(model, "conv", torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3)))


def save(directory, kill="none", index=0):
    # one forked process per save (imports once): it dies with os._exit(17) right before or right
    # after its index-th os.replace, the way a power cut or SIGKILL would stop it there
    pid = os.fork()
    if pid == 0:
        real_replace, calls = os.replace, []

        def replace(src, dst, *args, **kwargs):
            calls.append(os.path.basename(dst))
            if kill == "before" and len(calls) == index:
                os._exit(17)
            real_replace(src, dst, *args, **kwargs)
            if kill == "after" and len(calls) == index:
                os._exit(17)

        os.replace = replace
        surgery.save(model, directory)
        with open(os.path.join(directory, os.pardir, "renames.json"), "w") as handle:
            json.dump(calls, handle)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


root = sys.argv[1]
assert save(os.path.join(root, "probe")) == 0
renames = json.load(open(os.path.join(root, "renames.json")))
codes = {{}}
for kill in ("before", "after"):
    for index in range(1, len(renames) + 1):
        codes[f"{{kill}}{{index}}"] = save(os.path.join(root, f"{{kill}}{{index}}"), kill, index)
print(json.dumps({{"renames": renames, "codes": codes}}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the child forks one process per kill point")
def test_a_save_killed_at_any_rename_leaves_a_directory_that_loads(tmp_path):
    old, new = replaced(seed=0), replaced(seed=1)
    with torch.no_grad():
        old_out, new_out = old(X), new(X)
    assert not torch.allclose(old_out, new_out)
    # the old model everywhere: the child saves the new one over it and is killed part-way
    points = [f"{kill}{index}" for kill in ("before", "after") for index in range(1, 9)]
    for name in ("probe", *points):
        checkpoint.save(old, tmp_path / name)
    child = subprocess.run([sys.executable, "-c", CHILD_SAVE.format(root=str(ROOT)), str(tmp_path)],
                           env=child_env(), capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.strip().splitlines()[-1])
    renames, codes = result["renames"], result["codes"]
    assert len(renames) <= 8 and "manifest.json" in renames
    commit = renames.index("manifest.json") + 1  # the first manifest rename is the commit point
    assert codes and all(code == 17 for code in codes.values()), codes  # killed exactly there
    for name in codes:
        kill, index = name[:-1], int(name[-1])
        committed = index > commit or (index == commit and kill == "after")
        loaded = surgery.load(tmp_path / name, model=encoder())  # loads in any case
        with torch.no_grad():
            torch.testing.assert_close(loaded(X), new_out if committed else old_out, rtol=0, atol=0,
                                       msg=f"killed {kill} rename {index} ({renames[index - 1]})")
    for name in codes:
        # the dead writer's lock is stale: the next save takes it over, and cleans up after it
        checkpoint.save(old, tmp_path / name)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["manifest.json", "model.safetensors"]


def test_old_run_directories_still_load(tmp_path):
    # before #18 the manifest always named model.safetensors, renamed into place before the manifest
    model = replaced()
    checkpoint.save(model, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["weights"]["file"] == "model.safetensors"
    with torch.no_grad():
        torch.testing.assert_close(surgery.load(tmp_path, model=encoder())(X), model(X), rtol=0, atol=0)


# ------------------------------------------------------------------ 3. --out never silently overwrites
def test_out_with_the_users_files_or_another_run_is_refused(tmp_path, factory_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_error(invoke("replace", "--model", FACTORY, "--with", "conv", "--out", out), "--overwrite",
                   "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    run = tmp_path / "run"
    first = invoke("replace", "--model", FACTORY, "--with", "conv", "--out", run)
    assert first.exit_code == 0, first.output
    again = invoke("replace", "--model", FACTORY, "--with", "conv", "--out", run)  # same model and settings
    assert again.exit_code == 0, again.output
    before = (run / "manifest.json").read_text()
    one_line_error(invoke("replace", "--model", FACTORY, "--with", "gru", "--out", run), "another saved run",
                   "--overwrite")
    assert (run / "manifest.json").read_text() == before
    forced = invoke("replace", "--model", FACTORY, "--with", "gru", "--out", out, "--overwrite")
    assert forced.exit_code == 0, forced.output
    assert (out / "notes.txt").read_text() == "mine"
    assert {e["replacement"] for e in checkpoint.read_manifest(out)["sites"]} == {"gru"}


def test_prune_out_holding_another_run_is_refused(tmp_path, factory_path):
    run, other = tmp_path / "run", tmp_path / "other"
    for directory, name in ((run, "gru"), (other, "conv")):
        assert invoke("replace", "--model", FACTORY, "--with", name, "--out", directory).exit_code == 0
    before = (other / "manifest.json").read_text()
    one_line_error(invoke("prune", run, "--ratio", "0.25", "--no-flops", "--out", other), "--overwrite")
    assert (other / "manifest.json").read_text() == before
    pruned = tmp_path / "pruned"
    for _ in range(2):  # the same prune again over its own output is allowed
        result = invoke("prune", run, "--ratio", "0.25", "--no-flops", "--out", pruned, "--allow-code")
        assert result.exit_code == 0, result.output
    one_line_error(invoke("prune", run, "--ratio", "0.5", "--no-flops", "--out", pruned), "--overwrite")


def test_out_that_is_a_file_is_one_line(tmp_path, factory_path):
    target = tmp_path / "file"
    target.write_text("x")
    one_line_error(invoke("replace", "--model", FACTORY, "--with", "conv", "--out", target), "is a file")


# ------------------------------------------------------------------ 4. one writer per run directory
HOLD_LOCK = """
import sys
sys.path[:0] = [{root!r}]
from surgery.checkpoint import lock_directory
with lock_directory(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_writer_gets_one_line_and_a_dead_holders_lock_is_taken_over(tmp_path, factory_path):
    run = tmp_path / "run"
    assert invoke("replace", "--model", FACTORY, "--with", "conv", "--out", run).exit_code == 0
    before = (run / "manifest.json").read_text()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=str(ROOT)), str(run)], env=child_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SurgeryError, match=f"pid {holder.pid}"):
            surgery.save(replaced(), run)
        one_line_error(invoke("replace", "--model", FACTORY, "--with", "conv", "--out", run),
                       "being written by another process", f"pid {holder.pid}")
        one_line_error(invoke("distill", run, "--data", "random", "--steps", "2", "--allow-code"),
                       "being written by another")
        model = surgery.load(run, allow_code=True)
        with pytest.raises(SurgeryError, match="being written by another"):
            surgery.distill(None, model, [torch.randint(0, 50, (2, 6))] * 2, steps=1, run_dir=run)
        assert (run / "manifest.json").read_text() == before  # nothing of either writer got through
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind
        holder.wait()
    assert (run / checkpoint.LOCK).is_file()
    again = invoke("replace", "--model", FACTORY, "--with", "conv", "--out", run)
    assert again.exit_code == 0, again.output  # the dead holder's lock was taken over
    assert not (run / checkpoint.LOCK).exists()


def test_without_flock_a_dead_pid_is_a_stale_lock_and_a_live_one_holds(tmp_path, monkeypatch):
    import socket

    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on a platform without flock
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / checkpoint.LOCK
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with checkpoint.lock_directory(tmp_path):  # taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        lock.write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname()}))
        with pytest.raises(SurgeryError, match=f"pid {alive.pid}"):
            with checkpoint.lock_directory(tmp_path):
                pass
    finally:
        alive.kill()
        alive.wait()


# ------------------------------------------------------------------ 5. fast inference forms
def test_a_model_after_fast_optimize_is_refused_before_writing_or_loads(tmp_path):
    from surgery.fast import optimize

    model = encoder()
    surgery.replace_attention(model, "mhlstm", X)
    with torch.no_grad():
        expected = model.eval()(X)
    optimize(surgery.finalize(model).eval())
    out = tmp_path / "fast"
    try:
        checkpoint.save(model, out)
    except SurgeryError as error:
        assert "optimize" in str(error) and "\n" not in str(error)
        assert not out.exists() or not any(out.iterdir()), "refused after writing"
        return
    loaded = surgery.load(out, model=encoder())
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ 6, 7, 8. CLI settings, checked first
def test_steps_zero_means_zero_or_is_refused(tmp_path, factory_path):
    result = invoke("replace", "--model", FACTORY, "--with", "conv", "--out", tmp_path / "r", "--data", "random",
                    "--steps", "0", "--json", "--quiet", "--allow-code")
    if result.exit_code == 2:
        one_line_error(result, "steps")
    else:
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["steps"] == 0


@pytest.mark.parametrize("options,needle", [
    (["--steps", "-1"], "steps"),
    (["--lr", "nan"], "lr"),
    (["--lr", "-1"], "lr"),
    (["--lr", "0"], "lr"),
    (["--batch-size", "0"], "batch_size"),
    (["--mode", "sideways"], "mode"),
    (["--distill-set", "lrr=1"], "lrr"),
    (["--data", "text:/nonexistent/corpus.txt"], "does not exist"),
    (["--data", "pictures:here"], "unknown data spec"),
])
def test_bad_distill_settings_are_refused_before_anything_is_written(tmp_path, factory_path, options, needle):
    out = tmp_path / "never"
    arguments = ["replace", "--model", FACTORY, "--with", "conv", "--out", out, "--data", "random", *options]
    one_line_error(invoke(*arguments), needle)
    assert not out.exists()


def test_distill_settings_are_checked_before_the_run_is_touched(tmp_path, factory_path):
    run = tmp_path / "run"
    assert invoke("replace", "--model", FACTORY, "--with", "conv", "--out", run).exit_code == 0
    before = sorted(p.name for p in run.iterdir())
    for options in (["--lr", "nan"], ["--steps", "-1"], ["--data", "text:/nonexistent.txt"]):
        one_line_error(invoke("distill", run, "--data", "random", *options))
    assert sorted(p.name for p in run.iterdir()) == before


def fail_writes_under(monkeypatch, directory: Path, code: int, names: tuple[str, ...] = ()) -> None:
    """Make creating files in ``directory`` fail with ``code`` (a read-only or full disk)."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        path_text = os.fspath(path)
        if path_text.startswith(str(directory)) and flags & os.O_CREAT and (
                not names or any(n in os.path.basename(path_text) for n in names)):
            raise OSError(code, os.strerror(code), path_text)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_read_only_out_is_one_line(tmp_path, factory_path, monkeypatch):
    out = tmp_path / "readonly"
    out.mkdir()
    fail_writes_under(monkeypatch, out, errno.EROFS)
    one_line_error(invoke("replace", "--model", FACTORY, "--with", "conv", "--out", out), "read-only")


def test_full_disk_keeps_the_previous_save_and_says_so(tmp_path, factory_path, monkeypatch):
    run = tmp_path / "run"
    assert invoke("replace", "--model", FACTORY, "--with", "conv", "--out", run).exit_code == 0
    before = surgery.load(run, allow_code=True)
    fail_writes_under(monkeypatch, run, errno.ENOSPC, names=(".model.",))
    one_line_error(invoke("replace", "--model", FACTORY, "--with", "conv", "--out", run, "--seed", "0"),
                   "disk is full", "previous save", "kept")
    monkeypatch.undo()
    after = surgery.load(run, allow_code=True)
    x = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(after(x), before(x), rtol=0, atol=0)


def test_export_to_an_unwritable_place_is_one_line(tmp_path, factory_path, monkeypatch):
    run = tmp_path / "run"
    assert invoke("replace", "--model", FACTORY, "--with", "conv", "--out", run).exit_code == 0
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    one_line_error(invoke("export", run, "--out", blocker / "model.pt2", "--format", "torch-export"), "cannot write")
    folder = tmp_path / "exports"
    folder.mkdir()
    fail_writes_under(monkeypatch, folder, errno.EROFS)
    one_line_error(invoke("export", run, "--out", folder / "model.pt2", "--format", "torch-export"), "read-only")


def test_empty_hf_directory_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(invoke("inspect", "--model", f"hf:{tmp_path / 'empty'}"), "hf:")


@pytest.mark.parametrize("key", ["weights", "sites", "finalized", "replacement", "config"])
def test_manifest_missing_a_field_is_one_line(tmp_path, key):
    checkpoint.save(replaced(), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    if key in manifest:
        del manifest[key]
    else:
        del manifest["sites"][0][key]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=repr(key)):
        surgery.load(tmp_path, model=encoder())
    one_line_error(invoke("inspect", tmp_path), "damaged")


def test_inputs_of_the_wrong_shape_print_no_traceback(capfd):
    from models import tiny_vit

    with pytest.raises(SurgeryError):
        surgery.find_attention(tiny_vit(), torch.randn(1, 5))
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out


# ------------------------------------------------------------------ 9. manifests are checked
def tampered(tmp_path: Path, change) -> Path:
    model = replaced()
    checkpoint.save(model, tmp_path / "run")
    path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest, tmp_path / "run")
    path.write_text(json.dumps(manifest))
    return tmp_path / "run"


@pytest.mark.parametrize("attributes", [
    {"layers.0": {"__class__": "x"}},
    {"layers.0": {"forward": 1}},
    {"layers.0.self_attn": {"num_heads": "2; import os"}},
    {"layers.0.self_attn": {"_qkv_same_embed_dim": False}},
])
def test_only_allow_listed_plain_attributes_are_set(tmp_path, attributes):
    run = tampered(tmp_path, lambda m, _: m.update(module_attributes=attributes))
    with pytest.raises(ManifestError, match="may be set"):
        surgery.load(run, model=encoder())


def test_allow_listed_attributes_are_still_set(tmp_path):
    attributes = {"layers.0.self_attn.original": {"num_heads": 2, "embed_dim": 16}}
    run = tampered(tmp_path, lambda m, _: m.update(module_attributes=attributes))
    assert surgery.load(run, model=encoder()).layers[0].self_attn.original.num_heads == 2


def test_weights_outside_the_run_directory_are_refused(tmp_path):
    def outside(manifest, run):
        (run.parent / "elsewhere.safetensors").write_bytes((run / "model.safetensors").read_bytes())
        manifest["weights"]["file"] = "../elsewhere.safetensors"

    with pytest.raises(ManifestError, match="inside the directory"):
        surgery.load(tampered(tmp_path, outside), model=encoder())

    link = tmp_path / "linked"
    checkpoint.save(replaced(), link)
    (tmp_path / "target.safetensors").write_bytes((link / "model.safetensors").read_bytes())
    (link / "model.safetensors").unlink()
    (link / "model.safetensors").symlink_to(tmp_path / "target.safetensors")
    with pytest.raises(ManifestError, match="outside"):
        surgery.load(link, model=encoder())


def test_recorded_shapes_and_site_widths_are_checked(tmp_path):
    def shapes(manifest, _):
        key = next(iter(manifest["shapes"]))
        manifest["shapes"][key] = [n + 1 for n in manifest["shapes"][key]]

    with pytest.raises(ManifestError, match="recorded shapes"):
        surgery.load(tampered(tmp_path / "a", shapes), model=encoder())

    def width(manifest, _):
        manifest["sites"][0]["site"]["embed_dim"] = 24

    with pytest.raises(ManifestError, match="width 24"):
        surgery.load(tampered(tmp_path / "b", width), model=encoder())

    def heads(manifest, _):
        manifest["sites"][0]["site"]["num_heads"] = 4

    with pytest.raises(ManifestError, match="heads 4"):
        surgery.load(tampered(tmp_path / "c", heads), model=encoder())


def test_duplicate_sites_are_refused(tmp_path):
    run = tampered(tmp_path, lambda m, _: m["sites"].append(m["sites"][0]))
    with pytest.raises(ManifestError, match="twice"):
        surgery.load(run, model=encoder())


# ------------------------------------------------------------------ 10. clearer refusals
def test_resume_with_other_settings_names_the_setting(tmp_path):
    data = [torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = replaced()
    surgery.distill(None, model, data, steps=2, lr=1e-3, run_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(SurgeryError, match=r"\blr\b") as error:
        surgery.distill(None, replaced(), data, steps=2, lr=2e-3, run_dir=tmp_path, resume=True, checkpoint_every=1)
    assert "stage" not in str(error.value)


def test_replacing_a_replaced_model_says_so():
    model = replaced()
    with pytest.raises(SurgeryError, match="already replaced"):
        surgery.replace_attention(model, "conv", X)


def test_a_checkpoint_with_objects_is_one_line_without_torch_advice(tmp_path, factory_path):
    import argparse

    bad = tmp_path / "bad.pth"
    torch.save({"weights": argparse.Namespace(a=1)}, bad)
    result = invoke("replace", "--model", FACTORY, "--with", "conv", "--checkpoint", bad)
    one_line_error(result, "bad.pth")
    assert "weights_only=False" not in result.stderr


def test_a_short_text_file_gets_a_message_that_counts_its_lines(tmp_path):
    from surgery.data.text import file_text
    from surgery.errors import DataError

    text = tmp_path / "one.txt"
    text.write_text("hello world\n")  # one line, under the 4 words a paragraph needs
    with pytest.raises(DataError, match="1 line") as error:
        file_text(text)
    assert "0 paragraphs)" not in str(error.value)


# ------------------------------------------------------------------ 11. the user's umask
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_users_umask(tmp_path, umask, mode):
    from surgery.distill.rundir import RunDirectory

    previous = os.umask(umask)
    try:
        checkpoint.save(replaced(), tmp_path)
        RunDirectory(tmp_path).write_config({"steps": 1})
        RunDirectory(tmp_path).save_checkpoint({"step": 1})
    finally:
        os.umask(previous)
    for name in ("manifest.json", "model.safetensors", "config.json", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


# ------------------------------------------- nothing overwritten without being asked (recipe, export)
def test_export_onto_an_existing_file_is_refused_unless_overwrite(tmp_path, factory_path):
    run = tmp_path / "run"
    assert invoke("replace", "--model", FACTORY, "--with", "conv", "--out", run).exit_code == 0
    target = tmp_path / "model.pt2"
    target.write_bytes(b"the user's earlier export")
    one_line_error(invoke("export", run, "--out", target, "--format", "torch-export"), "exists", "--overwrite")
    assert target.read_bytes() == b"the user's earlier export"
    result = invoke("export", run, "--out", target, "--format", "torch-export", "--overwrite", "--allow-code")
    assert result.exit_code == 0, result.output
    assert target.read_bytes() != b"the user's earlier export" and target.stat().st_size > 1000


def test_recipe_out_holding_other_files_or_another_recipe_is_refused_before_any_work(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    one_line_error(invoke("recipe", "mnist", "--out", mine), "holds other files", "thesis.tex", "--overwrite")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]  # nothing written
    other = tmp_path / "other"
    claim_run_directory(other, "minilm")
    one_line_error(invoke("recipe", "mnist", "--out", other), "'minilm' recipe run", "another --out")
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(invoke("recipe", "mnist", "--out", afile), "is a file")


def test_a_recipe_run_directory_is_claimed_once_and_resumable(tmp_path):
    out = tmp_path / "run"
    claim_run_directory(out, "mnist")
    assert json.loads((out / MARKER).read_text()) == {"recipe": "mnist"}
    (out / "mhlstm").mkdir()  # a stage folder of the started run
    claim_run_directory(out, "mnist")  # the rerun resumes it
    with pytest.raises(OutputExistsError, match="'mnist' recipe run"):
        claim_run_directory(out, "deit")
    # a finished run from before the marker existed is recognised by its report
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps({"recipe": "minilm", "rows": []}))
    claim_run_directory(old, "minilm")
    with pytest.raises(OutputExistsError):
        claim_run_directory(old, "mnist")
    # --overwrite runs beside the user's files and keeps them
    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "notes.txt").write_text("keep")
    claim_run_directory(beside, "mnist", overwrite=True)
    assert (beside / "notes.txt").read_text() == "keep" and (beside / MARKER).is_file()
    with pytest.raises(StorageError):
        claim_run_directory(beside / "notes.txt", "mnist")
