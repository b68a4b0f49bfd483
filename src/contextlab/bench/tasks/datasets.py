"""Adapters for real long-context benchmarks read from LOCAL files in their published formats.

- LongBench (v1) JSONL: ``input``, ``context``, ``answers``, ``dataset`` (and ``all_classes``).
- LongBench v2 JSONL (or JSON list): ``question``, ``choice_A``..``choice_D``, ``answer``, ``context``.
- InfiniteBench JSONL: ``context``, ``input``, ``answer`` (str or list), ``options``; the task comes from
  ``subset`` or the file name (``passkey.jsonl``, ``longbook_qa_eng.jsonl``...).
- LooGLE JSONL: ``input`` (the document), ``qa_pairs`` (a list, or its string form, of ``{"Q", "A"}``).

Metrics follow each benchmark's official choice (QA-F1, ROUGE-L, accuracy, code similarity). A context
longer than ``length`` is cut in the middle (LongBench's practice), so ``length`` is a maximum here and each
sample's ``length`` is its real token count.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

from contextlab.bench.tasks.base import Sample, encode, prefix_ids

LONGBENCH_METRICS = {
    **dict.fromkeys(["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"], "f1"),
    **dict.fromkeys(["multifieldqa_zh", "dureader"], "f1_chars"),
    **dict.fromkeys(["gov_report", "qmsum", "multi_news", "samsum"], "rouge_l"),
    "vcsum": "rouge_l_chars",
    **dict.fromkeys(["trec", "lsht"], "string_match_part"),
    **dict.fromkeys(["passage_retrieval_en", "passage_retrieval_zh", "passage_count"], "number_match"),
    **dict.fromkeys(["lcc", "repobench-p"], "code_sim"),
}
SUMMARY = {"gov_report", "qmsum", "multi_news", "vcsum", "longbook_sum_eng"}
INFINITEBENCH_METRICS = {
    "passkey": "string_match_all",
    "number_string": "string_match_all",
    "kv_retrieval": "string_match_all",
    "longbook_qa_eng": "f1",
    "longbook_qa_chn": "f1_chars",
    "longbook_sum_eng": "rouge_l",
    "longbook_choice_eng": "choice",
    "longdialogue_qa_eng": "string_match_part",
    "math_find": "string_match_part",
    "code_debug": "choice",
    "code_run": "string_match_part",
    "math_calc": "string_match_part",
}
LETTERS = "ABCDEFGHIJ"
# The fields each adapter reads from every record, and its task parameters (see each function's signature).
RECORD_FIELDS = {
    "longbench": ("input", "context", "answers"),
    "longbench_v2": ("question", "choice_A", "choice_B", "answer", "context"),
    "infinitebench": ("context", "input", "answer"),
    "loogle": ("input", "qa_pairs"),
}
TASK_PARAMETERS = {
    "longbench": "path=FILE.jsonl[,subset=DATASET]",
    "longbench_v2": "path=FILE.jsonl[,subset=DOMAIN]",
    "infinitebench": "path=FILE.jsonl[,subset=TASK]",
    "loogle": "path=FILE.jsonl[,metric=f1]",
}


def read_json(path: str | Path):
    """A whole-file JSON document (SQuAD, HotpotQA, a JSON list), with a clear error when broken."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def read_records(path: str | Path) -> list[dict]:
    """Records of a JSONL file (or of a JSON list), with the line of any broken record named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return read_json(path)
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return records


def _require(record: dict, task: str, path, index: int) -> None:
    """Refuse a record that lacks a field ``task`` reads, naming the task whose format it has, if any."""
    missing = [k for k in RECORD_FIELDS[task] if k not in record]
    if not missing:
        return
    fits = [t for t, keys in RECORD_FIELDS.items() if t != task and all(k in record for k in keys)]
    if fits:
        hint = f"it looks like a {fits[0]} record: use the task spec {fits[0]}:path={path}"
    else:
        hint = f"give a file in {task}'s published format as the task spec {task}:{TASK_PARAMETERS[task]}"
    raise ValueError(f"{path}: record {index} lacks {missing}, which the {task} task reads; {hint}")


def _fit(tokenizer, context: str, question: str, length: int) -> tuple[list[int], list[int]]:
    """Context ids (BOS + text, cut in the middle to fit) and question ids, together at most ``length``."""
    q_ids = encode(tokenizer, question)
    ctx = encode(tokenizer, context)
    room = length - len(q_ids) - len(prefix_ids(tokenizer))
    if room < 16:
        raise ValueError(f"length {length} leaves no room for the context after a {len(q_ids)}-token question")
    if len(ctx) > room:
        ctx = ctx[: room // 2] + ctx[len(ctx) - (room - room // 2) :]
    return prefix_ids(tokenizer) + ctx, q_ids


def _sample(tokenizer, task, context, question, answers, metric, length, seed, params) -> Sample:
    ctx, q = _fit(tokenizer, context, question, length)
    answers = [str(a) for a in answers] or [""]
    return Sample(
        task=task,
        context_ids=ctx,
        question_ids=q,
        answers=answers,
        metric=metric,
        target=" " + answers[0],
        length=len(ctx) + len(q),
        seed=seed,
        params=params,
    )


def _choices_block(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def longbench(tokenizer, length: int, seed: int, *, path: str, num_samples: int = 10, subset: str | None = None):
    records = read_records(path)
    out = []
    for i, r in enumerate(records):
        _require(r, "longbench", path, i)
        name = r.get("dataset") or subset or Path(path).stem.removesuffix("_e")
        if subset and name != subset:
            continue
        metric = LONGBENCH_METRICS.get(name, "f1")
        if name in SUMMARY:
            question = f"\n\n{r['input'] or 'Summarize the text above.'}\nSummary:"
        elif metric == "code_sim":
            question = "\nNext line of code:\n"
        else:
            question = f"\n\nQuestion: {r['input']}\nAnswer:"
        out.append(
            _sample(
                tokenizer,
                f"longbench/{name}",
                r["context"],
                question,
                r["answers"],
                metric,
                length,
                seed,
                {"id": r.get("_id", i)},
            )
        )
    return _subsample(out, num_samples, seed)


def longbench_v2(tokenizer, length: int, seed: int, *, path: str, num_samples: int = 10, subset: str | None = None):
    out = []
    for i, r in enumerate(read_records(path)):
        _require(r, "longbench_v2", path, i)
        if subset and r.get("domain") != subset:
            continue
        options = [r[f"choice_{c}"] for c in "ABCD" if f"choice_{c}" in r]
        question = (
            f"\n\nQuestion: {r['question']}\n{_choices_block(options)}\n"
            "Answer with the letter of the correct choice.\nAnswer:"
        )
        out.append(
            _sample(
                tokenizer,
                "longbench_v2",
                r["context"],
                question,
                [r["answer"]],
                "choice",
                length,
                seed,
                {"id": r.get("_id", i), "difficulty": r.get("difficulty")},
            )
        )
    return _subsample(out, num_samples, seed)


def infinitebench(tokenizer, length: int, seed: int, *, path: str, num_samples: int = 10, subset: str | None = None):
    name = subset or Path(path).stem
    if name not in INFINITEBENCH_METRICS:
        raise ValueError(
            f"unknown InfiniteBench task {name!r}; name the file after it or pass subset= one of "
            f"{sorted(INFINITEBENCH_METRICS)}"
        )
    metric, out = INFINITEBENCH_METRICS[name], []
    for i, r in enumerate(read_records(path)):
        _require(r, "infinitebench", path, i)
        answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        options = r.get("options") or []
        if metric == "choice":
            answers = [LETTERS[options.index(a)] if a in options else str(a) for a in answers[:1]]
            question = (
                f"\n\n{r['input']}\n{_choices_block(options)}\nAnswer with the letter of the correct choice.\nAnswer:"
            )
        else:
            question = f"\n\n{r['input']}\nAnswer:"
        out.append(
            _sample(
                tokenizer,
                f"infinitebench/{name}",
                r["context"],
                question,
                answers,
                metric,
                length,
                seed,
                {"id": r.get("id", i)},
            )
        )
    return _subsample(out, num_samples, seed)


def loogle(tokenizer, length: int, seed: int, *, path: str, num_samples: int = 10, metric: str = "f1"):
    out = []
    for i, r in enumerate(read_records(path)):
        _require(r, "loogle", path, i)
        pairs = r["qa_pairs"]
        if isinstance(pairs, str):
            pairs = ast.literal_eval(pairs)
        for j, qa in enumerate(pairs):
            out.append(
                _sample(
                    tokenizer,
                    "loogle",
                    r["input"],
                    f"\n\nQuestion: {qa['Q']}\nAnswer:",
                    [qa["A"]],
                    metric,
                    length,
                    seed,
                    {"doc": r.get("title", i), "qa": j},
                )
            )
    return _subsample(out, num_samples, seed)


def _subsample(samples: list[Sample], num_samples: int, seed: int) -> list[Sample]:
    if not samples:
        raise ValueError("the dataset file holds no matching records")
    if len(samples) <= num_samples:
        return samples
    picked = sorted(random.Random(seed).sample(range(len(samples)), num_samples))
    return [samples[i] for i in picked]
