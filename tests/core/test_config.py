"""The training configuration (mrm_ray.core.config, mrm_ray.config): presets, overrides, refusals."""

import pytest

from mrm_ray.config import ConfigError, load_config, parse_overrides


# --- config --------------------------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    ("meta_lr=-1", "meta_lr must be > 0"), ("inner.lr=-0.1", "inner.lr must be > 0"),
    ("rpo.alpha=1.5", "rpo.alpha must be in (0, 1]"), ("rpo.alpha=0", "rpo.alpha must be in (0, 1]"),
    ("tasks_per_batch=0", "tasks_per_batch must be >= 1"), ("nope=1", "unknown config key 'nope'"),
    ("inner.nope=1", "unknown config key 'inner.nope'"), ("epochs=abc", "epochs expects int"),
    ("rpo.enabled=maybe", "rpo.enabled must be true or false"), ("inner=3", "is a section"),
])
def test_config_refuses_impossible_values(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert needle in str(e.value)


def test_config_presets_and_overrides():
    cfg = load_config("prism", overrides=["inner.steps=3", "rpo.enabled=false", "model.hidden_sizes=[8]"])
    assert cfg.meta_lr == 1e-3 and cfg.tasks_per_batch == 2 and cfg.epochs == 200
    assert cfg.inner.optimizer == "adam" and cfg.inner.steps == 3 and not cfg.rpo.enabled
    assert cfg.model.hidden_sizes == [8]
    assert load_config("reddit").seen_train_limit == 100
    assert parse_overrides(["a.b=1", "c=2"]) == {"a": {"b": "1"}, "c": "2"}
    cfg = load_config(text="epochs: 3\ninner:\n  lr: 0.5\n")
    assert cfg.epochs == 3 and cfg.inner.lr == 0.5
