"""ML gates: offline quality against PROD's registered metrics, and prediction agreement."""
import json

import numpy as np
import pytest

from saferollout.backends.base import MirroredPair, Model
from saferollout.gates.ml import AgreementGate, QualityGate, psi

from fake_backend import ENDPOINT, T0, FakeBackend

MODELS = {("credit", 1): Model("credit", 1, "/m1", properties={"auc": "0.80", "accuracy": "0.75", "log_loss": "0.50"}),
          ("credit", 2): Model("credit", 2, "/m2", properties={"auc": "0.79", "accuracy": "0.76", "log_loss": "0.52"}),
          ("credit", 3): Model("credit", 3, "/m3", properties={"auc": "0.70", "accuracy": "0.74", "log_loss": "0.50"}),
          ("credit", 4): Model("credit", 4, "/m4", properties={"auc": "0.81", "accuracy": "0.75", "log_loss": "0.60"}),
          ("credit", 5): Model("credit", 5, "/m5", properties={"accuracy": "0.75"})}


def quality_backend(rc_version):
    return FakeBackend(models=MODELS, deployments={"blue": "azureml:credit:1", "green": f"azureml:credit:{rc_version}"})


def test_quality_passes_within_tolerance(context):
    verdict = QualityGate().check(context(quality_backend(2), 0))
    assert verdict.decision == "pass" and verdict.evidence["models"] == {"rc": "azureml:credit:2", "prod": "azureml:credit:1"}
    assert verdict.evidence["metrics"]["rc"]["auc"] == 0.79


def test_quality_fails_a_lower_auc(context):
    verdict = QualityGate().check(context(quality_backend(3), 0))
    assert verdict.decision == "fail"
    assert verdict.reason == ("the RC's held-out metrics are worse than PROD's: auc 0.7 vs PROD 0.8 "
                              "(tolerance 0.02)")


def test_quality_treats_a_higher_log_loss_as_worse(context):
    verdict = QualityGate().check(context(quality_backend(4), 0))
    assert verdict.decision == "fail" and "log_loss 0.6 vs PROD 0.5" in verdict.reason


def test_quality_with_a_missing_metric_is_inconclusive_naming_it(context):
    verdict = QualityGate().check(context(quality_backend(5), 0))
    assert verdict.decision == "inconclusive"
    assert verdict.reason == "model azureml:credit:5 of 'green' has no registered metric auc, log_loss"


def test_quality_with_a_metric_that_is_nan_is_inconclusive_not_a_pass(context):
    models = {**MODELS, ("credit", 6): Model("credit", 6, "/m6", properties={"auc": "nan", "accuracy": "0.75",
                                                                             "log_loss": "0.50"})}
    backend = FakeBackend(models=models, deployments={"blue": "azureml:credit:1", "green": "azureml:credit:6"})
    verdict = QualityGate().check(context(backend, 0))
    assert verdict.decision == "inconclusive" and "auc" in verdict.reason


def test_quality_with_an_unknown_deployment_is_inconclusive(context):
    verdict = QualityGate().check(context(quality_backend(2), 0, rc="gren"))
    assert verdict.decision == "inconclusive" and "deployment 'gren' not found" in verdict.reason


# ---- agreement -----------------------------------------------------------------------------------

def scorer(flip_every=0, status=200):
    """A deterministic credit-like scorer on request bodies; flips every n-th row's decision."""
    def score(body):
        rows = json.loads(body)["data"]
        probs = [min(0.99, (r["credit_amount"] % 1000) / 1000) for r in rows]
        if flip_every:
            probs = [1 - p if (r["credit_amount"] % flip_every == 0) else p for p, r in zip(probs, rows)]
        return status, {"predictions": [int(p >= 0.5) for p in probs], "probabilities": probs}
    return score


def requests_file(tmp_path, n=100):
    path = tmp_path / "requests.json"
    path.write_text(json.dumps([{"data": [{"credit_amount": 37 * i + 11}]} for i in range(n)]))
    return str(path)


def test_agreement_passes_identical_models_via_the_header(context, tmp_path):
    fake = FakeBackend(scorers={"green": scorer(), "blue": scorer()})
    verdict = AgreementGate(requests=requests_file(tmp_path)).check(context(fake, 0))
    assert verdict.decision == "pass" and verdict.evidence["agreement"] == 1.0 and verdict.evidence["rows"] == 100
    assert fake.invocations == 200


def test_agreement_fails_a_model_that_flips_a_tenth_of_decisions(context, tmp_path):
    fake = FakeBackend(scorers={"green": scorer(flip_every=10), "blue": scorer()})
    verdict = AgreementGate(requests=requests_file(tmp_path)).check(context(fake, 0))
    assert verdict.decision == "fail" and verdict.evidence["agreement"] == pytest.approx(0.9, abs=0.05)
    assert "agreement below 95.0%" in verdict.reason


def test_agreement_scores_once_per_window(context, tmp_path):
    fake = FakeBackend(scorers={"green": scorer(), "blue": scorer()})
    gate = AgreementGate(requests=requests_file(tmp_path), n=10)
    gate.check(context(fake, 0))
    gate.check(context(fake, 5))
    assert fake.invocations == 20


def test_agreement_is_inconclusive_while_the_rc_fails_requests(context, tmp_path):
    fake = FakeBackend(scorers={"green": scorer(status=500), "blue": scorer()})
    verdict = AgreementGate(requests=requests_file(tmp_path), n=20).check(context(fake, 0))
    assert verdict.decision == "inconclusive"
    assert verdict.reason == "20 of 20 paired requests failed on green or blue"


def test_agreement_with_a_missing_requests_file_is_inconclusive(context, tmp_path):
    verdict = AgreementGate(requests=str(tmp_path / "nope.json")).check(context(FakeBackend(), 0))
    assert verdict.decision == "inconclusive" and "does not exist" in verdict.reason


def test_agreement_with_answers_that_are_not_predictions_is_inconclusive(context, tmp_path):
    fake = FakeBackend(scorers={"green": lambda body: (200, {"result": 1}), "blue": scorer()})
    verdict = AgreementGate(requests=requests_file(tmp_path), n=5).check(context(fake, 0))
    assert verdict.decision == "inconclusive" and "is not JSON with a 'predictions' list" in verdict.reason


@pytest.mark.parametrize("content, message", [
    ("[{\"data\": []}", "is not JSON"),
    ("{\"data\": []}", "must hold a JSON list of request bodies"),
    (json.dumps([{"data": [{"credit_amount": 1}]}] * 3), "holds 3 request bodies; the gate compares n=5"),
])
def test_agreement_with_a_bad_or_short_requests_file_is_inconclusive_naming_it(context, tmp_path, content, message):
    path = tmp_path / "requests.json"
    path.write_text(content)
    fake = FakeBackend(scorers={"green": scorer(), "blue": scorer()})
    verdict = AgreementGate(requests=str(path), n=5).check(context(fake, 0))
    assert verdict.decision == "inconclusive" and message in verdict.reason and fake.invocations == 0


def test_agreement_refuses_to_pair_answers_of_different_lengths(context, tmp_path):
    short = lambda body: (200, {"predictions": [], "probabilities": []})  # noqa: E731
    fake = FakeBackend(scorers={"green": short, "blue": scorer()})
    verdict = AgreementGate(requests=requests_file(tmp_path), n=5).check(context(fake, 0))
    assert verdict.decision == "inconclusive" and "different numbers of rows (0 and 1)" in verdict.reason


def pair(i, rc_prob, prod_prob):
    answer = lambda p: json.dumps({"predictions": [int(p >= 0.5)], "probabilities": [p]}).encode()
    return MirroredPair(T0 + i, ENDPOINT, f"r{i}", b"{}", "blue", 200, answer(prod_prob), "green", 200, answer(rc_prob))


def test_agreement_from_mirrored_pairs_waits_for_n_then_decides(context):
    probs = np.linspace(0.01, 0.99, 60)
    fake = FakeBackend(pairs=[pair(i, p, p) for i, p in enumerate(probs)])
    early = AgreementGate(source="mirror", n=50).check(context(fake, 30))
    assert early.decision == "inconclusive" and early.reason == "only 30 of 50 rows scored by both green and blue so far"
    assert AgreementGate(source="mirror", n=50).check(context(fake, 60)).decision == "pass"


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=5000)
    assert psi(x, x) == pytest.approx(0, abs=1e-9)
    assert psi(x, np.clip(x + 0.3, 0, 1)) > 0.5


def test_ks_distance_is_available(context, tmp_path):
    fake = FakeBackend(scorers={"green": scorer(), "blue": scorer()})
    verdict = AgreementGate(requests=requests_file(tmp_path), distance="ks", max_distance=0.1).check(context(fake, 0))
    assert verdict.decision == "pass" and verdict.evidence["distance"] == "ks"
