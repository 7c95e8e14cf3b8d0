"""Classification metrics over plain lists (no scikit-learn at run time)."""

from __future__ import annotations


def classification_metrics(predictions: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1; classes absent from both predictions and labels do not count towards the mean."""
    if not labels:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    correct = sum(p == y for p, y in zip(predictions, labels))
    f1s = []
    for cls in range(num_labels):
        tp = sum(p == cls and y == cls for p, y in zip(predictions, labels))
        predicted, actual = predictions.count(cls), labels.count(cls)
        if predicted == 0 and actual == 0:
            continue
        f1s.append(2 * tp / (predicted + actual))
    return {"accuracy": correct / len(labels), "macro_f1": sum(f1s) / len(f1s)}
