"""Loading bench problem sets: bundled sets, JSONL/Parquet files, templates, bad rows."""

from __future__ import annotations

import json

import pytest

from itscale.bench.problems import TEMPLATES, ProblemSet, ProblemSetError, load_problems
from itscale.tasks import arithmetic


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


GOOD = [
    {"problem": "What is 1+1?", "answer": "2"},
    {"id": "q-b", "problem": "Half of 1?", "answer": 0.5, "level": 3, "source": "mine"},
]


@pytest.mark.parametrize("level", sorted(arithmetic.LEVELS))
def test_bundled_sets_load_as_shipped(level):
    ps = load_problems(f"arithmetic:{level}")
    assert isinstance(ps, ProblemSet) and ps.name == f"arithmetic:{level}" and ps.template == "task"
    assert len(ps) == 500 and all(p.answer for p in ps.problems)
    assert ps.problems[0] == arithmetic.eval_set(level)[0]  # the task's own prompt format
    assert len({p.id for p in ps}) == 500


def test_bundled_set_with_explicit_template_and_limit():
    ps = load_problems("arithmetic:easy", template="boxed", limit=3)
    original = arithmetic.eval_set("easy")[0]
    assert len(ps) == 3 and ps.template == "boxed"
    assert ps.problems[0].prompt.startswith(original.prompt) and "\\boxed{}" in ps.problems[0].prompt
    assert ps.problems[0].meta["problem"] == original.prompt and ps.problems[0].answer == original.answer


def test_unknown_bundled_level():
    with pytest.raises(ProblemSetError, match="arithmetic:easy"):
        load_problems("arithmetic:impossible")


def test_jsonl_loads_with_default_boxed_template(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD[0], "", "   ", GOOD[1]])
    ps = load_problems(str(path))
    assert ps.name == "data" and ps.template == "boxed" and ps.skipped == ()
    first, second = ps.problems
    assert first.id == "data-0" and first.answer == "2"
    assert first.prompt == TEMPLATES["boxed"].replace("{problem}", "What is 1+1?")
    assert first.prompt.endswith("Please reason step by step, and put your final answer within \\boxed{}.")
    assert second.id == "q-b" and second.answer == "0.5"
    assert second.meta == {"level": "3", "source": "mine", "problem": "Half of 1?"}


@pytest.mark.parametrize("template", ["plain", "steps", "Q: {problem}\nA: \\boxed{}"])
def test_templates(tmp_path, template):
    ps = load_problems(str(write_jsonl(tmp_path / "d.jsonl", GOOD)), template=template)
    prompt = ps.problems[0].prompt
    if template == "plain":
        assert prompt == "What is 1+1?"
    elif template == "steps":
        assert prompt.startswith("What is 1+1?") and "blank line" in prompt and "\\boxed{}" in prompt
    else:
        assert ps.template == "custom" and prompt == "Q: What is 1+1?\nA: \\boxed{}"


def test_template_without_placeholder_is_rejected(tmp_path):
    with pytest.raises(ProblemSetError, match=r"\{problem\}"):
        load_problems(str(write_jsonl(tmp_path / "d.jsonl", GOOD)), template="Solve it.")


def test_parquet_loads(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "set.parquet"
    pq.write_table(pa.table({"problem": ["1+1?", "2+2?"], "answer": [2, 4], "id": ["a", None],
                             "topic": ["x", "y"]}), path)
    ps = load_problems(str(path), template="plain")
    assert [(p.id, p.prompt, p.answer) for p in ps] == [("a", "1+1?", "2"), ("set-1", "2+2?", "4")]
    assert ps.problems[1].meta["topic"] == "y"


def test_parquet_bad_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"problem": ["ok", None, "ok2"], "answer": ["1", "2", ""]}), path)
    with pytest.raises(ProblemSetError, match=r"bad\.parquet:row 1: missing field 'problem'"):
        load_problems(str(path))
    ps = load_problems(str(path), on_bad_row="skip")
    assert [p.id for p in ps] == ["bad-0"]
    assert [m.split(":", 1)[1] for m in ps.skipped] == [
        "row 1: missing field 'problem'", "row 2: field 'answer' is empty"]
    pq.write_table(pa.table({"query": ["q"], "answer": ["1"]}), tmp_path / "cols.parquet")
    with pytest.raises(ProblemSetError, match="no problem or answer column.*query"):
        load_problems(str(tmp_path / "cols.parquet"))
    pq.write_table(pa.table({"question": ["q"], "answer": ["x\n#### 1"]}), tmp_path / "gsm8k.parquet")
    assert [p.answer for p in load_problems(str(tmp_path / "gsm8k.parquet"))] == ["1"]  # GSM8K's columns


BAD_ROWS = [
    ('{"problem": "x", "answer": ', "invalid JSON"),
    ('["x", "1"]', "row must be a JSON object with 'problem' and 'answer' fields, got array"),
    ('{"problem": "x"}', "missing field 'answer'"),
    ('{"answer": "1"}', "missing field 'problem'"),
    ('{"problem": "  ", "answer": "1"}', "field 'problem' is empty"),
    ('{"problem": "x", "answer": ""}', "field 'answer' is empty"),
    ('{"problem": 3, "answer": "1"}', "field 'problem' must be a string, got integer"),
    ('{"problem": "x", "answer": [1]}', "field 'answer' must be a string or a number, got array"),
    ('{"problem": "x", "answer": true}', "field 'answer' must be a string or a number, got boolean"),
    ('{"id": {"a": 1}, "problem": "x", "answer": "1"}', "field 'id' must be a string or an integer, got object"),
    ('{"problem": "x", "answer": "1", "level": 2.5}', "field 'level' must be a string or an integer, got number"),
    ('{"id": "dup", "problem": "x", "answer": "1"}', "duplicate id 'dup' in field 'id' (first used at line 1)"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS, ids=[m.split(" (")[0] for _, m in BAD_ROWS])
def test_malformed_rows_fail_with_line_number(tmp_path, bad, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"id": "dup", "problem": "p", "answer": "1"}\n\n' + bad + '\n{"problem": "q", "answer": "2"}\n')
    with pytest.raises(ProblemSetError) as info:
        load_problems(str(path))
    text = str(info.value)
    assert text.startswith(f"{path}:3: {message}")  # line 3: blank lines still count
    assert "on_bad_row='skip'" in text


@pytest.mark.parametrize("bad,message", BAD_ROWS, ids=[m.split(" (")[0] for _, m in BAD_ROWS])
def test_malformed_rows_skip_and_warn(tmp_path, bad, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"id": "dup", "problem": "p", "answer": "1"}\n\n' + bad + '\n{"problem": "q", "answer": "2"}\n')
    warnings: list[str] = []
    ps = load_problems(str(path), on_bad_row="skip", warn=warnings.append)
    assert [p.id for p in ps] == ["dup", "data-2"]  # default ids count every row, good or bad
    assert ps.skipped == tuple(warnings) and len(warnings) == 1
    assert warnings[0].startswith(f"{path}:3: {message}")


def test_all_rows_bad_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "x"}])
    with pytest.raises(ProblemSetError, match="no problems; all 1 rows were malformed"):
        load_problems(str(path), on_bad_row="skip")


@pytest.mark.parametrize("name,contents,message", [
    ("missing.jsonl", None, "does not exist"),
    ("data.csv", "problem,answer\n", "expected a .jsonl or .parquet file"),
    ("empty.jsonl", "\n\n", "has no problems"),
])
def test_file_level_errors(tmp_path, name, contents, message):
    path = tmp_path / name
    if contents is not None:
        path.write_text(contents)
    with pytest.raises(ProblemSetError, match=message):
        load_problems(str(path))


def test_limit_takes_first_rows_and_stops_reading(tmp_path):
    rows = [{"problem": f"p{i}", "answer": str(i)} for i in range(5)] + ["not json"]
    ps = load_problems(str(write_jsonl(tmp_path / "d.jsonl", rows)), limit=2)
    assert [p.answer for p in ps] == ["0", "1"]
    with pytest.raises(ProblemSetError, match="limit"):
        load_problems(str(tmp_path / "d.jsonl"), limit=0)


def test_fingerprint_tracks_ids_prompts_and_answers(tmp_path):
    base = load_problems(str(write_jsonl(tmp_path / "a.jsonl", GOOD)))
    same = load_problems(str(write_jsonl(tmp_path / "b.jsonl", [dict(GOOD[0], id="a-0"), GOOD[1]])))
    assert base.fingerprint() == same.fingerprint() and len(base.fingerprint()) == 64
    changed = load_problems(str(write_jsonl(tmp_path / "a.jsonl", [GOOD[0], dict(GOOD[1], answer="1/2")])))
    assert changed.fingerprint() != base.fingerprint()
    plain = load_problems(str(tmp_path / "b.jsonl"), template="plain")
    assert plain.fingerprint() != same.fingerprint()


def test_gsm8k_and_math_rows_are_read_without_renaming_fields(tmp_path):
    gsm8k = {"question": "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"}
    big = {"question": "How much?", "answer": "It costs 1,000 + 200.\n#### 1,200"}
    math_row = {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
                "solution": "We add: $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$.", "level": "Level 1"}
    path = write_jsonl(tmp_path / "mixed.jsonl", [json.dumps(r) for r in (gsm8k, big, math_row)])
    pset = load_problems(str(path), template="plain")
    assert [p.answer for p in pset.problems] == ["72", "1200", "\\frac{3}{4}"]
    assert pset.problems[0].prompt == gsm8k["question"] and "question" not in pset.problems[0].meta
    assert pset.problems[0].meta["solution"].endswith("#### 72")  # the worked solution stays in meta
    assert pset.problems[2].meta["solution"] == math_row["solution"] and pset.problems[2].meta["level"] == "Level 1"
    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"problem": "x", "solution": "no box here"}),
                                              json.dumps({"question": "y", "answer": "worked out ####  "})])
    with pytest.raises(ProblemSetError, match=r"bad.jsonl:1: field 'solution' has no .boxed"):
        load_problems(str(bad))
    with pytest.raises(ProblemSetError, match="has nothing after its '####'"):
        load_problems(str(write_jsonl(tmp_path / "b2.jsonl", [json.dumps({"question": "y", "answer": "x ####  "})])))
