"""The long-context tasks (retrieval_heads.data.tasks): exact needle and key spans with SmolLM2's tokenizer,
seeded prompts, the distractors of the multi-key task, and their way through detect, the sweep and the CLI."""

from __future__ import annotations

import re

import pytest

from retrieval_heads.chance import prompt_spans
from retrieval_heads.data.haystacks import FILLER, filler_units
from retrieval_heads.data.prompt import PromptFormat
from retrieval_heads.data.questions import QUESTIONS, answer_matches
from retrieval_heads.data.samples import synthetic_samples
from retrieval_heads.data.tasks import (
    TASKS,
    check_question,
    context_families,
    decode_budget,
    question_groups,
    question_text,
    task_prompts,
)
from retrieval_heads.errors import UserError

ALL_TASKS = TASKS.names()


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny random Llama with SmolLM2's tokenizer (real prompts, fast passes)."""
    from conftest import tiny_smol_lm

    return tiny_smol_lm()


def decode(tok, ids) -> str:
    return tok.decode(list(ids), clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("key", ALL_TASKS)
@pytest.mark.parametrize("tokens", [512, 2048])
def test_needle_and_key_spans_are_token_exact(smollm2_tokenizer, key, tokens):
    tok, task = smollm2_tokenizer, TASKS.get(key)
    for i, p in enumerate(task_prompts(tok, key, tokens, 2, 0.5, 0)):
        n = task.needle(0, i)
        assert len(p.input_ids) == tokens  # the context gets tokens - len(suffix) ids exactly
        assert decode(tok, p.input_ids[p.needle_start : p.needle_end]) == n.text
        a, b = p.answer_at
        assert p.needle_start <= a < b <= p.needle_end
        assert decode(tok, p.input_ids[a:b]).strip() == p.answer == n.answer == p.meta["key"]
        # the span is the key's own tokens: one token less on either side loses part of it
        assert decode(tok, p.input_ids[a + 1 : b]).strip() != p.answer
        assert decode(tok, p.input_ids[a : b - 1]).strip() != p.answer
        assert decode(tok, p.input_ids[p.question_start : p.question_end]).strip() == n.question
        spans = prompt_spans(tok, p)  # what the methods score: needle, answer, their control spans
        assert spans["answer"] == (a, b) and spans["needle"] == (p.needle_start, p.needle_end)
        c0, c1 = spans["control:answer"]
        assert c1 - c0 == b - a and p.answer not in decode(tok, p.input_ids[c0:c1])
        assert answer_matches(f"The answer is {p.answer}.", p.answer)


@pytest.mark.parametrize("key", ALL_TASKS)
def test_same_seed_same_prompt(smollm2_tokenizer, key):
    a = task_prompts(smollm2_tokenizer, key, 1024, 2, 0.5, 3)
    b = task_prompts(smollm2_tokenizer, key, 1024, 1, 0.5, 3)  # sample i does not depend on the count
    c = task_prompts(smollm2_tokenizer, key, 1024, 1, 0.5, 4)
    assert a[0].input_ids == b[0].input_ids and a[0].answer_at == b[0].answer_at
    assert a[0].answer != a[1].answer and c[0].answer != a[0].answer


def test_needle_depth_and_filler(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for depth in (0.0, 0.25, 1.0):
        p = task_prompts(tok, "passkey", 1024, 1, depth, 0)[0]
        h = p.context_end - p.haystack_start - len(PromptFormat(tok).separator) - (p.needle_end - p.needle_start)
        before = p.separator_start - p.haystack_start
        assert abs(before - depth * h) <= 6  # within one filler sentence
        context = decode(tok, p.input_ids[p.haystack_start : p.context_end])
        assert "The grass is green. The sky is blue." in context and not re.search(r"\d", context.replace(p.answer, ""))
    assert " ".join(u.strip() for u in filler_units(5)) == FILLER


@pytest.mark.parametrize("tokens", [512, 4096])
def test_multikey_distractors_are_whole_and_distinct(smollm2_tokenizer, tokens):
    tok, task = smollm2_tokenizer, TASKS.get("multikey")
    for i, p in enumerate(task_prompts(tok, "multikey", tokens, 3, 0.5, 0)):
        n = task.needle(0, i)
        context = decode(tok, p.input_ids[p.haystack_start : p.context_end])
        assert len(n.distractors) == 3 == len(p.meta["distractor_keys"])
        h = p.context_end - p.haystack_start - (p.needle_end - p.separator_start)  # haystack ids
        ids, placed = p.input_ids, {}
        for depth, sentence in n.distractors:
            assert context.count(sentence) == 1  # in the prompt whole, never cut
            d = tok(" " + sentence, add_special_tokens=False)["input_ids"]
            at = next(i for i in range(p.haystack_start, p.context_end) if ids[i : i + len(d)] == d)
            assert not p.separator_start <= at < p.needle_end
            placed[at] = (at + len(d), depth)
        for at, (end, depth) in placed.items():
            hay_at = at - p.haystack_start if at < p.separator_start else at - (p.needle_end - p.separator_start) \
                - p.haystack_start
            # it starts at its depth within one filler sentence, or right after the one that took its place
            pushed = any(abs(at - e) <= 6 or abs(end - a) <= 6 for a, (e, _) in placed.items() if a != at)
            assert abs(hay_at - depth * h) <= 8 or pushed
        values = [n.answer, *p.meta["distractor_keys"]]
        assert len(set(values)) == 4 and all(context.count(v) == 1 for v in values)
        assert context.count("special magic numbers for") == 4


def test_filings_haystack_is_the_seeds_filing_text(smollm2_tokenizer):
    p = task_prompts(smollm2_tokenizer, "niah_word_filings", 1024, 1, 0.5, 0)[0]
    context = decode(smollm2_tokenizer, p.input_ids[p.haystack_start : p.context_end])
    assert "Item " in context and "grass" not in context


def test_question_groups_mix_filings_and_tasks(smollm2_tokenizer):
    tok = smollm2_tokenizer
    keys = ["hq_state", "passkey", "inc_state", "niah_number"]
    groups = question_groups(tok, keys, 512, 2, 0.5, 0)
    filings = synthetic_samples(PromptFormat(tok), ["hq_state", "inc_state"], 512, 2, 0.5, 0)
    tasks = {k: task_prompts(tok, k, 512, 2, 0.5, 0) for k in ("passkey", "niah_number")}
    for i, g in enumerate(groups):
        assert list(g) == keys
        for q in ("hq_state", "inc_state"):
            assert g[q].input_ids == filings[i][q].input_ids  # the filing prompts as they were
        for k in tasks:
            assert g[k].input_ids == tasks[k][i].input_ids
    assert context_families(keys) == [("hq_state", "inc_state"), ("passkey",), ("niah_number",)]
    assert context_families(["passkey"]) == [("passkey",)]


def test_question_names_and_budgets():
    check_question("inc_state")
    check_question("niah_uuid_filings")
    with pytest.raises(UserError, match=r"unknown question 'paskey' \(did you mean 'passkey'\?\); choose from: "
                                        r"inc_state, .*multikey"):
        check_question("paskey")
    assert question_text("passkey") == "What is the pass key?"
    assert question_text("inc_state") == QUESTIONS.get("inc_state").prompt
    assert question_text("niah_word") == "What is the special magic word for {query} mentioned in the provided text?"
    # 32 tokens of lead-in room (the longest question, restated) plus the longest key under SmolLM2's tokenizer
    assert [decode_budget(k) for k in ("inc_state", None, "passkey", "niah_number", "niah_word", "niah_uuid",
                                        "multikey")] == [12, 12, 38, 40, 36, 69, 40]


def test_key_token_counts_hold(smollm2_tokenizer):
    """KEY_TOKENS is the longest key's token count, and LEAD_IN_TOKENS holds the longest question restated:
    check them on the keys and questions of many samples."""
    from retrieval_heads.data.tasks import KEY_TOKENS, LEAD_IN_TOKENS

    longest: dict[str, int] = {}
    for k in ("passkey", "niah_number", "niah_word", "niah_uuid"):
        task = TASKS.get(k)
        for i in range(200):
            n = task.needle(0, i)
            got = len(smollm2_tokenizer(" " + n.answer, add_special_tokens=False)["input_ids"])
            longest[task.kind] = max(longest.get(task.kind, 0), got)
            asked = len(smollm2_tokenizer(n.question, add_special_tokens=False)["input_ids"])
            longest["question"] = max(longest.get("question", 0), asked)
    assert longest["passkey"] == KEY_TOKENS["passkey"] and longest["number"] == KEY_TOKENS["number"]
    assert longest["word"] <= KEY_TOKENS["word"] and longest["uuid"] <= KEY_TOKENS["uuid"]
    assert longest["question"] <= 20 < LEAD_IN_TOKENS


def test_too_short_for_the_task(smollm2_tokenizer):
    with pytest.raises(UserError, match="tokens 60 is too small"):
        task_prompts(smollm2_tokenizer, "niah_uuid", 60, 1, 0.5, 0)


def test_grid_takes_tasks():
    from retrieval_heads.sweep import make_grid

    g = make_grid(models=["smollm2"], questions=["passkey", "inc_state"], tokens=[512])
    assert g.questions == ("passkey", "inc_state")
    assert make_grid(models=["smollm2"], questions="all", tokens=[512]).questions == tuple(QUESTIONS)
    with pytest.raises(UserError, match="unknown question 'passkee'"):
        make_grid(models=["smollm2"], questions=["passkee"], tokens=[512])
    with pytest.raises(UserError, match="--span fact needs a filing question"):
        make_grid(models=["smollm2"], questions=["multikey"], tokens=[512], span="fact")


def test_cli_task_errors(capfd):
    from retrieval_heads.cli import main

    assert main(["detect", "--question", "passkey", "--span", "fact"]) == 2
    err = capfd.readouterr().err
    assert err.strip() == ("error: --span fact needs a filing question (the needle of 'passkey' states one key); "
                           "use --span needle or answer")
    assert main(["detect", "--question", "paskey"]) == 2
    assert "did you mean 'passkey'" in capfd.readouterr().err


@pytest.mark.slow  # a few seconds: two decodes of 20 tokens on a tiny model
def test_sweep_unit_scores_tasks_as_detect_does(tiny_lm):
    """A unit mixing filing questions and tasks: each task on its own context, the same numbers and answers as
    `detect` on that task, and the task's own decoding budget recorded."""
    import torch

    from retrieval_heads.experiments import detect
    from retrieval_heads.sweep import Unit, compute_unit, make_grid

    grid = make_grid(models=["smollm2"], questions=["inc_state", "multikey"], tokens=[200], samples=2,
                     span="needle,answer", answers=True)
    out = {(r.record["method"], r.record["question"]): r for r in
           compute_unit(tiny_lm, Unit("smollm2", 200, grid.questions), grid)}
    assert len(out) == 4
    for q in ("multikey",):
        det = detect(tiny_lm, question=q, tokens=200, samples=2, span="needle,answer")  # answers: the task default
        for name in ("summed_attention", "summed_attention+answer"):
            got, want = out[(name, q)], det[name]
            assert [p.input_ids for p in got.prompts] == [p.input_ids for p in want.prompts]
            torch.testing.assert_close(got.sample_scores, want.sample_scores, atol=1e-5, rtol=1e-4)
            assert [a.text for a in got.answers] == [a.text for a in want.answers]
            budget = 40 if q == "multikey" else 38
            assert got.record["extra"]["max_new_tokens"] == want.record["extra"]["max_new_tokens"] == budget
            assert got.record["question_prompt"] == want.record["question_prompt"] == question_text(q)
            assert f"; accuracy {want.record['extra']['n_correct']}/2" in want.record["verdict"]
    assert out[("summed_attention", "inc_state")].record["extra"]["max_new_tokens"] == 12


def test_default_detect_decodes_and_shows_accuracy(smollm2, tmp_path):
    """The no-flag experiment on SmolLM2, shortened: passkey on the answer span, answers decoded with the
    task's budget, the verdict ending with the accuracy; the embedded model reads the key back."""
    from retrieval_heads.experiments import detect

    res = detect(smollm2, tokens=384, samples=2, output_dir=tmp_path).result
    rec = res.record
    assert (rec["question"], rec["method"], rec["span"]) == ("passkey", "summed_attention+answer", "answer")
    assert rec["question_prompt"] == "What is the pass key?" and rec["extra"]["max_new_tokens"] == 38
    assert [a.correct for a in res.answers] == [True, True]  # 8/8 at 512 and 1,024 tokens (default_task.md)
    assert rec["verdict"].endswith("accuracy 2/2") or "; accuracy 2/2" in rec["verdict"]
    assert (tmp_path / "summed_attention+answer" / "smollm2_passkey_384.json").is_file()


def test_cli_spelled_out_default_parses():
    """`detect --question passkey --tokens 1024 --span answer` names what the no-flag run takes by default."""
    from retrieval_heads.cli import parse
    from retrieval_heads.defaults import settings_for

    args = parse(["detect", "--question", "passkey", "--tokens", "1024", "--span", "answer"])
    given = settings_for(parse(["detect"]).question, dataset=False)
    assert (args.question, args.tokens, args.span) == ("passkey", given.tokens, [given.span])
    filing = parse(["detect", "--question", "inc_state"])
    assert settings_for(filing.question, dataset=False).span == "needle"


def test_key_words_are_not_in_the_haystacks():
    """No value word of the RULER needles occurs in the filler or in the filing text, no query word in the
    filler."""
    from retrieval_heads.data.haystacks import filings_units
    from retrieval_heads.data.ruler import ADJECTIVES, NOUNS, VALUE_WORDS

    text = " ".join(" ".join(a + b) for a, b in (filings_units(0, i) for i in range(4))) + " " + FILLER
    words = set(re.findall(r"[a-z]+", text.lower()))
    assert not words & set(VALUE_WORDS)
    assert not set(re.findall(r"[a-z]+", FILLER.lower())) & set(ADJECTIVES + NOUNS)
    assert len(set(VALUE_WORDS)) == len(VALUE_WORDS) == 30
