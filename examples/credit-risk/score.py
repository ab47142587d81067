"""Scoring script for the German credit model, as it would run on Azure ML (init() / run(raw_data)).

Request:  {"data": [{"age": 35, "sex": "male", ...}, ...]}
          or Azure's split form {"input_data": {"columns": [...], "data": [[...], ...]}}
Answer:   {"predictions": [1, 0, ...], "probabilities": [0.83, 0.27, ...], "model": "<name:version>"}
          (prediction 1 = good credit; probability = P(good credit))

Fault injection for demos and tests lives here, in the example model server only, driven by the
deployment's environment_variables:
  SAFEROLLOUT_FAULT=none|errors|latency|crash|flip
  SAFEROLLOUT_FAULT_ERROR_RATE   share of requests that fail with a server error (default 0.2)
  SAFEROLLOUT_FAULT_LATENCY_MS   added latency per request (default 250)
"""
import json
import logging
import os
import random
import time
from pathlib import Path

import joblib
import pandas as pd

model = None
metadata = {}
fault = "none"
log = logging.getLogger("credit-risk")


def _model_folder() -> Path:
    root = Path(os.environ.get("AZUREML_MODEL_DIR", "."))
    for candidate in (root / "model", root):
        if (candidate / "model.joblib").is_file():
            return candidate
    raise FileNotFoundError(f"model.joblib not found under {root}")


def init():
    global model, metadata, fault
    fault = os.environ.get("SAFEROLLOUT_FAULT", "none").strip().lower() or "none"
    if fault not in ("none", "errors", "latency", "crash", "flip"):
        raise ValueError(f"unknown SAFEROLLOUT_FAULT {fault!r}")
    if fault == "crash":
        raise RuntimeError("injected fault: init() crashes (SAFEROLLOUT_FAULT=crash)")
    folder = _model_folder()
    model = joblib.load(folder / "model.joblib")
    meta_path = folder / "metadata.json"
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    log.info("credit model loaded from %s (fault=%s)", folder, fault)


def _frame(payload):
    if "input_data" in payload:
        block = payload["input_data"]
        return pd.DataFrame(block["data"], columns=block["columns"])
    rows = payload["data"]
    if isinstance(rows, dict):
        rows = [rows]
    return pd.DataFrame(rows)


def run(raw_data):
    payload = json.loads(raw_data) if isinstance(raw_data, (str, bytes)) else raw_data
    if fault == "latency":
        time.sleep(float(os.environ.get("SAFEROLLOUT_FAULT_LATENCY_MS", "250")) / 1000.0)
    if fault == "errors" and random.random() < float(os.environ.get("SAFEROLLOUT_FAULT_ERROR_RATE", "0.2")):
        raise RuntimeError("injected fault: request failed (SAFEROLLOUT_FAULT=errors)")
    frame = _frame(payload)
    features = metadata.get("features")
    if features:
        missing = [f for f in features if f not in frame.columns]
        if missing:
            raise ValueError(f"missing feature(s): {', '.join(missing)}")
        frame = frame[features]
    probabilities = model.predict_proba(frame)[:, 1]
    threshold = float(metadata.get("threshold", 0.5))
    if fault == "flip":
        probabilities = 1.0 - probabilities
    predictions = (probabilities >= threshold).astype(int)
    return {"predictions": predictions.tolist(),
            "probabilities": [round(float(p), 6) for p in probabilities],
            "model": metadata.get("model", "")}
