"""The gradient-boosted trees the shipped models are: the classifiers (models/drain, models/prefetch)
and the scaling regressor (models/scaling)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def fit_boosted_trees(
    X: npt.NDArray[np.float32],
    y: npt.NDArray[np.int8],
    *,
    max_iter: int,
    learning_rate: float,
    max_leaf_nodes: int,
    min_samples_leaf: int,
    l2_regularization: float,
    seed: int,
    threads: int,
) -> Any:
    """A seeded HistGradientBoostingClassifier fitted on X, y with `threads` threads, no early
    stopping (the same rows give the same model, and the same ONNX bytes)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return _fit(
        HistGradientBoostingClassifier,
        X,
        y,
        threads,
        max_iter=max_iter,
        learning_rate=learning_rate,
        max_leaf_nodes=max_leaf_nodes,
        min_samples_leaf=min_samples_leaf,
        l2_regularization=l2_regularization,
        random_state=seed,
    )


def fit_boosted_regressor(
    X: npt.NDArray[np.float32],
    y: npt.NDArray[np.float64],
    *,
    max_iter: int,
    learning_rate: float,
    max_leaf_nodes: int,
    min_samples_leaf: int,
    l2_regularization: float,
    seed: int,
    threads: int,
) -> Any:
    """A seeded HistGradientBoostingRegressor (squared error) fitted like `fit_boosted_trees`."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    return _fit(
        HistGradientBoostingRegressor,
        X,
        y,
        threads,
        max_iter=max_iter,
        learning_rate=learning_rate,
        max_leaf_nodes=max_leaf_nodes,
        min_samples_leaf=min_samples_leaf,
        l2_regularization=l2_regularization,
        random_state=seed,
    )


def _fit(estimator: Any, X: npt.NDArray[np.float32], y: npt.NDArray[Any], threads: int, **params: Any) -> Any:
    from threadpoolctl import threadpool_limits

    model = estimator(early_stopping=False, **params)
    with threadpool_limits(threads):
        model.fit(X, y)
    return model
