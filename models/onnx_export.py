"""Exporting a scikit-learn binary classifier to ONNX, the way the coordinator serves it.

Both shipped models (models/drain, models/prefetch) are gradient-boosted trees converted by
skl2onnx: one float input `features` [N, n], outputs `label` int64 [N] and `probabilities` float32
[N, 2] (column 1 the positive class), the training metadata as metadata_props, and a fixed graph
name so the same model gives the same bytes. `check_onnx` is run after every export.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

INPUT_NAME = "features"
PROB_OUTPUT = "probabilities"
LABEL_OUTPUT = "label"
MAX_ORT_DIFF = 1e-4


@contextlib.contextmanager
def hgb_converter_fix() -> Iterator[None]:
    """skl2onnx writes leaves' missing-value flag as a Python bool, which current protobuf rejects in
    an int list ("Expected an int, got a boolean"). Coerce it to int while converting; the ORT-vs-
    sklearn check after export guards against this changing anything else."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node

    @functools.wraps(original)
    def add_node(*args: Any, nodes_missing_value_tracks_true: Any = 0, **kwargs: Any) -> Any:
        return original(*args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true), **kwargs)

    tree_ensemble.add_node = add_node
    try:
        yield
    finally:
        tree_ensemble.add_node = original


def classifier_to_onnx(model: Any, n_features: int, graph_name: str, doc: str, metadata: Mapping[str, str]) -> bytes:
    """`model` as ONNX bytes (see the module's docstring)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    with hgb_converter_fix():
        onx = convert_sklearn(
            model,
            initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
            options={id(model): {"zipmap": False}},
        )
    return _finish(onx, [LABEL_OUTPUT, PROB_OUTPUT], graph_name, doc, metadata)


def _finish(onx: Any, outputs: list[str], graph_name: str, doc: str, metadata: Mapping[str, str]) -> bytes:
    """Check the converted graph's outputs, fix its name, add the doc and metadata: the bytes."""
    names = [o.name for o in onx.graph.output]
    if names != outputs:
        raise RuntimeError(f"unexpected ONNX outputs {names}")
    onx.graph.name = graph_name  # skl2onnx picks a random one: same model, same bytes
    onx.doc_string = doc
    for key, value in metadata.items():
        prop = onx.metadata_props.add()
        prop.key, prop.value = key, value
    return bytes(onx.SerializeToString())


def _session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def ort_probabilities(onnx_bytes: bytes, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    out = _session(onnx_bytes).run([PROB_OUTPUT], {INPUT_NAME: X})[0]
    return np.asarray(out[:, 1], np.float32)


def check_onnx(model: Any, onnx_bytes: bytes, X: npt.NDArray[np.float32]) -> float:
    """Max |P_onnxruntime - P_sklearn| over X; RuntimeError above MAX_ORT_DIFF."""
    diff = float(np.max(np.abs(ort_probabilities(onnx_bytes, X) - model.predict_proba(X)[:, 1]), initial=0.0))
    if diff > MAX_ORT_DIFF:
        raise RuntimeError(f"onnxruntime differs from scikit-learn by {diff:.3g} (> {MAX_ORT_DIFF})")
    return diff


REGRESSION_OUTPUT = "variable"
"""skl2onnx's name for a regressor's output: float32 [N, 1]."""


def regressor_to_onnx(model: Any, n_features: int, graph_name: str, doc: str, metadata: Mapping[str, str]) -> bytes:
    """A scikit-learn regressor as ONNX bytes: input `features` [N, n], output `variable` [N, 1],
    the metadata as metadata_props, a fixed graph name (same model, same bytes)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    with hgb_converter_fix():
        onx = convert_sklearn(model, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))])
    return _finish(onx, [REGRESSION_OUTPUT], graph_name, doc, metadata)


def ort_regression(onnx_bytes: bytes, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(_session(onnx_bytes).run([REGRESSION_OUTPUT], {INPUT_NAME: X})[0][:, 0], np.float32)


def check_regressor_onnx(model: Any, onnx_bytes: bytes, X: npt.NDArray[np.float32], tolerance: float) -> float:
    """Max |onnxruntime - scikit-learn| over X; RuntimeError above `tolerance` (float32 trees sum in
    another order than scikit-learn's float64, so the tolerance is the caller's, in its units)."""
    diff = float(np.max(np.abs(ort_regression(onnx_bytes, X) - model.predict(X)), initial=0.0))
    if diff > tolerance:
        raise RuntimeError(f"onnxruntime differs from scikit-learn by {diff:.3g} (> {tolerance})")
    return diff
