"""COCO caption metrics (pycocoevalcap) as a local `evaluate` module that loads offline.

    >>> import evaluate
    >>> metric = evaluate.load("modeling_fsgr_pma/caption_metrics")
    >>> metric.compute(predictions=["a red circle"], references=[["a red circle", "a circle that is red"]])
"""

import datasets
import evaluate

from modeling_fsgr_pma.metrics import compute_caption_metrics

_DESCRIPTION = "BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE from pycocoevalcap; skipped metrics are None."


class CaptionMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Chen et al., Microsoft COCO Captions: Data Collection and Evaluation Server, 2015",
            inputs_description="predictions: list of str; references: list of lists of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        ids = [str(i) for i in range(len(predictions))]
        return compute_caption_metrics(dict(zip(ids, predictions)), dict(zip(ids, references)))
