"""Caption metrics, offline: pycocoevalcap's BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE, and a fast CIDEr-D reward.

pycocoevalcap: https://github.com/salaniz/pycocoevalcap. Its Java parts (the PTB tokenizer, METEOR, SPICE) run
where Java is installed; SPICE also needs Stanford CoreNLP jars that it downloads, so offline it is reported as
skipped with the reason instead of failing. Training-side code.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def _validate(predictions: dict[str, str], references: dict[str, list[str]]) -> None:
    if set(predictions) != set(references):
        odd = sorted(set(predictions) ^ set(references), key=str)[0]
        raise ValueError(f"predictions and references must cover the same images; {odd!r} is in only one of them")
    for image_id, refs in references.items():
        if not refs:
            raise ValueError(f"image {image_id!r} has no reference captions")


def _java_missing_reason() -> str | None:
    return None if shutil.which("java") else "java is not on PATH"


def _spice_missing_reason() -> str | None:
    import pycocoevalcap.spice as spice

    lib = Path(spice.__file__).parent / "lib"
    if not (lib / "stanford-corenlp-3.6.0.jar").is_file():
        return f"SPICE needs Stanford CoreNLP 3.6.0 jars in {lib}, which it downloads; none is there (offline)"
    return _java_missing_reason()


def compute_caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """COCO caption metrics of `predictions` against `references` (both keyed by image id).

    Returns pycocoevalcap's names (`Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr`, `SPICE`), each a float or
    `None`, and `skipped`: {metric: reason} for every metric that could not run.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.spice.spice import Spice
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _validate(predictions, references)
    result: dict = {name: None for name in METRIC_NAMES}
    skipped: dict[str, str] = {}
    java_reason = _java_missing_reason()
    if java_reason is None:
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
        res = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    else:  # the PTB tokenizer is Java too: fall back to the same lowercase, punctuation-free words
        gts = {i: [simple_tokenize(c) for c in refs] for i, refs in references.items()}
        res = {i: [simple_tokenize(c)] for i, c in predictions.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    result.update({f"Bleu_{n + 1}": float(score) for n, score in enumerate(bleu)})
    result["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    result["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    for name, scorer, reason in (("METEOR", Meteor, java_reason), ("SPICE", Spice, _spice_missing_reason())):
        if reason is not None:
            skipped[name] = reason
            continue
        try:
            result[name] = float(scorer().compute_score(gts, res)[0])
        except (OSError, subprocess.CalledProcessError, ValueError) as error:
            skipped[name] = f"{type(error).__name__}: {error}"
    result["skipped"] = skipped
    for name, reason in skipped.items():
        logger.warning("%s skipped: %s", name, reason)
    return result


def load_caption_metric():
    """The offline `evaluate` module wrapping `compute_caption_metrics` (`evaluate.load("bleu")` needs the Hub)."""
    import evaluate

    return evaluate.load(str(Path(__file__).parent / "caption_metrics"))


# ----------------------------------------------------------------------------------------------------------------
# Fast CIDEr-D for SCST rewards
# Follows pycocoevalcap/cider/cider_scorer.py exactly (n = 4, sigma = 6, clipped numerator, "length" counted in
# bigrams as there), with the document frequencies fixed once from a reference corpus.
_PUNCTUATION = re.compile(r"[^a-z0-9' ]+")


def simple_tokenize(text: str) -> str:
    """Lowercase words without punctuation, as PTBTokenizer + pycocoevalcap's punctuation removal give them."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _ngrams(sentence: str, n: int) -> dict[tuple, int]:
    words = sentence.split()
    counts: dict[tuple, int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D with document frequencies from `references` ({image_id: [captions]}), for scoring many candidates.

    `CiderD(refs).score([c], [i])` equals pycocoevalcap's per-image `Cider().compute_score(refs, {i: [c], ...})`
    when the candidates cover the same images (pycocoevalcap recomputes the frequencies from the scored images).
    """

    def __init__(self, references: dict[str, list[str]], n: int = 4, sigma: float = 6.0, tokenize: bool = True):
        self.n, self.sigma = n, sigma
        prepare = simple_tokenize if tokenize else (lambda s: s)
        self.tokenize = prepare
        counts = {i: [_ngrams(prepare(r), n) for r in refs] for i, refs in references.items()}
        self.document_frequency: dict[tuple, float] = defaultdict(float)
        for refs in counts.values():
            for ngram in {g for ref in refs for g in ref}:
                self.document_frequency[ngram] += 1
        self.log_corpus = np.log(float(len(counts)))
        self.references = {i: [self._vector(ref) for ref in refs] for i, refs in counts.items()}

    def _vector(self, counts: dict[tuple, int]) -> tuple[list[dict], list[float], int]:
        vec = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, term_freq in counts.items():
            order = len(ngram) - 1
            weight = float(term_freq) * (self.log_corpus - np.log(max(1.0, self.document_frequency.get(ngram, 0.0))))
            vec[order][ngram] = weight
            norm[order] += weight**2
            if order == 1:
                length += term_freq
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, candidates: list[str], image_ids: list[str]) -> np.ndarray:
        """Per-candidate CIDEr-D (pycocoevalcap scale: 10 × mean over n-gram orders and references)."""
        scores = np.zeros(len(candidates))
        penalty_scale = 2 * self.sigma**2
        for k, (candidate, image_id) in enumerate(zip(candidates, image_ids)):
            vec, norm, length = self._vector(_ngrams(self.tokenize(candidate), self.n))
            refs = self.references[image_id]
            total = 0.0
            for ref_vec, ref_norm, ref_length in refs:
                penalty = math.e ** (-((length - ref_length) ** 2) / penalty_scale)
                for order in range(self.n):
                    ref_order = ref_vec[order]
                    value = sum(min(w, ref_order.get(g, 0.0)) * ref_order.get(g, 0.0) for g, w in vec[order].items())
                    if norm[order] != 0 and ref_norm[order] != 0:
                        value /= norm[order] * ref_norm[order]
                    total += value * penalty
            scores[k] = total / self.n / len(refs) * 10.0
        return scores
