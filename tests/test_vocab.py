"""The output vocabulary: required answer tokens first, deterministic auxiliary tokens, save/load."""

import json

import pytest

from distill.vocab import VOCAB_FORMAT_VERSION, OutputVocab, VocabError, build_output_vocab

CORPUS = [
    "I love this so much, thank you!",
    "This is the worst thing I have ever seen.",
    "lol that's hilarious",
    "I don't think that's how it works, but ok.",
    "What a great game last night!",
    "Nobody asked for your opinion.",
] * 3 + ["the the the the"]


@pytest.fixture(scope="module")
def prompt(task):
    return "".join(task.prompt_parts("fewshot"))


@pytest.fixture(scope="module")
def vocab(grammar, gemma_tokenizer, prompt):
    return build_output_vocab(grammar, gemma_tokenizer, 525, prompt, CORPUS)


def test_size_and_required_tokens(vocab, grammar, task, gemma_tokenizer):
    assert len(vocab) == 525
    assert vocab.n_required == len(grammar.token_ids()) == 20
    assert list(vocab.ids[:vocab.n_required]) == grammar.token_ids()
    assert grammar.end_id in vocab.ids[:vocab.n_required]
    assert len(set(vocab.ids)) == 525
    assert vocab.strings == tuple(gemma_tokenizer.convert_ids_to_tokens(list(vocab.ids)))
    for answer in task.all_answers():
        for token in grammar.encode_answer(answer):
            assert vocab.index(token) < vocab.n_required


def test_auxiliary_priority(vocab, gemma_tokenizer, prompt):
    def position(text):
        ids = gemma_tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, (text, ids)
        return vocab.index(ids[0])

    n = vocab.n_required
    assert [vocab.strings[i] for i in range(n, n + 5)] == ["▁", "\n", "\n\n", "\t", "▁▁"]  # whitespace first
    twins = {"▁tone", "▁sentiment", "▁aggressive", '"', "▁harm", "▁ful"}  # '▁' twins of required tokens
    assert twins <= set(vocab.strings[n:n + 40])
    assert position(" harmful") < position("Label")  # value-word variants before prompt tokens
    assert position("Label") < position(" hilarious")  # prompt tokens before corpus tokens
    assert position(" the") < position(" hilarious")  # corpus: most frequent first
    prompt_ids = set(gemma_tokenizer.encode(prompt, add_special_tokens=False))
    corpus_ids = {t for text in CORPUS for t in gemma_tokenizer.encode(text, add_special_tokens=False)}
    assert prompt_ids | corpus_ids <= set(vocab.ids)


def test_no_special_tokens_but_the_end_id(vocab, grammar, gemma_tokenizer):
    special = {i for i, t in gemma_tokenizer.added_tokens_decoder.items() if t.special}
    assert set(vocab.ids) & special == {grammar.end_id}
    assert "<bos>" not in vocab.strings and "<start_of_turn>" not in vocab.strings


def test_deterministic(vocab, grammar, gemma_tokenizer, prompt):
    again = build_output_vocab(grammar, gemma_tokenizer, 525, prompt, iter(CORPUS))  # any iterable
    assert again == vocab and again.fingerprint() == vocab.fingerprint()


def test_small_corpus_is_filled_up(grammar, gemma_tokenizer):
    vocab = build_output_vocab(grammar, gemma_tokenizer, 300, "", [])
    assert len(vocab) == 300 and vocab.n_required == 20


def test_too_small_size_says_how_many_are_required(grammar, gemma_tokenizer):
    with pytest.raises(VocabError, match=r"vocab.size=10 is too small: task reddit_moderation needs 20 required "
                                         r"answer tokens \(end id included\); set vocab.size >= 20"):
        build_output_vocab(grammar, gemma_tokenizer, 10, "", CORPUS)
    assert len(build_output_vocab(grammar, gemma_tokenizer, 20, "", CORPUS)) == 20  # exactly the required


def test_index_and_errors(vocab):
    assert vocab.indices(vocab.ids[:5]) == [0, 1, 2, 3, 4]
    with pytest.raises(KeyError, match="teacher token id 2 is not in the output vocabulary"):
        vocab.index(2)  # <bos>


def test_save_load_round_trip(vocab, tmp_path):
    path = str(tmp_path / "vocab" / "output_vocab.json")
    vocab.save(path)
    loaded = OutputVocab.load(path)
    assert loaded == vocab and loaded.fingerprint() == vocab.fingerprint()
    assert loaded.index(vocab.ids[-1]) == len(vocab) - 1
    data = json.loads(open(path, encoding="utf-8").read())
    assert data["format_version"] == VOCAB_FORMAT_VERSION and data["n_required"] == 20
    assert OutputVocab.from_dict(vocab.to_dict()) == vocab


@pytest.mark.parametrize("ids, strings, n_required, message", [
    ((1, 2), ("a",), 1, "2 ids but 1 strings"),
    ((1, 1), ("a", "a"), 1, "duplicate ids"),
    ((1, 2), ("a", "b"), 0, "n_required=0"),
    ((2, 1), ("b", "a"), 2, "required ids must come first, sorted"),
])
def test_invalid_vocab(ids, strings, n_required, message):
    with pytest.raises(VocabError, match=message):
        OutputVocab(ids, strings, n_required)


def test_unknown_format_version(vocab):
    with pytest.raises(VocabError, match="format_version=2"):
        OutputVocab.from_dict({**vocab.to_dict(), "format_version": 2})
