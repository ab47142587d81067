"""Scoring script for the diabetes regression model, as Azure ML runs it (init() / run(raw_data)).

Request:  {"data": [[age, sex, bmi, bp, s1, s2, s3, s4, s5, s6], ...]}  (scikit-learn's standardized features)
Answer:   [151.2, 98.7, ...]  a bare list: the predicted disease progression per row
"""
import json
import logging
import os
from pathlib import Path

import joblib
import numpy as np

model = None
log = logging.getLogger("diabetes-regression")


def init():
    global model
    root = Path(os.environ.get("AZUREML_MODEL_DIR", "."))
    # a folder model appears under its folder's name (as on Azure), a file model directly under AZUREML_MODEL_DIR
    path = next(iter(sorted(root.glob("**/model.joblib"))), None)
    if path is None:
        raise FileNotFoundError(f"model.joblib not found under {root}")
    model = joblib.load(path)
    log.info("diabetes model loaded from %s", path)


def run(raw_data):
    rows = np.asarray(json.loads(raw_data)["data"], dtype=float)
    if rows.ndim != 2 or rows.shape[1] != 10:
        raise ValueError(f"expected rows of 10 features, got shape {rows.shape}")
    return [round(float(v), 4) for v in model.predict(rows)]
