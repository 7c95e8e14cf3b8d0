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


def per_class_report(predictions: list[int], labels: list[int], names: list[str]) -> list[dict[str, float | str]]:
    """Precision, recall, F1 and support of every class (a row per class, in ``names`` order)."""
    rows = []
    for cls, name in enumerate(names):
        tp = sum(p == cls and y == cls for p, y in zip(predictions, labels))
        predicted, actual = predictions.count(cls), labels.count(cls)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * tp / (predicted + actual) if predicted + actual else 0.0
        rows.append({"label": name, "precision": precision, "recall": recall, "f1": f1, "support": actual})
    return rows


def confusion_matrix(predictions: list[int], labels: list[int], num_labels: int) -> list[list[int]]:
    """counts[true][predicted]."""
    counts = [[0] * num_labels for _ in range(num_labels)]
    for p, y in zip(predictions, labels):
        counts[y][p] += 1
    return counts


def normalise_whitespace(text: str) -> str:
    """Runs of whitespace as one space, none at the ends: what generation metrics compare."""
    return " ".join(text.split())


def generation_metrics(completions: list[str], references: list[str]) -> dict[str, float]:
    """exact_match: the share of completions equal to their reference; contains: the share in which the
    reference appears. Both after :func:`normalise_whitespace`, case-sensitive; an empty list scores 0."""
    pairs = [(normalise_whitespace(c), normalise_whitespace(r)) for c, r in zip(completions, references, strict=True)]
    if not pairs:
        return {"exact_match": 0.0, "contains": 0.0}
    return {"exact_match": sum(c == r for c, r in pairs) / len(pairs),
            "contains": sum(r in c for c, r in pairs) / len(pairs)}
