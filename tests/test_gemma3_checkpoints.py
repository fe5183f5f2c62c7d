"""The teacher on tiny checkpoints with the structure of each Gemma 3 it meets, built here from configs:

- `4b-it`: google/gemma-3-4b-it: a multimodal Gemma3Config (the language model's settings on its text
  config), Gemma3ForConditionalGeneration with a vision tower, 262,208 embedding rows, the -it tokenizer
  (262,145 entries: <image_soft_token> last) with the published chat template;
- `1b-it`: google/gemma-3-1b-it: text-only Gemma3ForCausalLM, 262,144 embedding rows, the same -it tokenizer;
- `270m`: the embedded base teacher: text-only, 262,144 rows, the base tokenizer (no chat template).

Every one: the fast path writes the plain path's records, a sliding window shorter than the sequences
sends every batch to the plain path, and the student's input vocabulary is the tokenizer's.
"""

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Gemma3Config, Gemma3ForCausalLM,
                          Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig)

from distill.extract import prepare
from distill.model import StudentConfig, build_student
from distill.teacher import Teacher, load_teacher
from tests.conftest import tiny_config

# google/gemma-3-4b-it's chat template (tokenizer_config.json), the same in 1b-it.
GEMMA3_IT_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

STRUCTURES = ("4b-it", "1b-it", "270m")
WINDOW = 4096  # longer than any prompt + answer here: the fast path is exact
SHORT_WINDOW = 64  # shorter than the prompt: only the plain path is exact


def text_config(vocab_size: int, **extra) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=8192, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=2, eos_token_id=1, **extra)


def build_checkpoint(structure: str, path, tokenizer) -> None:
    torch.manual_seed(0)
    if structure == "4b-it":
        vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        config = Gemma3Config(text_config=text_config(262208).to_dict(), vision_config=vision.to_dict(),
                              mm_tokens_per_image=4, image_token_index=262144)
        model = Gemma3ForConditionalGeneration(config)
    else:  # final soft-capping (none in the published configs) so the fast path's own capping is checked too
        model = Gemma3ForCausalLM(text_config(262144, final_logit_softcapping=5.0))
    with torch.no_grad():  # a larger output scale than the init's, so greedy choices are not near-ties
        model.get_input_embeddings().weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module", params=STRUCTURES)
def checkpoint(request, gemma_tokenizer, tmp_path_factory):
    """(structure, local checkpoint directory, its extraction set-up)."""
    structure = request.param
    path = tmp_path_factory.mktemp(f"gemma3-{structure}")
    tokenizer = AutoTokenizer.from_pretrained(gemma_tokenizer.name_or_path)  # a copy to change
    if structure.endswith("-it"):
        tokenizer.add_tokens(["<image_soft_token>"], special_tokens=True)
        tokenizer.chat_template = GEMMA3_IT_CHAT_TEMPLATE
    build_checkpoint(structure, path, tokenizer)
    p = prepare(tiny_config(str(path), str(tmp_path_factory.mktemp("records")), "corpus.limit=8"))
    return structure, str(path), p


def comments(p, n: int = 6) -> list[list[int]]:
    return [p.tokenizer.encode(t, add_special_tokens=False) for t in p.corpus.head(n).column("text").to_pylist()]


def assert_same_records(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.teacher_ids == y.teacher_ids
        torch.testing.assert_close(y.logits, x.logits, atol=2e-3, rtol=2e-3)


def test_it_tokenizers_and_the_chat_prompt(checkpoint):
    structure, _, p = checkpoint
    if structure == "270m":
        assert len(p.tokenizer) == 262144 and p.style == "fewshot" and p.grammar.end_id == p.tokenizer.eos_token_id
        return
    assert len(p.tokenizer) == 262145 and p.style == "chat"
    assert p.prefix.startswith("<start_of_turn>user\n") and p.suffix == "<end_of_turn>\n<start_of_turn>model\n"
    assert p.grammar.end_id == p.tokenizer.convert_tokens_to_ids("<end_of_turn>")


def test_fast_path_writes_the_plain_paths_records(checkpoint):
    structure, _, p = checkpoint
    teacher = load_teacher(p.cfg.teacher, p.prefix, p.suffix, p.grammar, p.vocab, p.tokenizer, torch.device("cpu"))
    assert isinstance(teacher.model, Gemma3ForCausalLM)  # 4B-it: its language model only, no vision tower
    assert not any("vision" in name for name, _ in teacher.model.named_parameters())
    assert teacher.window == WINDOW and teacher.softcap == (None if structure == "4b-it" else 5.0)
    batch = comments(p)
    answers = teacher.answer_plain(batch)
    assert all(a.teacher_ids[-1] == p.grammar.end_id for a in answers)
    assert_same_records(answers, teacher.answer_fast(batch))


def test_a_short_sliding_window_sends_batches_to_the_plain_path(checkpoint, monkeypatch):
    """On the whole checkpoint as transformers loads it (4B-it: the multimodal model, its window on the text config)."""
    _, path, p = checkpoint
    config = AutoConfig.from_pretrained(path)
    config.get_text_config().sliding_window = SHORT_WINDOW
    model = AutoModelForCausalLM.from_pretrained(path, config=config)
    teacher = Teacher(model, p.tokenizer, p.prefix, p.suffix, p.grammar, p.vocab)
    assert teacher.window == SHORT_WINDOW
    batch = comments(p, 3)
    plain, fast = teacher.answer_plain(batch), teacher.answer_fast(batch)
    assert max((a.logits - b.logits).abs().max() for a, b in zip(plain, fast)) > 1e-2  # the window matters here
    monkeypatch.setattr(teacher, "answer_fast", lambda _: pytest.fail("the fast path ignores the sliding window"))
    assert_same_records(plain, teacher.answer(batch))


def test_student_input_vocabulary_is_the_tokenizers(checkpoint, capsys):
    structure, path, p = checkpoint
    assert StudentConfig().input_vocab_size is None  # taken from the tokenizer when training starts
    student = build_student(StudentConfig(preset="tiny", input_vocab_size=len(p.tokenizer)))
    embedding = AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().weight  # (262,208 or 262,144, 32)
    student.init_embedding_from_teacher(embedding)
    said = capsys.readouterr().out
    if structure == "1b-it":  # 262,145 ids, 262,144 rows: <image_soft_token> starts as the mean row
        assert said.count("\n") == 1 and "262,144 rows for 262,145 tokenizer ids" in said
    else:
        assert "rows for" not in said
    assert student.embed.weight.shape[0] == len(p.tokenizer)
