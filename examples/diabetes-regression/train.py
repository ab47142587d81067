"""Train the example regression model: scikit-learn's diabetes data (disease progression a year after baseline).

    python train.py OUT_DIR [--alpha 1.0] [--constant]

Writes OUT_DIR/model.joblib (a Ridge regression on the ten standardized features). `--constant` writes a
model that answers the training mean for every row: nonsense that still answers 200 in the right shape, for
seeing the prediction-agreement gate roll it back. The last 80 rows are held out: requests.jsonl holds them.
"""
import argparse
from pathlib import Path

import joblib
from sklearn.datasets import load_diabetes
from sklearn.dummy import DummyRegressor
from sklearn.linear_model import Ridge

HELD_OUT = 80


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--alpha", type=float, default=1.0, help="Ridge regularization (default 1.0)")
    parser.add_argument("--constant", action="store_true", help="answer the training mean for every row")
    args = parser.parse_args()
    X, y = load_diabetes(return_X_y=True)
    model = DummyRegressor(strategy="mean") if args.constant else Ridge(alpha=args.alpha)
    model.fit(X[:-HELD_OUT], y[:-HELD_OUT])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out / "model.joblib")
    print(f"{type(model).__name__} saved to {out / 'model.joblib'}")


if __name__ == "__main__":
    main()
