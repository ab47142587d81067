"""MLflow models for the tests: scikit-learn's diabetes regression saved with `mlflow.sklearn.save_model`.

The data ship with scikit-learn (nothing is downloaded). Requests are in the shape Azure's no-code MLflow
deployment takes: `{"input_data": {"columns": [...], "index": [...], "data": [[...], ...]}}`.
"""
from __future__ import annotations

import json
from pathlib import Path

HELD_OUT = 80


def save_diabetes_model(folder: Path, *, alpha: float = 1.0, constant: bool = False) -> Path:
    """A Ridge regression (or, with `constant`, the training mean for every row) saved as an MLflow model
    with its signature (the ten named columns) at `folder`, which must not exist yet."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_diabetes
    from sklearn.dummy import DummyRegressor
    from sklearn.linear_model import Ridge

    X, y = load_diabetes(return_X_y=True, as_frame=True)
    model = DummyRegressor(strategy="mean") if constant else Ridge(alpha=alpha)
    model.fit(X[:-HELD_OUT], y[:-HELD_OUT])
    mlflow.sklearn.save_model(model, str(folder), signature=infer_signature(X[:5], model.predict(X[:5])))
    return folder


def diabetes_requests(rows_per_request: int = 2, count: int = 40) -> list[dict]:
    """Request bodies over the held-out rows, as a DataFrame in the split orientation."""
    from sklearn.datasets import load_diabetes

    X, _ = load_diabetes(return_X_y=True, as_frame=True)
    held_out = X[-HELD_OUT:]
    bodies = []
    for start in range(0, min(len(held_out), rows_per_request * count), rows_per_request):
        frame = held_out[start:start + rows_per_request]
        bodies.append({"input_data": json.loads(frame.to_json(orient="split"))})
    return bodies
