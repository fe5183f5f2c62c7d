"""The task contract: shipped tasks, canonical answers, validation messages, prompt parts."""

import json

import pytest
import yaml

from distill.task import Task, TaskError, load_task, resolve_style, shipped_tasks

ANSWER = {"tone": "aggressive", "sentiment": "negative", "safety": "harmful", "toxicity": "toxic"}


@pytest.fixture(scope="module")
def task():
    return load_task("reddit_moderation")


def tiny(**changes) -> dict:
    data = {
        "name": "tiny",
        "fields": {"mood": ["happy", "sad"], "topic": ["cats", "dogs"]},
        "instruction": "Label the comment.",
        "examples": [{"comment": "I love my cat", "answer": {"mood": "happy", "topic": "cats"}}],
    }
    data.update(changes)
    return data


@pytest.mark.parametrize("name", ["reddit_moderation", "reddit_moderation_8shot", "support_email_triage"])
def test_shipped_tasks_load_and_round_trip(name):
    task = load_task(name)
    assert task.name == name
    assert Task.from_dict(json.loads(json.dumps(task.to_dict()))) == task
    for answer in task.all_answers():
        assert task.parse_answer(task.format_answer(answer)) == answer


def test_shipped_tasks_are_all_tested():
    assert shipped_tasks() == ["reddit_moderation", "reddit_moderation_8shot", "support_email_triage"]


def test_default_task_fields(task):
    assert task.fields == {"tone": ("aggressive", "neutral", "friendly"),
                           "sentiment": ("positive", "neutral", "negative"),
                           "safety": ("safe", "harmful"), "toxicity": ("toxic", "respectful")}
    assert task.input_name == "Comment"
    assert len(list(task.all_answers())) == 36
    assert next(task.all_answers()) == {"tone": "aggressive", "sentiment": "positive", "safety": "safe",
                                        "toxicity": "toxic"}


def test_email_task_values_are_strings():
    # bare yes/no would be YAML booleans; the shipped file quotes them
    assert load_task("support_email_triage").fields["needs_human"] == ("yes", "no")


def test_format_answer_is_canonical(task):
    shuffled = dict(reversed(ANSWER.items()))
    assert task.format_answer(shuffled) == \
        '{"tone": "aggressive", "sentiment": "negative", "safety": "harmful", "toxicity": "toxic"}'
    with pytest.raises(TaskError, match="tone: 'angry' is not allowed"):
        task.format_answer({**ANSWER, "tone": "angry"})


def test_parse_answer_accepts_any_field_order_and_spacing(task):
    assert task.parse_answer(' {"toxicity":"toxic","safety":"harmful","sentiment":"negative","tone":"aggressive"}\n') \
        == ANSWER
    assert list(task.parse_answer(json.dumps(dict(reversed(ANSWER.items()))))) == list(task.fields)


@pytest.mark.parametrize("text", [
    "",
    "not json",
    '{"tone": "aggressive"',  # truncated
    '["aggressive", "negative", "harmful", "toxic"]',
    '{"tone": "aggressive", "sentiment": "negative", "safety": "harmful"}',  # missing field
    '{"tone": "aggressive", "sentiment": "negative", "safety": "harmful", "toxicity": "toxic", "x": "y"}',
    '{"tone": "angry", "sentiment": "negative", "safety": "harmful", "toxicity": "toxic"}',  # value
    '{"tone": "Aggressive", "sentiment": "negative", "safety": "harmful", "toxicity": "toxic"}',  # case
    '{"tone": 1, "sentiment": "negative", "safety": "harmful", "toxicity": "toxic"}',
])
def test_parse_answer_rejects(task, text):
    assert task.parse_answer(text) is None


@pytest.mark.parametrize("changes, message", [
    ({"fieldz": {}}, "fieldz: unknown key"),
    ({"fields": {}}, "fields: give at least one field"),
    ({"fields": {"mood": []}}, "fields.mood: give at least one allowed value"),
    ({"fields": {"mood": ["happy", "sad", "happy"]}}, r"fields.mood: duplicate values \['happy'\]"),
    ({"fields": {"mood": ['say "hi"', "sad"]}}, "fields.mood: value 'say \"hi\"' contains a double quote"),
    ({"fields": {"mood": ["a\\b", "sad"]}}, "fields.mood: value 'a\\\\\\\\b' contains a double quote, backslash"),
    ({"fields": {"mood": ["two\nlines", "sad"]}}, "fields.mood: value 'two\\\\nlines' contains"),
    ({"fields": {"mood": ["", "sad"]}}, "fields.mood: a value must not be empty"),
    ({"fields": {"needs_human": [True, False]}}, "fields.needs_human: value True is not a string"),
    ({"fields": {'mo"od': ["a"]}}, "fields.'mo\"od': a field name must be non-empty"),
    ({"fields": {"mood": "happy"}}, "fields.mood: must be a list of allowed values"),
    ({"examples": [{"comment": "hi", "answer": {"mood": "angry", "topic": "cats"}}]},
     r"examples\[0\].answer: mood: 'angry' is not allowed \(allowed: happy, sad\)"),
    ({"examples": [{"comment": "hi", "answer": {"mood": "happy", "topik": "cats"}}]},
     r"examples\[0\].answer: unknown field 'topik'"),
    ({"examples": [{"comment": "hi", "answer": {"mood": "happy"}}]}, r"examples\[0\].answer: missing field 'topic'"),
    ({"examples": [{"comment": "hi"}]}, r"examples\[0\]: must be a mapping with exactly the keys comment and answer"),
    ({"examples": [{"comment": "", "answer": {"mood": "happy", "topic": "cats"}}]},
     r"examples\[0\].comment: must be a non-empty string"),
    ({"instruction": "Label {comment} please."}, "instruction: must not contain {comment}"),
    ({"instruction": ""}, "instruction: must not be empty"),
    ({"input_name": "Two\nlines"}, "input_name: must be one non-empty line"),
    ({"format_version": 2}, "format_version: 2 is not supported"),
])
def test_task_errors_are_one_line_and_name_the_file_and_field(tmp_path, changes, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny(**changes)))
    with pytest.raises(TaskError, match=message) as err:
        load_task(str(path))
    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


def test_missing_key():
    data = tiny()
    del data["instruction"]
    with pytest.raises(TaskError, match="instruction: missing"):
        Task.from_dict(data, source="t.yaml")


def test_unknown_task_and_bad_yaml(tmp_path):
    with pytest.raises(TaskError, match="no_such_task: no such task file, nor a shipped task .*reddit_moderation"):
        load_task("no_such_task")
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(TaskError, match="broken.yaml: not valid YAML"):
        load_task(str(path))


def test_task_from_a_path(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny()))
    task = load_task(str(path))
    assert task.fields == {"mood": ("happy", "sad"), "topic": ("cats", "dogs")}
    assert task.description == "" and task.input_name == "Comment"


def test_fewshot_prompt_parts(task):
    prefix, suffix = task.prompt_parts("fewshot")
    assert prefix.startswith(task.instruction + "\n\nComment:\n" + task.examples[0][0] + "\nAnswer:\n{\"tone\": ")
    assert prefix.endswith('"toxicity": "respectful"}\n\nComment:\n')
    assert prefix.count("Comment:\n") == 4 and prefix.count("Answer:\n") == 3
    assert suffix == "\nAnswer:\n"
    for comment, answer in task.examples:
        assert f"Comment:\n{comment}\nAnswer:\n{task.format_answer(answer)}\n\n" in prefix
    assert "<bos>" not in prefix


def test_fewshot_prompt_is_short(task, gemma_tokenizer):
    prefix, suffix = task.prompt_parts("fewshot")
    assert len(gemma_tokenizer.encode(prefix + suffix, add_special_tokens=False)) <= 150


def test_prompt_pieces_encode_like_the_whole_prompt(task, gemma_chat_tokenizer):
    """Prefix, comment and suffix encoded apart give the ids of the whole prompt: boundaries sit at newlines."""
    comments = ["Thanks so much, this made my day!", "lol ok", "Is this in New Orleans?? I really feel like it.",
                "You know the answer man, don’t avoid them!", "WHY THE FUCK IS BAYLESS ISOING", "[NAME] is 100% right."]

    def enc(text):
        return gemma_chat_tokenizer.encode(text, add_special_tokens=False)

    for style in ("fewshot", "chat"):
        prefix, suffix = task.prompt_parts(style, gemma_chat_tokenizer)
        for comment in comments:
            assert enc(prefix) + enc(comment) + enc(suffix) == enc(prefix + comment + suffix), (style, comment)


def test_chat_prompt_parts(task, gemma_chat_tokenizer):
    prefix, suffix = task.prompt_parts("chat", gemma_chat_tokenizer)
    fewshot_prefix, _ = task.prompt_parts("fewshot")
    assert prefix == "<start_of_turn>user\n" + fewshot_prefix  # BOS stripped: the encoder adds it
    assert suffix == "<end_of_turn>\n<start_of_turn>model\n"
    assert task.prompt_parts("auto", gemma_chat_tokenizer) == (prefix, suffix)


def test_resolve_style(gemma_tokenizer):
    assert resolve_style("auto", gemma_tokenizer) == "fewshot"  # the embedded base model has no template
    assert resolve_style("fewshot", gemma_tokenizer) == "fewshot"
    with pytest.raises(TaskError, match="task.prompt_style=chat: the tokenizer has no chat template"):
        resolve_style("chat", gemma_tokenizer)
    with pytest.raises(TaskError, match="must be auto, chat or fewshot"):
        resolve_style("zeroshot", gemma_tokenizer)


def test_resolve_style_chat(gemma_chat_tokenizer):
    assert resolve_style("auto", gemma_chat_tokenizer) == "chat"
