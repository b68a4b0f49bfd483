"""Dataset adapters on small fixture files in each benchmark's published format (written here)."""

from __future__ import annotations

import json
import re

import pytest

import contextlab as cl
from contextlab.bench.metrics import score
from contextlab.bench.tasks import TASKS

DOC = "The lighthouse keeper, Marta Vell, moved to Oakhaven in 1911. " * 30


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_longbench_v1(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "hotpotqa.jsonl",
        [
            {
                "input": "Where did Marta Vell move?",
                "context": DOC,
                "answers": ["Oakhaven"],
                "dataset": "hotpotqa",
                "_id": "a1",
                "length": 300,
                "all_classes": None,
                "language": "en",
            },
            {
                "input": "",
                "context": DOC,
                "answers": ["A keeper moved to Oakhaven."],
                "dataset": "gov_report",
                "_id": "a2",
            },
            {
                "input": "",
                "context": "def f(x):\n    return x\n",
                "answers": ["print(f(1))"],
                "dataset": "lcc",
                "_id": "a3",
            },
        ],
    )
    samples = TASKS.get("longbench")(tokenizer, 600, 0, path=path, num_samples=10)
    assert [s.metric for s in samples] == ["f1", "rouge_l", "code_sim"]
    assert samples[0].task == "longbench/hotpotqa" and samples[0].answers == ["Oakhaven"]
    assert all(s.length <= 600 for s in samples) and samples[0].length == 600  # cut in the middle to fit
    text = tokenizer.decode(samples[0].context_ids)
    assert text.startswith("<bos>The lighthouse") and text.endswith("in 1911. ")
    only = TASKS.get("longbench")(tokenizer, 600, 0, path=path, subset="lcc")
    assert [s.task for s in only] == ["longbench/lcc"]


def test_longbench_v2_choices(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "v2.jsonl",
        [
            {
                "_id": "x",
                "domain": "single",
                "difficulty": "easy",
                "question": "Where did Marta move?",
                "choice_A": "Oslo",
                "choice_B": "Oakhaven",
                "choice_C": "Paris",
                "choice_D": "Rome",
                "answer": "B",
                "context": DOC,
            }
        ],
    )
    [s] = TASKS.get("longbench_v2")(tokenizer, 4000, 0, path=path)
    question = tokenizer.decode(s.question_ids)
    assert "B. Oakhaven" in question and s.metric == "choice" and s.answers == ["B"]
    assert score(s.metric, "The answer is B.", s.answers) == 1.0 and score(s.metric, "C", s.answers) == 0.0


def test_infinitebench_task_from_file_name(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "passkey.jsonl",
        [
            {
                "id": 0,
                "context": "noise " * 50 + "The pass key is 71432. " + "noise " * 50,
                "input": "What is the pass key?",
                "answer": ["71432"],
                "options": [],
            }
        ],
    )
    [s] = TASKS.get("infinitebench")(tokenizer, 2000, 0, path=path)
    assert s.task == "infinitebench/passkey" and s.metric == "string_match_all"
    choice = write_jsonl(
        tmp_path / "longbook_choice_eng.jsonl",
        [{"id": 0, "context": DOC, "input": "Where?", "answer": ["Oakhaven"], "options": ["Oslo", "Oakhaven"]}],
    )
    [c] = TASKS.get("infinitebench")(tokenizer, 2000, 0, path=choice)
    assert c.answers == ["B"]
    with pytest.raises(ValueError, match="unknown InfiniteBench task"):
        TASKS.get("infinitebench")(tokenizer, 2000, 0, path=write_jsonl(tmp_path / "odd.jsonl", [{}]))


def test_loogle_string_qa_pairs(tmp_path, tokenizer):
    pairs = str([{"Q": "Who kept the lighthouse?", "A": "Marta Vell", "S": "..."}, {"Q": "When?", "A": "1911"}])
    path = write_jsonl(tmp_path / "loogle.jsonl", [{"title": "Lighthouse", "input": DOC, "qa_pairs": pairs}])
    samples = TASKS.get("loogle")(tokenizer, 3000, 0, path=path)
    assert [s.answers for s in samples] == [["Marta Vell"], ["1911"]]


def test_dataset_errors_name_the_problem(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        TASKS.get("longbench")(tokenizer, 1000, 0, path=str(tmp_path / "none.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": "a"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        TASKS.get("longbench")(tokenizer, 1000, 0, path=str(broken))
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match="lacks") as err:
        TASKS.get("longbench")(tokenizer, 1000, 0, path=wrong)
    # The fix named is a real task spec (there is no format flag): the task and its parameters.
    assert "longbench:path=FILE.jsonl[,subset=DATASET]" in str(err.value) and "--dataset-format" not in str(err.value)
    v2 = {"question": "q", "choice_A": "a", "choice_B": "b", "answer": "A", "context": DOC}
    other = write_jsonl(tmp_path / "v2.jsonl", [v2])
    hint = f"looks like a longbench_v2 record: use the task spec longbench_v2:path={other}"
    with pytest.raises(ValueError, match=re.escape(hint)):
        TASKS.get("longbench")(tokenizer, 1000, 0, path=other)
    assert TASKS.get("longbench_v2")(tokenizer, 1000, 0, path=other)  # and that spec reads it


def test_dataset_samples_run_through_generate(tmp_path, tokenizer, llama):
    path = write_jsonl(
        tmp_path / "qasper.jsonl",
        [
            {"input": f"Question {i}?", "context": DOC[: 200 + 150 * i], "answers": ["Oakhaven"], "dataset": "qasper"}
            for i in range(3)
        ],
    )
    samples = TASKS.get("longbench")(tokenizer, 1000, 0, path=path)
    out = cl.generate(
        llama,
        tokenizer,
        [s.context_ids for s in samples],
        [s.question_ids for s in samples],
        method="snapkv:0.5",
        max_new_tokens=4,
    )
    assert len(out.texts) == 3 and len({s.length for s in samples}) == 3  # different lengths in one batch


def test_ruler_qa_from_local_squad_and_hotpotqa(tmp_path, tokenizer):
    squad = {
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": f"Paragraph {i}: the harbour of Town{i} is deep.",
                        "qas": [
                            {
                                "id": str(i),
                                "question": f"Which harbour is deep in paragraph {i}?",
                                "answers": [{"text": f"Town{i}"}],
                                "is_impossible": False,
                            }
                        ],
                    }
                    for i in range(12)
                ],
            }
        ]
    }
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    samples = TASKS.get("qa_1")(tokenizer, 600, 0, num_samples=4, dataset_file=str(tmp_path / "squad.json"))
    assert len(samples) == 4
    for s in samples:
        assert len(s.context_ids) + len(s.question_ids) == 600
        assert s.answers[0] in tokenizer.decode(s.context_ids) and "Document 1:" in tokenizer.decode(s.context_ids)
    hotpot = [
        {
            "_id": str(i),
            "question": f"Where was person {i} born?",
            "answer": f"City{i}",
            "supporting_facts": [[f"P{i}", 0], [f"C{i}", 0]],
            "context": [
                [f"P{i}", [f"Person {i} was born in the city of City{i}."]],
                [f"C{i}", [f"City{i} lies on a river."]],
                [f"X{i}", ["Unrelated text."]],
            ],
        }
        for i in range(6)
    ]
    (tmp_path / "hotpot.json").write_text(json.dumps(hotpot))
    two = TASKS.get("qa_2")(tokenizer, 500, 0, num_samples=3, dataset_file=str(tmp_path / "hotpot.json"))
    assert all(s.answers[0] in tokenizer.decode(s.context_ids) for s in two)
    with pytest.raises(ValueError, match="not a SQuAD file"):
        TASKS.get("qa_1")(tokenizer, 600, 0, dataset_file=str(tmp_path / "hotpot.json"))
