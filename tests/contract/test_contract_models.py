"""Models: versions auto-increment per name, latest, tags and properties, clear errors for bad input."""
import uuid

import pytest

from saferollout.errors import NotFound, SpecError


def fresh_name() -> str:
    return f"ct-model-{uuid.uuid4().hex[:8]}"


def test_versions_auto_increment_and_latest_is_the_newest(backend, credit_model_dir):
    name = fresh_name()
    first = backend.register_model(name, str(credit_model_dir))
    second = backend.register_model(name, str(credit_model_dir))
    assert (first.version, second.version) == (1, 2)
    assert backend.get_model(name).version == 2
    assert backend.get_model(name, "latest").version == 2
    assert backend.get_model(name, 1).ref == f"azureml:{name}:1"


def test_tags_and_properties_are_kept(backend, credit_model_dir):
    name = fresh_name()
    backend.register_model(name, str(credit_model_dir), description="credit v1", tags={"stage": "candidate"},
                           properties={"auc": "0.81", "accuracy": "0.75"})
    model = backend.get_model(name, 1)
    assert model.tags == {"stage": "candidate"}
    assert model.properties == {"auc": "0.81", "accuracy": "0.75"}
    assert model.description == "credit v1"


def test_list_by_name_gives_every_version_in_order(backend, credit_model_dir):
    name = fresh_name()
    for _ in range(3):
        backend.register_model(name, str(credit_model_dir))
    assert [m.version for m in backend.list_models(name)] == [1, 2, 3]
    assert name in {m.name for m in backend.list_models()}


def test_unknown_version_is_not_found(backend, credit_model_dir):
    name = fresh_name()
    backend.register_model(name, str(credit_model_dir))
    with pytest.raises(NotFound, match=f"{name}:7"):
        backend.get_model(name, 7)
    with pytest.raises(NotFound, match="not found"):
        backend.get_model(fresh_name())


def test_missing_path_is_refused_and_registers_nothing(backend, tmp_path):
    name = fresh_name()
    with pytest.raises(SpecError, match="model path does not exist"):
        backend.register_model(name, str(tmp_path / "nowhere"))
    assert backend.list_models(name) == []
