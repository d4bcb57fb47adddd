"""The extra loss terms of ``surgery.distill``: cross-entropy + KL at temperature T together
(``kl_weight``) and FAR's Hoyer-Square sparsity penalty (``hoyer_weight``), the CLI route from a
Hoyer-trained run to ``surgery prune --importance hoyer``, and stage keys that stay put at the defaults."""

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import surgery
from models import build
from surgery.cli import app
from surgery.distill import DistillConfig
from surgery.errors import DataError
from surgery.progress import NullProgress
from surgery.prune import hoyer_square
from surgery.prune.engine import replacement_bundles_sets
from surgery.swap import replaced_sites
from test_distill import vit_data


def images(batches=4, batch=4, labels=True):
    return vit_data(batches, batch, labels)


def replaced_vit(replacement="mhlstm", head_scale=1.0):
    model, x = build("timm_vit")
    with torch.no_grad():
        # the random head gives near-uniform logits; a larger one gives teacher and student distinct ones
        model.head.weight.mul_(head_scale)
    surgery.replace_attention(model, replacement, x)
    return model, x


class Recorder(NullProgress):
    def __init__(self):
        self.metrics = []

    def update(self, step, metrics):
        self.metrics.append(dict(metrics))


def first_task_term(data, **settings):
    """The task term of the first step (measured before that step changes any weight)."""
    model, _ = replaced_vit(head_scale=30.0)
    recorder = Recorder()
    surgery.distill(None, model, data, mode="e2e", steps=1, lr=1e-3, progress=recorder, **settings)
    return recorder.metrics[0]["task"]


def by_hand(batch, temperature):
    """Cross-entropy to the labels and KL(teacher || student) at T, written out without torch's losses."""
    model, _ = replaced_vit(head_scale=30.0)
    x, labels = batch if isinstance(batch, tuple) else (batch, None)
    with torch.no_grad():
        student = model(x).double()
        surgery.use_original_attention(model, True)
        teacher = model(x).double()
    log_student = student - student.exp().sum(-1, keepdim=True).log()
    cross_entropy = None if labels is None else -log_student[torch.arange(len(labels)), labels].mean()
    soft_student = student / temperature - (student / temperature).exp().sum(-1, keepdim=True).log()
    soft_teacher = teacher / temperature - (teacher / temperature).exp().sum(-1, keepdim=True).log()
    kl = (soft_teacher.exp() * (soft_teacher - soft_student)).sum(-1).mean()
    return cross_entropy, kl


def test_cross_entropy_plus_kl_equals_the_hand_computed_sum_on_one_batch():
    temperature, weight = 3.0, 0.7
    data = images()
    cross_entropy, kl = by_hand(data[0], temperature)
    assert float(kl) > 0.05  # the random mixers are not the teacher: the KL term is not negligible
    alone = first_task_term(data, temperature=temperature)
    combined = first_task_term(data, temperature=temperature, kl_weight=weight)
    assert alone == pytest.approx(float(cross_entropy), rel=1e-4)
    assert combined == pytest.approx(float(cross_entropy + weight * temperature ** 2 * kl), rel=1e-4)
    assert combined - alone == pytest.approx(weight * temperature ** 2 * float(kl), rel=1e-3)
    # without labels the weighted KL is the whole task term (None keeps today's unweighted KL)
    unlabelled = images(labels=False)
    _, kl_unlabelled = by_hand(unlabelled[0], temperature)
    assert first_task_term(unlabelled, temperature=temperature) == pytest.approx(
        temperature ** 2 * float(kl_unlabelled), rel=1e-4)
    assert first_task_term(unlabelled, temperature=temperature, kl_weight=weight) == pytest.approx(
        weight * temperature ** 2 * float(kl_unlabelled), rel=1e-4)


def test_cross_entropy_plus_kl_trains_differently_from_cross_entropy_alone():
    results = {}
    for weight in (None, 1.0):
        model, _ = replaced_vit()
        result = surgery.distill(None, model, images(), mode="e2e", steps=6, lr=3e-3, kl_weight=weight)
        results[weight] = (result, [p.detach().clone() for w in replaced_sites(model) for p in w.mixer.parameters()])
    (plain, plain_weights), (combined, combined_weights) = results[None], results[1.0]
    assert any(not torch.allclose(a, b) for a, b in zip(plain_weights, combined_weights))
    assert combined.final_metrics["task"] > plain.final_metrics["task"]  # the same CE plus a KL >= 0


def group_norms(model):
    return torch.cat([unit_set.sum_of_squares(owner).sqrt() for owner, unit_set in replacement_bundles_sets(model)])


def test_hoyer_weight_sparsifies_the_mixers_so_a_threshold_prunes_units():
    models, results = {}, {}
    for weight in (0.0, 1.0):
        model, x = replaced_vit()
        start = hoyer_square(model).item()
        results[weight] = surgery.distill(None, model, images(labels=False), steps=40, lr=1e-2, hoyer_weight=weight)
        models[weight] = model
    plain, sparse = hoyer_square(models[0.0]).item(), hoyer_square(models[1.0]).item()
    assert plain == pytest.approx(start, rel=0.01)  # distillation alone leaves the measure where it was
    assert sparse < 0.8 * plain
    assert "hoyer" not in results[0.0].final_metrics
    assert results[1.0].final_metrics["hoyer"] == pytest.approx(sparse, rel=0.01)
    # the penalty costs little fidelity: every site still learned
    for site in results[1.0].sites:
        assert site.relative_mse_after < 0.1 * site.relative_mse_before
    # the same global threshold on group norms (summed over a unit's directions) removes units of the
    # penalised mixers only
    threshold = 1.5
    removed = {}
    for weight, model in models.items():
        report = surgery.prune(copy.deepcopy(model), x, importance="hoyer", threshold=threshold,
                               scope="replacements", measure_flops=False)
        removed[weight] = sum(b.before - b.after for b in report.bundles)
    assert removed[0.0] == 0 and removed[1.0] > 0


def test_cli_distill_with_hoyer_weight_then_prune_by_hoyer(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["replace", "--model", "py:models:hand_written_factory", "--with", "mhlstm",
                                 "--out", str(run), "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["distill", str(run), "--data", "random:4", "--steps", "30", "--lr", "1e-2",
                                 "--set", "hoyer_weight=1.0", "--set", "log_every=10", "--allow-code", "--json"])
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [entry["hoyer"] for entry in logged if "hoyer" in entry]
    assert len(trained) == 3 and trained[-1] < 0.9 * trained[0]
    assert json.loads((run / "config.json").read_text())["hoyer_weight"] == 1.0
    norms = group_norms(surgery.load(run, allow_code=True)).detach()
    threshold = 2 * float(norms.quantile(0.2))  # a unit's score sums its norms over both directions
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(run), "--importance", "hoyer", "--threshold", str(threshold),
                                 "--scope", "replacements", "--out", str(out), "--allow-code", "--no-flops", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["params_after"] < summary["params_before"]


def test_bad_term_settings_fail_in_one_line():
    model, _ = replaced_vit()
    with pytest.raises(surgery.SurgeryError, match="kl_weight needs mode='e2e'"):
        surgery.distill(None, model, images(), steps=1, kl_weight=0.5)
    with pytest.raises(surgery.SurgeryError, match="kl_weight must be a number"):
        surgery.distill(None, model, images(), mode="e2e", steps=1, kl_weight=-1)
    with pytest.raises(surgery.SurgeryError, match="hoyer_weight must be a number"):
        surgery.distill(None, model, images(), steps=1, hoyer_weight="1e-4")
    bert, _ = build("hf_bert")
    surgery.replace_attention(bert, "mhlstm", {"input_ids": torch.zeros(2, 8, dtype=torch.long)})
    batch = {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))}
    with pytest.raises(DataError, match="kl_weight needs a classifier"):
        surgery.distill(None, bert, [batch], mode="e2e", steps=1, kl_weight=0.5)


def test_term_settings_at_their_defaults_keep_the_stage_key_of_earlier_runs():
    # the full earlier-key check (every added setting) is in tests/test_augment.py
    config = DistillConfig(mode="e2e", steps=7)
    assert DistillConfig(mode="e2e", steps=7, kl_weight=None, hoyer_weight=0.0).key() == config.key()
    keys = {DistillConfig(mode="e2e", steps=7, kl_weight=0.5).key(), DistillConfig(mode="e2e", steps=7, kl_weight=0.0).key(),
            DistillConfig(mode="e2e", steps=7, hoyer_weight=1e-4).key(), config.key()}
    assert len(keys) == 4
