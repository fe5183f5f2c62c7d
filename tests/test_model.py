"""The student (distill/model.py): parts against transformers' Gemma 3, causality,
padding, parameter counts of every preset, teacher-initialised embeddings, training."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3MLP,
    Gemma3RMSNorm,
    Gemma3RotaryEmbedding,
    apply_rotary_pos_emb,
)

from distill.model import (
    MLP,
    PRESETS,
    Attention,
    KVCache,
    RMSNorm,
    Student,
    StudentConfig,
    apply_rotary,
    build_student,
    format_param_overview,
    rotary_cos_sin,
)

# a small input vocabulary keeps the embedding small where the preset's size is not the point
SMALL = dict(preset="tiny", input_vocab_size=1000, output_vocab_size=37)


def gemma_config(theta: float = 10000.0) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        hidden_activation="gelu_pytorch_tanh", layer_types=["full_attention"] * 2,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": theta}},
    )


# -----------------------------------------------------------------------------
# Parts, against Gemma 3 in transformers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_gemma3(dtype):
    torch.manual_seed(0)
    ours, theirs = RMSNorm(64), Gemma3RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = (3 * torch.randn(2, 5, 64)).to(dtype)
    y = ours(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, theirs(x), rtol=0, atol=0)


def test_rmsnorm_starts_as_plain_rms_normalisation():
    x = torch.randn(3, 64)
    y = RMSNorm(64)(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rotary_matches_gemma3(theta):
    torch.manual_seed(0)
    B, H, T, Dh = 2, 4, 11, 16
    rope = Gemma3RotaryEmbedding(gemma_config(theta))
    q, k = torch.randn(B, H, T, Dh), torch.randn(B, H, T, Dh)
    position_ids = torch.arange(T)[None].expand(B, T)
    cos_ref, sin_ref = rope(q, position_ids, "full_attention")  # (B, T, Dh)
    cos, sin = rotary_cos_sin(torch.arange(T), Dh, theta)  # (T, Dh)
    torch.testing.assert_close(cos, cos_ref[0])
    torch.testing.assert_close(sin, sin_ref[0])
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_ref)
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_ref)


def test_mlp_matches_gemma3():
    torch.manual_seed(0)
    cfg = StudentConfig(**SMALL)
    ours = MLP(cfg)
    theirs = Gemma3MLP(gemma_config())
    theirs.load_state_dict(ours.state_dict())  # same names: gate_proj, up_proj, down_proj
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_attention_matches_naive_softmax_attention():
    torch.manual_seed(0)
    cfg = StudentConfig(**SMALL)
    attn = Attention(cfg)
    B, T, D, H, Dh = 2, 9, cfg.d_model, cfg.n_heads, cfg.head_dim
    x = torch.randn(B, T, D)
    cos, sin = rotary_cos_sin(torch.arange(T), Dh, cfg.rope_theta)
    q = apply_rotary(attn.q_proj(x).view(B, T, H, Dh).transpose(1, 2), cos, sin)
    k = apply_rotary(attn.k_proj(x).view(B, T, H, Dh).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, T, H, Dh).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))
    torch.testing.assert_close(attn(x, cos, sin, None), ref, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# The whole student


def test_forward_shape_and_context_limit():
    torch.manual_seed(0)
    model = build_student(StudentConfig(input_vocab_size=262144))  # the real tiny preset, Gemma 3 tokenizer
    ids = torch.randint(0, 262144, (3, model.cfg.context))
    logits = model(ids)
    assert logits.shape == (3, 75, 525) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 76, dtype=torch.long))


def test_forward_runs_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_student(StudentConfig(**SMALL))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 1000, (2, 10)), torch.ones(2, 10, dtype=torch.bool))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_causal_later_tokens_do_not_change_earlier_logits():
    torch.manual_seed(0)
    model = build_student(StudentConfig(**SMALL)).eval()
    ids = torch.randint(0, 1000, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 1000, (2, 8))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])
    # the same with an explicit attention mask (the masked path of attention)
    mask = torch.ones(2, 20, dtype=torch.bool)
    torch.testing.assert_close(model(ids, mask)[:, :12], model(changed, mask)[:, :12])


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_single_examples(side):
    torch.manual_seed(0)
    model = build_student(StudentConfig(**SMALL)).eval()
    lengths = [5, 9, 3]
    seqs = [torch.randint(1, 1000, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        where = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, where], mask[i, where] = s, True
    batched = model(ids, mask)
    assert torch.isfinite(batched).all()  # padded rows too: no fully masked attention row
    for i, s in enumerate(seqs):
        single = model(s[None])[0]  # (n, V_out)
        # left padding works too because RoPE only sees relative positions
        torch.testing.assert_close(batched[i][mask[i]], single, rtol=1e-4, atol=1e-5)



def test_kv_cache_reads_in_padded_chunks_give_the_full_forward_logits():
    """Rows read their tokens in chunks of different lengths, left-padded, with rows dropped
    on the way (KVCache.keep): every real token's logits equal one unpadded forward pass."""
    torch.manual_seed(0)
    model = build_student(StudentConfig(**SMALL, n_layers=3)).eval()
    seqs = [torch.randint(1, 1000, (n,)) for n in (11, 17, 6, 14)]
    cuts = [[4, 7, 8, 11], [9, 10, 16, 17], [1, 6], [2, 3, 9, 14]]  # chunk ends per row
    full = [model(s[None])[0] for s in seqs]  # (n, V_out) each
    cache, rows, got = KVCache(3), [0, 1, 2, 3], [[] for _ in seqs]
    for k in range(4):
        if k == 2:  # row 2 is done: it leaves the cache
            cache.keep(torch.tensor([0, 1, 3]))
            rows = [0, 1, 3]
        chunks = [seqs[r][(cuts[r][k - 1] if k else 0):cuts[r][k]] for r in rows]
        W = max(len(c) for c in chunks)
        ids = torch.zeros(len(rows), W, dtype=torch.long)
        real = torch.zeros(len(rows), W, dtype=torch.bool)
        for i, c in enumerate(chunks):
            ids[i, W - len(c):], real[i, W - len(c):] = c, True
        with torch.no_grad():
            logits = model(ids, real, cache=cache)  # (B, W, V_out)
        assert torch.isfinite(logits).all()
        for i, r in enumerate(rows):
            got[r].append(logits[i][real[i]])
    for r, s in enumerate(seqs):
        torch.testing.assert_close(torch.cat(got[r]), full[r], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the student's context 75"):
        model(torch.ones(3, 60, dtype=torch.long), torch.ones(3, 60, dtype=torch.bool), cache=cache)

def test_param_overview_sums_to_the_real_count():
    model = build_student(StudentConfig(**SMALL))
    overview = model.param_overview()
    assert set(overview) == {"embeddings", "attention", "feed_forward", "norms", "output_head", "total"}
    assert overview["total"] == sum(p.numel() for p in model.parameters())
    assert sum(n for name, n in overview.items() if name != "total") == overview["total"]
    d, r, L = 64, 16, 2
    assert overview["embeddings"] == 1000 * r + r * d
    assert overview["norms"] == (2 * L + 1) * d
    assert overview["output_head"] == d * 37
    table = format_param_overview(overview)
    assert "total" in table and "M" in table and "100.0%" in table


@pytest.mark.parametrize("preset,millions", [("50m", 50), ("200m", 200), ("537m", 537)])
def test_preset_totals_are_near_their_names(preset, millions):
    with torch.device("meta"):  # counts without allocating
        model = Student(StudentConfig(preset=preset, input_vocab_size=262144))
    overview = model.param_overview()
    assert overview["total"] == sum(p.numel() for p in model.parameters())
    assert abs(overview["total"] - millions * 1e6) <= 0.1 * millions * 1e6, format_param_overview(overview)


def test_537m_is_the_original_student():
    cfg = StudentConfig(preset="537m", input_vocab_size=262144)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.embed_rank) == (1024, 16, 16, 0)
    assert cfg.input_vocab_size * cfg.d_model == 268_435_456 and cfg.context == 75


def test_config_preset_fills_only_missing_fields():
    cfg = StudentConfig(preset="50m", n_layers=3)
    assert cfg.n_layers == 3 and cfg.d_model == PRESETS["50m"]["d_model"]
    assert StudentConfig(max_comment_tokens=10, max_answer_tokens=20).context == 30


@pytest.mark.parametrize("kwargs,field", [
    (dict(preset="huge"), "student.preset"),
    (dict(d_model=60, n_heads=8), "student.d_model"),
    (dict(d_model=60, n_heads=4), "student.head_dim"),  # d_model / n_heads = 15: odd, no RoPE
    (dict(n_heads=4, n_kv_heads=3), "student.n_kv_heads"),
    (dict(n_layers=2, layer_rope_theta=[1e4]), "student.layer_rope_theta"),
    (dict(embed_rank=64), "student.embed_rank"),
    (dict(embed_rank=-1), "student.embed_rank"),
    (dict(n_layers=0), "student.n_layers"),
    (dict(output_vocab_size=1), "student.output_vocab_size"),
    (dict(dropout=1.0), "student.dropout"),
    (dict(rope_theta=0.0), "student.rope_theta"),
])
def test_config_checks_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.") + "="):
        StudentConfig(**kwargs)


# -----------------------------------------------------------------------------
# Input embedding from the teacher's


def effective_embedding(model: Student) -> torch.Tensor:
    """The (V_in, D) vectors the blocks see, before the sqrt(D) scale."""
    ids = torch.arange(model.cfg.input_vocab_size)
    x = model.embed(ids)
    return model.embed_proj(x) if model.embed_proj is not None else x


def low_rank_teacher(V: int, D_t: int, rank: int) -> torch.Tensor:
    return torch.randn(V, rank) @ torch.randn(rank, D_t) / math.sqrt(rank)


def assert_same_geometry(student: torch.Tensor, teacher: torch.Tensor):
    """Same inner products between token vectors, up to one scale factor."""
    gs, gt = student @ student.T, teacher @ teacher.T
    scale = gs.trace() / gt.trace()
    torch.testing.assert_close(gs, gt * scale, rtol=1e-3, atol=1e-3 * gs.abs().max().item())


def test_teacher_embedding_low_rank():
    torch.manual_seed(0)
    cfg = StudentConfig(**SMALL)  # D 64, R 16
    model = build_student(cfg)
    teacher = low_rank_teacher(1200, 40, rank=16)  # more rows than the input vocabulary: extra dropped
    model.init_embedding_from_teacher(teacher, chunk_rows=256)
    assert model.embed.weight.shape == (1000, 16)
    torch.testing.assert_close(model.embed.weight.pow(2).mean().sqrt(), torch.tensor(cfg.init_std))
    W = model.embed_proj.weight  # (D, R): orthonormal columns times sqrt(D / R)
    torch.testing.assert_close(W.T @ W, torch.eye(16) * 64 / 16, rtol=1e-4, atol=1e-4)
    eff = effective_embedding(model)
    torch.testing.assert_close(eff.pow(2).mean().sqrt(), torch.tensor(cfg.init_std), rtol=1e-4, atol=1e-6)
    assert_same_geometry(eff, teacher[:1000])  # the teacher has rank R, so nothing is lost


def test_teacher_embedding_low_rank_keeps_the_top_directions():
    """A teacher of higher rank than R: the student keeps its best rank-R approximation (SVD)."""
    torch.manual_seed(0)
    model = build_student(StudentConfig(**SMALL))
    teacher = torch.randn(1000, 40)
    model.init_embedding_from_teacher(teacher)
    U, S, Vh = torch.linalg.svd(teacher, full_matrices=False)
    best = U[:, :16] * S[:16]  # (V, R)
    assert_same_geometry(effective_embedding(model), best)


@pytest.mark.parametrize("d_teacher", [64, 40, 96])  # equal to, narrower and wider than D = 64
def test_teacher_embedding_full(d_teacher):
    torch.manual_seed(0)
    cfg = StudentConfig(**{**SMALL, "embed_rank": 0})
    model = build_student(cfg)
    teacher = low_rank_teacher(1000, d_teacher, rank=min(d_teacher, 64) - 8)
    model.init_embedding_from_teacher(teacher)
    assert model.embed_proj is None and model.embed.weight.shape == (1000, 64)
    torch.testing.assert_close(model.embed.weight.pow(2).mean().sqrt(), torch.tensor(cfg.init_std))
    if d_teacher == 64:  # a rescaled copy
        scale = model.embed.weight.norm() / teacher.norm()
        torch.testing.assert_close(model.embed.weight, teacher * scale)
    assert_same_geometry(model.embed.weight, teacher)


def test_teacher_embedding_rejects_bad_shapes():
    model = build_student(StudentConfig(**SMALL))
    with pytest.raises(ValueError, match="embed_rank"):
        model.init_embedding_from_teacher(torch.randn(1000, 8))  # rank 16 > width 8


def test_ids_the_teacher_has_no_row_for_start_as_its_mean_row(capsys):
    """Gemma 3 1B-it: 262,145 tokenizer ids, 262,144 embedding rows."""
    model = build_student(StudentConfig(**SMALL))  # 1,000 input ids
    model.init_embedding_from_teacher(torch.randn(999, 40))
    assert capsys.readouterr().out == ("[student] the teacher's embedding has 999 rows for 1,000 tokenizer ids: "
                                       "the last 1 start as its mean row\n")
    table = model.embed.weight  # (1000, R): a linear map of the teacher's rows, so the mean maps to the mean
    torch.testing.assert_close(table[999], table[:999].mean(0), atol=1e-6, rtol=1e-4)


def test_teacher_embedding_trains_and_predicts():
    torch.manual_seed(0)
    model = build_student(StudentConfig(**SMALL))
    model.init_embedding_from_teacher(torch.randn(1000, 48))
    assert torch.isfinite(model(torch.randint(0, 1000, (2, 8)))).all()


# -----------------------------------------------------------------------------
# Training


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    torch.manual_seed(0)
    model = build_student(StudentConfig(input_vocab_size=262144))  # the tiny preset as shipped
    ids = torch.randint(0, 262144, (4, 30))
    targets = torch.randint(0, 525, (4, 30))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(525), rel=0.1)  # starts near uniform
    assert losses[-1] < 0.7 * losses[0], losses


# -----------------------------------------------------------------------------
# A pruned copy of a Gemma 3 teacher


def gemma_teacher(layers: int = 3):
    """A small random Gemma 3 causal LM: grouped-query attention, q/k norms, sandwich norms, a global layer."""
    from transformers import Gemma3ForCausalLM

    config = Gemma3TextConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh",
        sliding_window=512,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # norms away from their zero init, so copying them is checked too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    return model


def teacher_shaped(teacher, layers: list[int], **change) -> StudentConfig:
    c = teacher.config
    shape = dict(d_model=c.hidden_size, n_layers=len(layers), n_heads=c.num_attention_heads,
                 n_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, d_ff=c.intermediate_size, embed_rank=0,
                 qk_norm=True, post_norms=True, input_vocab_size=c.vocab_size, output_vocab_size=37,
                 query_scale=c.query_pre_attn_scalar ** -0.5,
                 layer_rope_theta=[c.rope_parameters[c.layer_types[i]]["rope_theta"] for i in layers])
    return StudentConfig(**{**shape, **change})


def test_a_copy_of_every_teacher_layer_gives_the_teachers_logits_over_the_output_vocabulary():
    teacher = gemma_teacher(3)
    output_ids = list(range(5, 5 + 37 * 3, 3))
    student = build_student(teacher_shaped(teacher, [0, 1, 2])).eval()
    student.init_from_teacher_layers(teacher.state_dict(), [0, 1, 2], output_ids)
    ids = torch.randint(4, 1000, (2, 12))
    with torch.no_grad():
        expected = teacher(ids).logits[..., output_ids]  # (B, T, 37)
        got = student(ids)  # (B, T, 37)
        # and read through the KV cache in two chunks, as decoding does
        cache = KVCache(3)
        real = torch.ones(2, 7, dtype=torch.bool)
        first = student(ids[:, :7], real, cache=cache)
        second = student(ids[:, 7:], torch.ones(2, 5, dtype=torch.bool), cache=cache)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat((first, second), 1), expected, rtol=1e-4, atol=1e-4)


def test_a_pruned_copy_takes_the_chosen_layers_and_refuses_other_shapes():
    teacher = gemma_teacher(3)
    student = build_student(teacher_shaped(teacher, [0, 2]))
    student.init_from_teacher_layers(teacher.state_dict(), [0, 2], list(range(37)))
    torch.testing.assert_close(student.blocks[1].attn.k_norm.weight, teacher.model.layers[2].self_attn.k_norm.weight)
    torch.testing.assert_close(student.blocks[1].mlp_post_norm.weight,
                               teacher.model.layers[2].post_feedforward_layernorm.weight)
    assert student.cfg.rope_thetas() == [1e4, 1e6]
    # a multimodal (4B-it) checkpoint names its language model model.language_model.*
    multimodal = {k.replace("model.", "model.language_model.", 1): v for k, v in teacher.state_dict().items()}
    again = build_student(teacher_shaped(teacher, [0, 2]))
    again.init_from_teacher_layers(multimodal, [0, 2], list(range(37)))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), student.state_dict().values()))
    for change, message in ((dict(qk_norm=False), "qk_norm"), (dict(d_ff=128), "teacher's sizes"),
                            (dict(n_layers=3, layer_rope_theta=None), "2 teacher layers")):
        other = build_student(teacher_shaped(teacher, [0, 2], **change))
        with pytest.raises(ValueError, match=message):
            other.init_from_teacher_layers(teacher.state_dict(), [0, 2], list(range(37)))
