"""Caption metrics, offline: pycocoevalcap's BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE, and a fast CIDEr-D reward.

pycocoevalcap: https://github.com/salaniz/pycocoevalcap. Its Java parts (the PTB tokenizer, METEOR, SPICE) run where
`java` is on PATH and their jars are installed. SPICE also needs Stanford CoreNLP jars that it downloads on first
use, so offline it is reported as skipped with the reason instead of failing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as spice_models
from pycocoevalcap.spice import spice as spice_module
from pycocoevalcap.tokenizer import ptbtokenizer

logger = logging.getLogger(__name__)

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")

_PTB_JARS = (Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR,)
_METEOR_JARS = (Path(meteor_module.__file__).parent / meteor_module.METEOR_JAR,)
_SPICE_LIB = Path(spice_models.__file__).parent / spice_models.SPICELIB
_SPICE_JARS = (
    Path(spice_module.__file__).parent / spice_module.SPICE_JAR,
    _SPICE_LIB / f"{spice_models.JAR}.jar",
    _SPICE_LIB / f"{spice_models.JAR}-models.jar",
)

# Words, keeping intra-word hyphens as PTBTokenizer does; punctuation tokens are dropped like pycocoevalcap's
# PUNCTUATIONS list (https://github.com/salaniz/pycocoevalcap/blob/master/tokenizer/ptbtokenizer.py).
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


class _JavaOutputError(RuntimeError):
    """A pycocoevalcap Java process ran but its output was missing or incomplete."""


def simple_tokenize(text: str) -> str:
    """Lowercase words separated by single spaces, punctuation removed: PTBTokenizer's output, closely enough.

    Differs from PTBTokenizer on clitics ("don't" gives "don t", not "do n't") and decimals; synthetic captions
    have neither.

    Args:
        text: A raw caption.

    Returns:
        The tokenised caption.
    """
    return " ".join(_WORD.findall(text.lower()))


def _validate_inputs(predictions: dict[str, str], references: dict[str, list[str]]) -> None:
    """Raise `ValueError` naming the first image id that is in only one dict or has no references."""
    only_one = set(predictions) ^ set(references)
    if only_one:
        image_id = sorted(only_one, key=str)[0]
        side = "predictions" if image_id in predictions else "references"
        raise ValueError(f"Image id {image_id!r} is in {side} only; both must cover the same images")
    for image_id, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"Image id {image_id!r} needs a non-empty list of reference captions, got {refs!r}")


def _java_unavailable(jars: tuple[Path, ...]) -> str | None:
    """Why a Java part cannot run (no `java` on PATH, a jar missing), or None when it can."""
    if shutil.which("java") is None:
        return "java is not on PATH"
    missing = [str(jar) for jar in jars if not jar.is_file()]
    if missing:
        return f"missing {', '.join(missing)} (pycocoevalcap downloads SPICE's Stanford CoreNLP jars on first use)"
    return None


def _ptb_tokenize(
    predictions: dict[str, str], references: dict[str, list[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Tokenise references and predictions in one PTBTokenizer call (one JVM start instead of two).

    https://github.com/salaniz/pycocoevalcap/blob/master/tokenizer/ptbtokenizer.py
    """
    # The tokenizer reads one caption per line: fold every kind of line break (not only "\n") into spaces.
    captions = {("ref", i): [{"caption": " ".join(c.split())} for c in refs] for i, refs in references.items()}
    captions.update({("pred", i): [{"caption": " ".join(c.split())}] for i, c in predictions.items()})
    tokenized = ptbtokenizer.PTBTokenizer().tokenize(captions)
    # PTBTokenizer does not check java's exit status; a failed run shows up as missing lines.
    missing = [key for key, value in captions.items() if len(tokenized.get(key, [])) != len(value)]
    if missing:
        raise _JavaOutputError(f"PTBTokenizer returned no tokens for {len(missing)} of {len(captions)} entries")
    gts = {i: tokenized[("ref", i)] for i in references}
    res = {i: tokenized[("pred", i)] for i in references}
    return gts, res


def _tokenize(
    predictions: dict[str, str], references: dict[str, list[str]], tokenize: bool, skipped: dict[str, str]
) -> tuple[dict[str, list[str]], dict[str, list[str]], str]:
    """Captions as pycocoevalcap's scorers take them, and the tokenizer used.

    PTBTokenizer when its Java part runs; otherwise `simple_tokenize`, with the reason added to `skipped`.
    """
    if not tokenize:
        return dict(references), {i: [predictions[i]] for i in references}, "none"
    reason = _java_unavailable(_PTB_JARS)
    if reason is None:
        try:
            return *_ptb_tokenize(predictions, references), "PTBTokenizer"
        except (OSError, subprocess.SubprocessError, _JavaOutputError) as error:
            reason = f"{type(error).__name__}: {error}"
    skipped["PTBTokenizer"] = f"{reason}; fell back to simple_tokenize"
    gts = {i: [simple_tokenize(c) for c in refs] for i, refs in references.items()}
    res = {i: [simple_tokenize(predictions[i])] for i in references}
    return gts, res, "simple_tokenize"


def _meteor_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    """Corpus METEOR from pycocoevalcap's Meteor wrapper (one JVM, ~8 s to load its paraphrase table).

    https://github.com/salaniz/pycocoevalcap/blob/master/meteor/meteor.py
    """
    meteor = meteor_module.Meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    except ValueError as error:  # float("") on an empty reply: the Java process died mid-way
        raise _JavaOutputError(f"METEOR returned no score ({error})") from error
    finally:
        if meteor.lock.locked():  # compute_score failed half-way, holding the lock that Meteor.__del__ acquires
            meteor.lock.release()
            _stop(meteor.meteor_p)


def _stop(process: subprocess.Popen) -> None:
    """Kill a failed Java process and close its stdin, whose unsent input would break Meteor.__del__'s close."""
    process.kill()
    process.wait()
    with contextlib.suppress(BrokenPipeError):  # close() still closes the pipe when its final flush fails
        process.stdin.close()


def _spice_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    """Corpus SPICE from pycocoevalcap's Spice wrapper; call only when `_SPICE_JARS` exist (it downloads otherwise).

    https://github.com/salaniz/pycocoevalcap/blob/master/spice/spice.py
    """
    try:
        return float(spice_module.Spice().compute_score(gts, res)[0])
    except json.JSONDecodeError as error:  # SPICE exited 0 but wrote no results
        raise _JavaOutputError(f"SPICE wrote no readable results ({error})") from error


def _java_metric(
    name: str,
    score_fn: Callable[[dict[str, list[str]], dict[str, list[str]]], float],
    jars: tuple[Path, ...],
    gts: dict[str, list[str]],
    res: dict[str, list[str]],
    skipped: dict[str, str],
) -> float | None:
    """`score_fn(gts, res)`, or None with the reason added to `skipped` when its Java part is missing or fails."""
    reason = _java_unavailable(jars)
    if reason is None:
        try:
            return score_fn(gts, res)
        except (OSError, subprocess.SubprocessError, _JavaOutputError) as error:
            reason = f"{type(error).__name__}: {error}"
    skipped[name] = reason
    return None


def compute_caption_metrics(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    tokenize: bool = True,
    names: tuple[str, ...] = METRIC_NAMES,
) -> dict:
    """COCO caption metrics of `predictions` against `references`, as pycocoevalcap's COCOEvalCap computes them.

    https://github.com/salaniz/pycocoevalcap/blob/master/eval.py

    Args:
        predictions: One caption per image id.
        references: A non-empty list of reference captions per image id; the same ids as `predictions`.
        tokenize: PTB-tokenise (lowercase, punctuation removed) both sides first, as COCOEvalCap does; False when
            the captions are tokenised already.
        names: the metrics to compute (of `METRIC_NAMES`); the others are left out of the result.

    Returns:
        `Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr`, `SPICE` (pycocoevalcap's names), each a float or None;
        `skipped`: {name: reason} for every Java part that could not run (`PTBTokenizer` included, in which case
        `simple_tokenize` was used); `tokenizer`: `"PTBTokenizer"`, `"simple_tokenize"` or `"none"`.

    Raises:
        ValueError: If an image id is in only one of the dicts or has no reference captions.
    """
    _validate_inputs(predictions, references)
    unknown = sorted(set(names) - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"Unknown metrics {unknown}; choose from {METRIC_NAMES}")
    skipped: dict[str, str] = {}
    gts, res, tokenizer = _tokenize(predictions, references, tokenize, skipped)
    result: dict = {}
    if any(name.startswith("Bleu") for name in names):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        result.update({f"Bleu_{n + 1}": float(score) for n, score in enumerate(bleu) if f"Bleu_{n + 1}" in names})
    if "METEOR" in names:
        result["METEOR"] = _java_metric("METEOR", _meteor_score, _METEOR_JARS, gts, res, skipped)
    if "ROUGE_L" in names:
        result["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in names:
        result["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if "SPICE" in names:
        result["SPICE"] = _java_metric("SPICE", _spice_score, _SPICE_JARS, gts, res, skipped)
    for name, reason in skipped.items():
        logger.warning("%s skipped: %s", name, reason)
    result.update(skipped=skipped, tokenizer=tokenizer)
    return result


def load_caption_metric():
    """The offline `evaluate` module wrapping `compute_caption_metrics` (`evaluate.load("bleu")` needs the Hub).

    Returns:
        An `evaluate.Metric` whose `compute(predictions=list[str], references=list[list[str]])` returns
        `compute_caption_metrics`'s dict.
    """
    import evaluate  # heavy (datasets, pyarrow); only needed here

    return evaluate.load(str(Path(__file__).parent / "caption_metrics"))


# ----------------------------------------------------------------------------------------------------------------
# Fast CIDEr-D for SCST rewards.
# Follows https://github.com/salaniz/pycocoevalcap/blob/master/cider/cider_scorer.py exactly (n = 4, sigma = 6,
# tf-idf with idf = log(#images) - log(max(1, df)), clipped numerator, Gaussian penalty on the length counted in
# bigrams, mean over orders and references, x10), with the document frequencies fixed once from a reference corpus.


def _ngram_counts(sentence: str, n: int) -> Counter:
    """Counts of every 1..n-gram (as word tuples) of a tokenised sentence, as cider_scorer.precook."""
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D with document frequencies from a fixed reference corpus, scoring many candidates at once.

    `CiderD(refs).score(cands, ids)` equals pycocoevalcap's per-image `Cider().compute_score(refs, res)[1]` when
    `res` holds one candidate for every image of `refs` (pycocoevalcap takes the frequencies from the scored
    images' references). Captions must be tokenised already (e.g. with `simple_tokenize`).

    The reference side is precomputed: every (image, n-gram) pair of the corpus is a row of `_ref_weights`,
    `(n_pairs, max_refs)`, holding the tf-idf weight of that n-gram in each reference (0 for padding), so one
    batch of candidates is scored with a handful of array operations.

    Args:
        references: Tokenised reference captions per image id, each list non-empty.
        n: Largest n-gram order.
        sigma: Standard deviation of the Gaussian length penalty.

    Raises:
        ValueError: If an image has no reference captions.
    """

    def __init__(self, references: dict[str, list[str]], n: int = 4, sigma: float = 6.0):
        for image_id, refs in references.items():
            if isinstance(refs, str) or not refs:
                raise ValueError(f"Image id {image_id!r} needs a non-empty list of reference captions, got {refs!r}")
        self.n, self.sigma = n, sigma
        self._image_index = {image_id: k for k, image_id in enumerate(references)}
        counts = [[_ngram_counts(ref, n) for ref in refs] for refs in references.values()]
        self._vocab: dict[tuple[str, ...], int] = {}
        document_frequency: list[int] = []
        for image_counts in counts:
            for ngram in {ngram for ref in image_counts for ngram in ref}:
                index = self._vocab.setdefault(ngram, len(self._vocab))
                if index == len(document_frequency):
                    document_frequency.append(0)
                document_frequency[index] += 1
        log_num_images = np.log(float(len(references)))
        # The last slot is for n-grams outside the corpus: df 0, so idf = log(#images) - log(max(1, 0)).
        self._idf = np.append(log_num_images - np.log(np.maximum(1.0, document_frequency)), log_num_images)
        self._orders = np.array([len(ngram) - 1 for ngram in self._vocab] + [0])
        self._build_reference_arrays(counts)

    def _build_reference_arrays(self, counts: list[list[Counter]]) -> None:
        """Tf-idf weights, norms and lengths of every reference, padded to the largest number of references."""
        num_images, max_refs, stride = len(counts), max(len(image_counts) for image_counts in counts), len(self._idf)
        keys, ngram_ids, tf_blocks = [], [], []
        self._ref_lengths = np.zeros((num_images, max_refs))  # (I, R), in bigrams as cider_scorer counts length
        self._num_refs = np.array([len(image_counts) for image_counts in counts])  # (I,)
        for image, image_counts in enumerate(counts):
            ids = sorted({self._vocab[ngram] for ref in image_counts for ngram in ref})
            column = {ngram_id: row for row, ngram_id in enumerate(ids)}
            block = np.zeros((len(ids), max_refs))  # (V_image, R)
            for r, ref in enumerate(image_counts):
                for ngram, term_freq in ref.items():
                    block[column[self._vocab[ngram]], r] = term_freq
                self._ref_lengths[image, r] = sum(tf for ngram, tf in ref.items() if len(ngram) == 2)
            keys.append(image * stride + np.array(ids, dtype=np.int64))
            ngram_ids.append(np.array(ids, dtype=np.int64))
            tf_blocks.append(block)
        # Sorted by (image, n-gram id) since images come in order and ids are sorted within each: searchsorted works.
        self._pair_keys = np.concatenate(keys)  # (P,)
        pair_ngrams = np.concatenate(ngram_ids)  # (P,)
        self._ref_weights = np.concatenate(tf_blocks) * self._idf[pair_ngrams, None]  # (P, R)
        pair_images = self._pair_keys // stride  # (P,)
        bins = pair_images * self.n + self._orders[pair_ngrams]  # (P,) one bin per (image, order)
        squared = [
            np.bincount(bins, self._ref_weights[:, r] ** 2, minlength=num_images * self.n) for r in range(max_refs)
        ]
        self._ref_norms = np.sqrt(np.stack(squared, axis=-1)).reshape(num_images, self.n, max_refs)  # (I, n, R)

    def _candidate_arrays(self, candidates: list[str]) -> tuple[np.ndarray, ...]:
        """Flat (candidate, n-gram) entries: candidate index, n-gram id, order, term frequency; and lengths."""
        rows, ngram_ids, orders, term_freqs, lengths = [], [], [], [], []
        unknown = len(self._idf) - 1
        for row, candidate in enumerate(candidates):
            counts = _ngram_counts(candidate, self.n)
            for ngram, term_freq in counts.items():
                rows.append(row)
                ngram_ids.append(self._vocab.get(ngram, unknown))
                orders.append(len(ngram) - 1)
                term_freqs.append(term_freq)
            lengths.append(sum(tf for ngram, tf in counts.items() if len(ngram) == 2))
        return (
            np.array(rows, dtype=np.int64),
            np.array(ngram_ids, dtype=np.int64),
            np.array(orders, dtype=np.int64),
            np.array(term_freqs, dtype=float),
            np.array(lengths, dtype=float),
        )

    def score(self, candidates: list[str], image_ids: list[str]) -> np.ndarray:
        """CIDEr-D of each tokenised candidate against the references of its image.

        Args:
            candidates: Tokenised captions, e.g. batch x samples of SCST.
            image_ids: The image id of each candidate; every id must be in the reference corpus.

        Returns:
            Scores, shape `(len(candidates),)`, on pycocoevalcap's scale (10 x mean over orders and references).

        Raises:
            ValueError: If the lengths differ or an image id is not in the reference corpus.
        """
        if len(candidates) != len(image_ids):
            raise ValueError(f"Got {len(candidates)} candidates but {len(image_ids)} image ids")
        unknown = [image_id for image_id in image_ids if image_id not in self._image_index]
        if unknown:
            raise ValueError(f"Image id {unknown[0]!r} is not in the CiderD reference corpus")
        images = np.array([self._image_index[image_id] for image_id in image_ids], dtype=np.int64)  # (C,)
        rows, ngram_ids, orders, term_freqs, lengths = self._candidate_arrays(candidates)
        num_candidates, max_refs = len(candidates), self._ref_weights.shape[1]
        bins = rows * self.n + orders  # (M,) one bin per (candidate, order)

        weights = term_freqs * self._idf[ngram_ids]  # (M,)
        norms = np.sqrt(np.bincount(bins, weights**2, minlength=num_candidates * self.n))
        norms = norms.reshape(num_candidates, self.n, 1)  # (C, n, 1)

        # Reference weight of each candidate n-gram in each reference of its image; 0 where the image lacks it.
        keys = images[rows] * len(self._idf) + ngram_ids  # (M,)
        positions = np.minimum(np.searchsorted(self._pair_keys, keys), len(self._pair_keys) - 1)
        found = self._pair_keys[positions] == keys
        ref_weights = np.where(found[:, None], self._ref_weights[positions], 0.0)  # (M, R)
        # cider_scorer.sim's clipping: min(vec_hyp, vec_ref) * vec_ref
        clipped = np.minimum(weights[:, None], ref_weights) * ref_weights  # (M, R)
        numerator = np.zeros((num_candidates * self.n, max_refs))
        np.add.at(numerator, bins, clipped)
        numerator = numerator.reshape(num_candidates, self.n, max_refs)  # (C, n, R)

        # cider_scorer.sim divides only when both norms are non-zero; the numerator is 0 otherwise.
        denominator = norms * self._ref_norms[images]  # (C, n, R)
        cosine = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)
        delta = lengths[:, None] - self._ref_lengths[images]  # (C, R)
        penalty = np.exp(-(delta**2) / (2 * self.sigma**2))  # (C, R); padded references have 0 cosine
        total = (cosine * penalty[:, None, :]).sum(axis=(1, 2))  # (C,)
        return total / self.n / self._num_refs[images] * 10.0


class TokenizedCiderD(CiderD):
    """CIDEr-D on raw captions: references and candidates pass through the same `simple_tokenize`."""

    def __init__(self, references: dict[str, list[str]]):
        super().__init__({i: [simple_tokenize(c) for c in refs] for i, refs in references.items()})

    def score(self, candidates: list[str], image_ids: list[str]):
        return super().score([simple_tokenize(c) for c in candidates], image_ids)
