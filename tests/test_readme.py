"""The README's Python examples run as written, and its bench config is valid."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_readme_bench_config_is_valid():
    """The YAML config shown in the README passes the bench's validation."""
    import yaml

    from itscale.bench.config import validate_config

    (block,) = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    config = validate_config(yaml.safe_load(block), "README.md")
    assert [m.key for m in config.methods] == ["majority_vote", "best_of_n", "beam_search", "particle_filtering"]
