"""Top-1 and mean per-class accuracy as an `evaluate` metric module, shipped so it loads offline.

evaluate.load(dpt_peft.metrics.ACCURACY_PATH)   # evaluate.load("accuracy") would need the Hub
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy and mean per-class accuracy of integer class predictions."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): Predicted class indices.
    references (`list[int]`): True class indices.
    num_classes (`int`, optional): Size of the label space; classes without any reference are left out of the mean.
Returns:
    accuracy (`float`): Fraction of correct predictions.
    mean_per_class_accuracy (`float`): Unweighted mean over classes of each class's accuracy.
    per_class_accuracy (`list[float | None]`): Accuracy of each class (None where it has no reference).
"""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_classes=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        num_classes = num_classes or int(max(predictions.max(initial=0), references.max(initial=0)) + 1)
        per_class = []
        for label in range(num_classes):
            members = references == label
            per_class.append(float((predictions[members] == label).mean()) if members.any() else None)
        present = [value for value in per_class if value is not None]
        return {
            "accuracy": float((predictions == references).mean()) if len(references) else 0.0,
            "mean_per_class_accuracy": float(np.mean(present)) if present else 0.0,
            "per_class_accuracy": per_class,
        }
