"""Bench configuration: YAML and TOML files, defaults, and errors that name the field."""

from __future__ import annotations

import pytest

from itscale.bench.config import ConfigError, load_config, validate_config

MINIMAL = {"methods": [{"name": "particle_filtering"}]}


def test_defaults_fill_everything_but_methods():
    c = validate_config(MINIMAL)
    assert c.problems.source == "arithmetic:medium"
    assert c.policy.model == "embedded" and c.prm.model == "embedded"
    assert c.budgets == [1, 2, 4, 8, 16] and c.seeds == [0]
    assert c.method_budgets(c.methods[0]) == [1, 2, 4, 8, 16]


def test_yaml_and_toml_give_the_same_config(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("methods:\n  - name: beam_search\n    params: {beam_width: 2}\n    budgets: [2, 4]\n"
                         "budgets: [4, 1, 2]\n")
    toml_file = tmp_path / "c.toml"
    toml_file.write_text('budgets = [4, 1, 2]\n[[methods]]\nname = "beam_search"\nparams = {beam_width = 2}\n'
                         'budgets = [2, 4]\n')
    a, b = load_config(yaml_file), load_config(toml_file)
    assert a == b
    assert a.budgets == [1, 2, 4]  # sorted
    assert a.method_budgets(a.methods[0]) == [2, 4]


def test_greedy_runs_once_whatever_the_budgets():
    c = validate_config({"methods": [{"name": "greedy"}], "budgets": [1, 4, 16]})
    assert c.method_budgets(c.methods[0]) == [1]


def test_a_method_runs_at_the_sweep_budgets_it_takes_or_at_its_own_and_says_so():
    c = validate_config({"methods": [{"name": "beam_search"}, {"name": "parallel_tempering"},
                                     {"name": "particle_filtering"}], "budgets": [1, 2, 4, 8, 16]})
    beam, pt, pf = c.methods
    assert c.method_budgets(beam) == [4, 8, 16]  # the sweep's budgets divisible by beam_width 4
    assert c.method_budgets(pt) == [6, 12]  # none of the sweep's: multiples of chains × rounds = 6 up to 16
    assert c.method_budgets(pf) == [1, 2, 4, 8, 16]
    assert c.budget_notes() == ["beam_search: budgets [4, 8, 16] (it cannot run at [1, 2])",
                                "parallel_tempering: budgets [6, 12] (it cannot run at [1, 2, 4, 8, 16])"]


@pytest.mark.parametrize("data, fragment", [
    ({"methods": [{"name": "particle_filtering", "params": {"temperature": -1}}]},
     "methods[0].params: particle_filtering.temperature: Input should be greater than 0"),
    ({"methods": [{"name": "beam_search", "budgets": [1, 4]}], "budgets": [1, 2, 4, 8]},
     "methods[0].budgets: beam_search: budget 1 is not divisible by beam_width 4; set budgets this method takes, "
     "e.g. budgets: [4, 8]"),
    ({"methods": [{"name": "nope"}]}, "methods[0].name: unknown method 'nope'; choose one of: "),
    ({"methods": [{"name": "greedy"}], "budgetz": [1]}, "budgetz: unknown setting"),
    ({"methods": [{"name": "greedy"}], "policy": {"temperature": "hot"}}, "policy.temperature: Input should be a valid number"),
    ({"methods": []}, "methods: List should have at least 1 item"),
    ({"methods": [{"name": "best_of_n"}], "prm": {"model": "none"}}, "methods[0]: best_of_n needs a reward model"),
    ({"methods": [{"name": "best_of_n"}], "format": "latex"}, "format: unknown format 'latex'"),
    ({"methods": [{"name": "best_of_n"}], "format": {"max_steps": 0}}, "format.max_steps: Input should be greater"),
    ({"methods": [{"name": "greedy"}, {"name": "greedy"}]}, "methods[1]: label 'greedy' is used twice"),
    ({"methods": [{"name": "best_of_n", "budgets": [2]}]}, "methods[0].budgets: best_of_n is computed for every sweep budget"),
    ({"methods": [{"name": "greedy", "params": {"sampling": {}}}]}, "methods[0].params.sampling: set it for the whole sweep"),
    ({"methods": [{"name": "greedy"}], "budgets": [2, 2]}, "budgets: values must be distinct, got [2, 2]"),
    ({"methods": [{"name": "greedy"}], "problems": {"limit": 0}}, "problems.limit: Input should be greater than or equal to 1"),
    ([1, 2], "expected a mapping of settings"),
])
def test_errors_name_the_field(data, fragment):
    with pytest.raises(ConfigError) as err:
        validate_config(data, "c.yaml")
    message = str(err.value)
    assert fragment in message, message
    assert message.startswith("c.yaml: ")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "c.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="unsupported config type '.json'"):
        load_config(bad)
    broken = tmp_path / "c.yaml"
    broken.write_text("methods: [\n")
    with pytest.raises(ConfigError, match=r"(?s)c.yaml: not valid YAML: .*line 2"):
        load_config(broken)


def test_overrides_merge_into_sections(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("problems: {source: arithmetic:easy, limit: 5}\nmethods: [{name: greedy}]\n")
    c = load_config(f, {"problems": {"limit": 7}, "output": "x"})
    assert (c.problems.source, c.problems.limit, c.output) == ("arithmetic:easy", 7, "x")


def test_method_hash_tracks_what_results_depend_on():
    base = validate_config({"methods": [{"name": "particle_filtering"}]})
    same = validate_config({"methods": [{"name": "particle_filtering"}], "budgets": [2], "concurrency": 3,
                            "output": "elsewhere", "policy": {"threads": 1, "max_batch": 8}})
    hotter = validate_config({"methods": [{"name": "particle_filtering"}], "policy": {"temperature": 1.0}})
    other_param = validate_config({"methods": [{"name": "particle_filtering", "params": {"temperature": 0.5}}]})
    h = base.method_hash(base.methods[0], "fp")
    assert same.method_hash(same.methods[0], "fp") == h
    assert hotter.method_hash(hotter.methods[0], "fp") != h
    assert other_param.method_hash(other_param.methods[0], "fp") != h
    assert base.method_hash(base.methods[0], "other problems") != h


def test_a_changed_default_is_keyed_by_its_value():
    """mcts' ``widening`` default went from None (one expansion) to 0.5: a config that leaves it
    unset now means 0.5 and shares the key of one that says 0.5; one that says None shares the
    key of the records written before, when unset meant None (``_CHANGED_DEFAULTS``)."""
    from itscale.bench.config import _hash

    def key(params):
        config = validate_config({"methods": [{"name": "mcts", "params": params}], "budgets": [4]})
        return config.method_hash(config.methods[0], "fp")

    unset, half, none = key({"aggregation": "min"}), key({"aggregation": "min", "widening": 0.5}), \
        key({"aggregation": "min", "widening": None})
    assert unset == half != none
    config = validate_config({"methods": [{"name": "mcts", "params": {"aggregation": "min"}}], "budgets": [4]})
    before = _hash({"method": "mcts", "params": {"aggregation": "min"}, "problems": "fp",
                    **config.backend_fingerprint()})  # the key an unset widening had before the change
    assert none == before != unset
    assert key({"widening": 0.25}) != key({}) == key({"widening": 0.5})
