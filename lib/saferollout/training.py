"""Train and save the credit model: an sklearn pipeline whose family is a parameter.

The saved model is a folder `model/` holding `model.joblib` and `metadata.json` (features, threshold,
family, held-out metrics). Registered as a folder model, it appears on an instance as
`$AZUREML_MODEL_DIR/model/...`, which is where the example scoring script looks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from saferollout.data import CATEGORICAL_FEATURES, FEATURES, NUMERIC_FEATURES, Split
from saferollout.errors import SpecError

MODEL_FAMILIES = ("logistic_regression", "gradient_boosting")


def build_pipeline(family: str, seed: int = 42) -> Pipeline:
    """The preprocessing + classifier pipeline for a model family."""
    if family == "logistic_regression":
        classifier: Any = LogisticRegression(max_iter=2000, C=1.0)
    elif family == "gradient_boosting":
        classifier = GradientBoostingClassifier(n_estimators=150, max_depth=3, learning_rate=0.05,
                                                random_state=seed)
    else:
        raise SpecError(f"unknown model_family {family!r}: choose one of {', '.join(MODEL_FAMILIES)}")
    preprocess = ColumnTransformer([
        ("numeric", StandardScaler(), list(NUMERIC_FEATURES)),
        ("categorical", OneHotEncoder(handle_unknown="ignore"), list(CATEGORICAL_FEATURES)),
    ])
    return Pipeline([("preprocess", preprocess), ("classifier", classifier)])


@dataclass
class TrainedModel:
    family: str
    pipeline: Pipeline
    metrics: dict[str, float]
    test_probabilities: np.ndarray
    threshold: float = 0.5
    params: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        """Write `folder/model.joblib` and `folder/metadata.json`; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.pipeline, folder / "model.joblib")
        meta = {"family": self.family, "features": list(FEATURES), "threshold": self.threshold,
                "metrics": self.metrics, "params": self.params}
        (folder / "metadata.json").write_text(json.dumps(meta, indent=2))
        return folder


def evaluate(y_true: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Held-out metrics: AUC, accuracy at the threshold, log loss."""
    return {"auc": round(float(roc_auc_score(y_true, probabilities)), 6),
            "accuracy": round(float(accuracy_score(y_true, probabilities >= threshold)), 6),
            "log_loss": round(float(log_loss(y_true, probabilities, labels=[0, 1])), 6)}


def train(family: str, data: Split, seed: int = 42) -> TrainedModel:
    """Fit the pipeline on the training rows and score it on the held-out rows."""
    pipeline = build_pipeline(family, seed)
    pipeline.fit(data.X_train, data.y_train)
    probabilities = pipeline.predict_proba(data.X_test)[:, 1]
    return TrainedModel(family=family, pipeline=pipeline, metrics=evaluate(data.y_test.to_numpy(), probabilities),
                        test_probabilities=probabilities, params={"seed": seed, "family": family})
