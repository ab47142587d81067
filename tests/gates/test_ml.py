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
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps({"data": [{"credit_amount": 37 * i + 11}]}) + "\n" for i in range(n)))
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
    assert verdict.reason == ("0 of 20 requests answered by both green and blue; the others are sent again at "
                              "the next look (20 x 500 from green)")


def test_agreement_sends_again_only_the_requests_a_busy_prod_refused(context, tmp_path):
    """PROD answers 429 to every third request at the first look (busy), then recovers: the second look
    sends only those again, and the gate decides on all 30 pairs."""
    calls = {"blue": 0}
    healthy = scorer()

    def busy_then_recovered(body):
        calls["blue"] += 1
        return (429, {"message": "too many requests"}) if calls["blue"] <= 30 and calls["blue"] % 3 == 0 \
            else healthy(body)

    fake = FakeBackend(scorers={"green": scorer(), "blue": busy_then_recovered})
    gate = AgreementGate(requests=requests_file(tmp_path), n=30)
    first = gate.check(context(fake, 0))
    assert first.decision == "inconclusive" and first.reason.startswith("20 of 30 requests answered by both")
    assert "(10 x 429 from blue)" in first.reason
    second = gate.check(context(fake, 5))
    assert second.decision == "pass" and second.evidence["rows"] == 30
    assert fake.invocations == 60 + 20  # the 10 refused pairs again, not all 30


def test_agreement_with_a_missing_requests_file_is_inconclusive(context, tmp_path):
    verdict = AgreementGate(requests=str(tmp_path / "nope.json")).check(context(FakeBackend(), 0))
    assert verdict.decision == "inconclusive" and "does not exist" in verdict.reason


def test_agreement_with_answers_that_are_not_predictions_is_inconclusive(context, tmp_path):
    fake = FakeBackend(scorers={"green": lambda body: (200, {"result": 1}), "blue": scorer()})
    verdict = AgreementGate(requests=requests_file(tmp_path), n=5).check(context(fake, 0))
    assert verdict.decision == "inconclusive"
    assert verdict.reason.startswith("an answer is neither a list nor an object with 'predictions' (result): give "
                                     "answer_path")


@pytest.mark.parametrize("name, content, message", [
    ("requests.jsonl", "{\"data\": []}\n[{\"data\": []}", "requests.jsonl' line 2 is not JSON"),
    ("requests.json", "{\"data\": []}\n{\"data\": []}", "(one body per line? name the file .jsonl)"),
    ("requests.jsonl", "\n\n", "holds no request body"),
    ("requests.jsonl", (json.dumps({"data": [{"credit_amount": 1}]}) + "\n") * 3,
     "holds 3 request bodies; the gate compares n=5"),
])
def test_agreement_with_a_bad_or_short_requests_file_is_inconclusive_naming_it(context, tmp_path, name, content,
                                                                              message):
    path = tmp_path / name
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


# ---- any answer shape, either task --------------------------------------------------------------------

def rows_of(body):
    return [r["credit_amount"] for r in json.loads(body)["data"]]


def answering(shape):
    """A scorer answering in `shape` from a per-row function of credit_amount."""
    return lambda fn: (lambda body: (200, shape([fn(x) for x in rows_of(body)])))


REGRESSION = lambda x: 100.0 + x / 7.0  # noqa: E731


@pytest.mark.parametrize("shape, answer_path", [
    (lambda values: values, ""),                                   # a bare list
    (lambda values: {"predictions": values}, ""),                  # MLflow's answer
    (lambda values: {"output": {"price": values}}, "output.price"),  # where answer_path points
])
def test_agreement_reads_a_regression_answer_in_any_shape_and_infers_the_task(context, tmp_path, shape, answer_path):
    fake = FakeBackend(scorers={"green": answering(shape)(lambda x: REGRESSION(x) * 1.01),
                                "blue": answering(shape)(REGRESSION)})
    verdict = AgreementGate(requests=requests_file(tmp_path), n=50, answer_path=answer_path).check(context(fake, 0))
    assert verdict.decision == "pass", verdict.reason
    assert verdict.evidence["task"] == "regression" and verdict.evidence["agreement"] == 1.0
    assert verdict.evidence["task_inferred"] == "the predictions are numbers, not all whole"
    assert verdict.reason.startswith("regression: predictions within 0.1 (relative) or 0 (absolute) of PROD's on 100.0%")


def test_agreement_fails_a_regression_model_that_answers_a_constant(context, tmp_path):
    fake = FakeBackend(scorers={"green": answering(list)(lambda x: 250.0), "blue": answering(list)(REGRESSION)})
    verdict = AgreementGate(requests=requests_file(tmp_path), n=50, min_agreement=0.8, max_distance=0.5).check(
        context(fake, 0))
    assert verdict.decision == "fail" and verdict.evidence["agreement"] < 0.5
    assert "agreement below 80.0% and psi above 0.5" in verdict.reason


def test_agreement_tolerances_decide_which_regression_rows_agree(context, tmp_path):
    fake = FakeBackend(scorers={"green": answering(list)(lambda x: REGRESSION(x) + 3.0),
                                "blue": answering(list)(REGRESSION)})
    tight = AgreementGate(requests=requests_file(tmp_path), n=20, rel_tolerance=0, abs_tolerance=1.0,
                          task="regression").check(context(fake, 0))
    loose = AgreementGate(requests=requests_file(tmp_path), n=20, rel_tolerance=0, abs_tolerance=5.0,
                          task="regression", max_distance=10).check(context(fake, 0))
    assert tight.decision == "fail" and tight.evidence["agreement"] == 0.0
    assert tight.evidence["task_inferred"] == "given by the gate's task setting"
    assert loose.decision == "pass" and loose.evidence["agreement"] == 1.0


def test_agreement_reads_class_probabilities_as_rows_of_lists(context, tmp_path):
    probs = lambda x: [1 - (x % 1000) / 1000, (x % 1000) / 1000]  # noqa: E731
    flipped = lambda x: list(reversed(probs(x)))  # noqa: E731
    same = FakeBackend(scorers={"green": answering(list)(probs), "blue": answering(list)(probs)})
    flip = FakeBackend(scorers={"green": answering(list)(flipped), "blue": answering(list)(probs)})
    ok = AgreementGate(requests=requests_file(tmp_path), n=50).check(context(same, 0))
    bad = AgreementGate(requests=requests_file(tmp_path), n=50).check(context(flip, 0))
    assert ok.decision == "pass" and ok.evidence["task"] == "classification" and ok.evidence["distance_value"] == 0
    assert "class probabilities" in ok.evidence["task_inferred"]
    assert bad.decision == "fail" and bad.evidence["agreement"] < 0.1


def test_agreement_on_labels_without_scores_says_it_compared_no_distance(context, tmp_path):
    labels = lambda x: "good" if x % 3 else "bad"  # noqa: E731
    fake = FakeBackend(scorers={"green": answering(list)(labels), "blue": answering(list)(labels)})
    verdict = AgreementGate(requests=requests_file(tmp_path), n=30).check(context(fake, 0))
    assert verdict.decision == "pass" and verdict.evidence["distance_value"] is None
    assert "no scores to compare" in verdict.reason
    assert verdict.evidence["task_inferred"] == "the predictions are labels (strings or booleans)"


def test_agreement_with_an_answer_path_that_finds_nothing_is_inconclusive_naming_it(context, tmp_path):
    fake = FakeBackend(scorers={"green": answering(list)(REGRESSION), "blue": answering(list)(REGRESSION)})
    verdict = AgreementGate(requests=requests_file(tmp_path), n=5, answer_path="result.values").check(context(fake, 0))
    assert verdict.decision == "inconclusive"
    assert verdict.reason.startswith("answer_path 'result.values' finds nothing in the answer [")


def test_an_answer_path_that_is_not_jmespath_is_refused_when_the_gate_is_built():
    from saferollout.errors import SpecError
    from saferollout.gates import build_gates

    with pytest.raises(SpecError, match=r"answer_path 'output\[' is not a JMESPath expression"):
        build_gates([{"kind": "ml_agreement", "answer_path": "output["}])
    with pytest.raises(SpecError, match="task must be one of auto, classification, regression"):
        build_gates([{"kind": "ml_agreement", "task": "ranking"}])
