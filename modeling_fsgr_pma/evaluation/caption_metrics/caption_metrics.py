"""COCO caption metrics (pycocoevalcap) as a local `evaluate` module that loads offline.

`evaluate.load("bleu")` fetches its script from the Hub; this directory holds a script of the same name, which
`evaluate.load(path_to_this_directory)` imports without the network (also with HF_HUB_OFFLINE=1):

    >>> from modeling_fsgr_pma.evaluation.metrics import load_caption_metric
    >>> metric = load_caption_metric()
    >>> metric.compute(predictions=["a red circle"], references=[["a red circle", "a circle that is red"]])
"""

import datasets
import evaluate

from modeling_fsgr_pma.evaluation.metrics import compute_caption_metrics

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

_DESCRIPTION = """\
BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE as pycocoevalcap (https://github.com/salaniz/pycocoevalcap)
computes them, after PTB tokenisation. A metric whose Java part cannot run offline (SPICE without its Stanford
CoreNLP jars) is None, with the reason under "skipped".
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one caption per image.
    references: list of lists of str, the non-empty reference captions of each image.
    tokenize: bool, PTB-tokenise both sides first (default True).
Returns:
    Bleu_1, Bleu_2, Bleu_3, Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE: float or None;
    skipped: {name: reason}; tokenizer: the tokenizer used.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionMetrics(evaluate.Metric):
    """pycocoevalcap's COCO caption metrics over a corpus of (prediction, references) pairs."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=["https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(self, predictions: list[str], references: list[list[str]], tokenize: bool = True) -> dict:
        # Image ids are the row numbers, so a ValueError about bad input names the row.
        ids = [str(row) for row in range(len(predictions))]
        return compute_caption_metrics(dict(zip(ids, predictions)), dict(zip(ids, references)), tokenize=tokenize)
