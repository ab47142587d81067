"""The scoring script of a no-code MLflow deployment: what an instance runs when the deployment has no
`code_configuration` and its model is an MLflow model (a folder with an `MLmodel` file).

Azure generates this script for such a deployment; locally this module stands in for it, under the same
`azmlinfsrv`, with the model loaded by MLflow's own `mlflow.pyfunc.load_model`. It reads and answers as
Azure's does:

- the model is `$AZUREML_MODEL_DIR/$MLFLOW_MODEL_FOLDER` (without `MLFLOW_MODEL_FOLDER`, the one folder in
  `AZUREML_MODEL_DIR` that holds an `MLmodel` file);
- the request body holds `input_data`, one of: a pandas DataFrame in the split orientation
  (`{"columns": [...], "index": [...], "data": [[...], ...]}`), a list (a tensor: a numpy array), or a
  mapping of names to lists (named tensors); an optional `params` mapping goes to `predict(..., params=)`;
- the answer is the prediction made JSON as Azure's MLflow scoring script makes it: an array becomes a list
  (a regressor's `[12.5, 8.1]`, a classifier's `[0, 1]`), a DataFrame a list of records, a mapping of arrays
  a mapping of lists. MLflow's own `mlflow models serve` wraps that in `{"predictions": ...}`; Azure does not.
- a request the model cannot take (not JSON, no `input_data`, columns or shapes the model refuses) is
  answered 400 with a message that says what is wrong; Azure answers 500 there, and both endpoints answer
  the client 424 (the model server's answer was not 200).

    python -m saferollout.backends.local.inference_server --entry_script <this file>
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MLMODEL_FILE = "MLmodel"
MAX_REASON = 1000  # characters of the model's own reason kept in a 400's message
_model: Any = None


def model_path() -> Path:
    """Where the deployment's MLflow model is, as Azure's scoring script finds it."""
    root = Path(os.environ.get("AZUREML_MODEL_DIR") or ".")
    folder = os.environ.get("MLFLOW_MODEL_FOLDER")
    if folder:
        return root / folder
    if (root / MLMODEL_FILE).is_file():
        return root
    found = sorted(p.parent for p in root.glob(f"*/{MLMODEL_FILE}"))
    if len(found) != 1:
        raise RuntimeError(f"no-code MLflow deployment: expected one folder with an {MLMODEL_FILE} file in "
                           f"AZUREML_MODEL_DIR ({root}), found {len(found)}; set MLFLOW_MODEL_FOLDER")
    return found[0]


def init() -> None:
    global _model
    import mlflow.pyfunc

    _model = mlflow.pyfunc.load_model(str(model_path()))


class BadInput(ValueError):
    """The request is not one the model can score: answered 400."""


def model_input(body: Any) -> tuple[Any, dict | None]:
    """The request body -> (what `predict` takes, params), as Azure's MLflow scoring script reads it."""
    import numpy as np
    import pandas as pd

    if not isinstance(body, dict) or "input_data" not in body:
        raise BadInput('the request must be a JSON object with the key "input_data": {"input_data": {"columns": '
                       '[...], "index": [...], "data": [[...]]}} or {"input_data": [[...], ...]}')
    data, params = body["input_data"], body.get("params")
    if params is not None and not isinstance(params, dict):
        raise BadInput(f'"params" must be a JSON object, got {type(params).__name__}')
    if isinstance(data, list):
        return np.asarray(data), params
    if isinstance(data, dict) and {"columns", "index", "data"} <= set(data):
        try:
            return pd.DataFrame(data=data["data"], columns=data["columns"], index=data["index"]), params
        except (ValueError, TypeError) as exc:
            raise BadInput(f"input_data is not a DataFrame in the split orientation: {exc}") from None
    if isinstance(data, dict) and data:
        return {name: np.asarray(value) for name, value in data.items()}, params
    raise BadInput("input_data must be a DataFrame in the split orientation ({\"columns\", \"index\", \"data\"}), "
                   f"a list, or a mapping of names to lists; got {type(data).__name__}")


def jsonable(result: Any) -> Any:
    """A prediction as JSON: arrays and Series as lists, a DataFrame as records, mappings item by item."""
    import numpy as np
    import pandas as pd

    if isinstance(result, pd.DataFrame):
        return json.loads(result.to_json(orient="records"))
    if isinstance(result, (pd.Series, np.ndarray)):
        return np.asarray(result).tolist()
    if isinstance(result, dict):
        return {str(k): jsonable(v) for k, v in result.items()}
    if isinstance(result, np.generic):
        return result.item()
    return result


def predict(raw_data: str | bytes) -> Any:
    """The answer to one request; BadInput if the model cannot take it."""
    from mlflow.exceptions import MlflowException

    try:
        body = json.loads(raw_data)
    except ValueError as exc:
        raise BadInput(f"the request is not JSON: {exc}") from None
    data, params = model_input(body)
    try:
        result = _model.predict(data, params=params) if params else _model.predict(data)
    except MlflowException as exc:  # the model's signature refused the input
        # MLflow's message quotes the whole input before its reason ("... Error: Model is missing inputs [...]")
        reason = exc.message.rsplit("Error: ", 1)[-1]
        raise BadInput(f"the model refused the input: {reason[:MAX_REASON]}") from None
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # e.g. the wrong number of features
        raise BadInput(f"the model could not score the input: {type(exc).__name__}: {str(exc)[:MAX_REASON]}") from None
    return jsonable(result)


def run(raw_data: str | bytes) -> Any:
    from azureml_inference_server_http.api.aml_response import AMLResponse

    try:
        return predict(raw_data)
    except BadInput as exc:
        return AMLResponse({"message": str(exc)}, 400, json_str=True)
