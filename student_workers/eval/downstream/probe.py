"""Linear probe on frozen features (docs/methods.md#downstream-evaluation): mean-pooled embedding,
LayerNorm, then a linear classifier (scikit-learn's multinomial logistic regression)."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler


def layer_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Parameter-free LayerNorm over the feature axis: (N, D) -> (N, D)."""
    mu = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
    seed: int = 0, C: float = 1.0, max_iter: int = 1000,
) -> dict[str, float]:
    """Fit on train, score on test: ``{"accuracy", "macro_f1"}``. The StandardScaler after the
    LayerNorm only conditions the lbfgs solve (it is an affine map a linear classifier absorbs)."""
    clf = make_pipeline(
        FunctionTransformer(layer_norm), StandardScaler(),
        LogisticRegression(C=C, max_iter=max_iter, random_state=seed),
    )
    clf.fit(train_x, train_y)
    pred = clf.predict(test_x)
    return {"accuracy": float(accuracy_score(test_y, pred)),
            "macro_f1": float(f1_score(test_y, pred, average="macro", zero_division=0))}


def majority_accuracy(train_y: np.ndarray, test_y: np.ndarray) -> float:
    """The floor a probe must beat: always predict the most frequent training class."""
    return float((test_y == np.bincount(train_y).argmax()).mean())
