"""exact_match as an `evaluate` metric script, found in the working directory: lm-evaluation-harness 0.4.1 loads
it when it is imported (``evaluate.load("exact_match")``), from the hub unless a script of that name is here. Our
task does not use it; run lm_eval from tests/eval_task/ so that nothing is downloaded."""

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="the share of predictions equal to their reference",
            citation="",
            inputs_description="predictions and references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, **_options):
        pairs = list(zip(predictions, references, strict=True))
        return {"exact_match": sum(p == r for p, r in pairs) / len(pairs) if pairs else 0.0}
