"""Batch-invariant decoding (pipeline.core.modeling.generate_answers): an answer depends only on
(model, question, decoding policy), never on which other questions share the call or where.

Each question is answered alone, with all the others, shuffled, and in calls of other sizes mixed
with questions from outside the list; every answer must equal, byte for byte, the one it got with
all the others. For the base (fp32), a LoRA adapter on the bf16 base, and a LoRA adapter on the
bitsandbytes 8-bit base, greedy (with the default no-repeat-4-gram ban) and sampled.

The tiny model is built so each cross-row effect shows: untied, initialised large (question-
dependent text), and with RMSNorm weights of 4, so many activations pass LLM.int8()'s outlier
threshold (6.0) and bitsandbytes' outlier columns differ between questions. Run against 87b465a's
`generate_answers` (length-sorted batches, a seed per batch, outliers chosen across the batch),
this test fails; the counts are in docs/decoding.md.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pipeline.core import modeling
from pipeline.core.modeling import DecodingPolicy

ROWS = 4
BUCKET_TOKENS = 8
SYSTEM_PROMPT = "You are a helpful assistant."
QUESTIONS = [
    "Why is the sky blue?",
    "Who wrote Hamlet, and when was it first performed in London?",
    "What is a prime number?",
    "How do bees turn the nectar they collect from flowers into honey, and why does it keep so long?",
    "Name a planet.",
    "How do volcanoes form?",
    "What did the printing press change in Europe, and how quickly did those changes spread?",
]
OTHERS = [
    "What is the capital of France?",
    "Explain how a refrigerator keeps food cold without freezing it.",
    "Why do cats purr?",
    "What is inflation?",
    "How does a bicycle stay upright when it moves, and why does it fall over when it stops?",
]
POLICIES = {
    "greedy": DecodingPolicy(strategy="greedy", no_repeat_ngram_size=4, max_new_tokens=8),
    "sample": DecodingPolicy(strategy="sample", temperature=1.2, top_p=0.9, top_k=50, seed=5,
                             no_repeat_ngram_size=4, max_new_tokens=8),
}


@pytest.fixture(scope="module")
def outlier_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """conftest's tiny Llama, untied, initialised at 0.1, RMSNorm weights 4 (int8 outliers)."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.tie_word_embeddings = False
    config.initializer_range = 0.1
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layernorm.weight"):
                parameter.fill_(4.0)
    folder = tmp_path_factory.mktemp("outlier_llama")
    model.save_pretrained(folder)
    for path in Path(tiny_llama_dir).iterdir():
        if "token" in path.name or path.suffix == ".jinja":
            shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(outlier_llama_dir, tmp_path_factory) -> Path:
    """A random LoRA adapter (q/k/v, non-zero B) that really changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(outlier_llama_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(outlier_llama_dir, adapter_dir):
    """name -> (model, tokenizer): the fp32 base, bf16 and int8 adapters, loaded as served."""
    base = modeling.load_for_inference(outlier_llama_dir, "fp32", device="cpu")
    return {
        "base-fp32": base,
        "lora-bf16": modeling.load_adapter_model(outlier_llama_dir, adapter_dir, "bf16", device="cpu"),
        "lora-int8": modeling.load_adapter_model(outlier_llama_dir, adapter_dir, "int8", device="cpu"),
    }


def answer(model, tokenizer, questions, policy) -> list[str]:
    return modeling.answer_questions(model, tokenizer, questions, SYSTEM_PROMPT, policy, ROWS,
                                     bucket_tokens=BUCKET_TOKENS).answers


def plans(seed: int = 0) -> list[tuple[str, list[str]]]:
    """(name, the questions of one call) for every batch plan; together they answer every
    question of QUESTIONS several times, alone and among others."""
    rng = random.Random(seed)
    shuffled = QUESTIONS[:]
    rng.shuffle(shuffled)
    found = [("shuffled", shuffled), ("reversed", QUESTIONS[::-1])]
    found += [(f"alone {i}", [q]) for i, q in enumerate(QUESTIONS)]
    for size in (3, 6):  # calls of other sizes, each question mixed with outsiders
        for i, question in enumerate(QUESTIONS):
            others = rng.sample(OTHERS + [q for q in QUESTIONS if q != question], size - 1)
            call = [*others[: size // 2], question, *others[size // 2 :]]
            found.append((f"size {size} #{i}", call))
    return found


def differing(model, tokenizer, policy) -> tuple[int, int, list[str]]:
    """(answers compared, answers that differ from the all-at-once reference, examples)."""
    reference = dict(zip(QUESTIONS, answer(model, tokenizer, QUESTIONS, policy), strict=True))
    compared, bad, examples = 0, 0, []
    for name, call in plans():
        for question, got in zip(call, answer(model, tokenizer, call, policy), strict=True):
            if question not in reference:
                continue
            compared += 1
            if got.encode() != reference[question].encode():
                bad += 1
                examples.append(f"{name}: {question!r}: {got!r} != {reference[question]!r}")
    return compared, bad, examples


@pytest.mark.parametrize("strategy", list(POLICIES))
@pytest.mark.parametrize("name", ["base-fp32", "lora-bf16", "lora-int8"])
def test_an_answer_does_not_depend_on_its_batch(models, name, strategy):
    model, tokenizer = models[name]
    policy = POLICIES[strategy]
    compared, bad, examples = differing(model, tokenizer, policy)
    print(f"{name} {strategy}: {bad} of {compared} answers differ from the all-at-once answers")
    assert compared >= len(QUESTIONS) * (2 + 1 + 2)  # other QUESTIONS also come as neighbours
    assert bad == 0, "\n".join(examples[:5])


def test_the_answers_are_real_question_dependent_text(models):
    """Guards the test above against a model whose answers agree trivially."""
    for name, (model, tokenizer) in models.items():
        for policy in POLICIES.values():
            answers = answer(model, tokenizer, QUESTIONS, policy)
            assert all(answers) and len(set(answers)) == len(QUESTIONS), (name, policy.strategy)
    greedy = answer(*models["lora-bf16"], QUESTIONS, POLICIES["greedy"])
    assert greedy != answer(*models["base-fp32"], QUESTIONS, POLICIES["greedy"])
    assert greedy != answer(*models["lora-bf16"], QUESTIONS, POLICIES["sample"])


def test_int8_layers_see_outliers_that_differ_between_questions(models):
    """The 8-bit layers do meet LLM.int8() outliers here, in columns that differ per question:
    without per-sequence computation they would mix the questions of a batch."""
    import bitsandbytes as bnb
    import torch

    model, tokenizer = models["lora-int8"]
    seen: list[frozenset[int]] = []
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt))

    def record(_module, inputs, _output):
        (x,) = inputs
        columns = (x.abs() >= 6.0).reshape(-1, x.shape[-1]).any(dim=0)
        seen.append(frozenset(torch.nonzero(columns).flatten().tolist()))

    handle = layer.register_forward_hook(record)
    try:
        for question in QUESTIONS[:3]:
            answer(model, tokenizer, [question], DecodingPolicy.greedy(1))
    finally:
        handle.remove()
    assert all(seen) and len(set(seen)) > 1


def test_sampling_seeds_per_question_and_policy(models):
    model, tokenizer = models["base-fp32"]
    policy = POLICIES["sample"]
    first = answer(model, tokenizer, QUESTIONS[:3], policy)
    import torch

    torch.manual_seed(12345)  # the global generator plays no part
    assert answer(model, tokenizer, QUESTIONS[:3], policy) == first
    other_seed = answer(model, tokenizer, QUESTIONS[:3], DecodingPolicy(**{**policy.to_dict(), "seed": 6}))
    assert other_seed != first
    twice = answer(model, tokenizer, [QUESTIONS[0], QUESTIONS[0]], policy)
    assert twice == [first[0], first[0]]  # the same question, the same draws


@pytest.mark.parametrize(("lengths", "rows", "bucket", "expected"), [
    ([5, 9, 17, 3, 16], 2, 8, [(24, [2]), (16, [1, 4]), (8, [0, 3])]),
    ([1, 2, 3], 4, 32, [(32, [0, 1, 2])]),
    ([8, 8, 8], 2, 8, [(8, [0, 1]), (8, [2])]),
])
def test_bucket_slabs_group_by_padded_length_longest_first(lengths, rows, bucket, expected):
    assert modeling.bucket_slabs(lengths, rows, bucket) == expected


@pytest.mark.parametrize("n_tokens", [1, 8])
def test_int8_sequences_apart_is_bitwise_each_sequence_alone(models, n_tokens):
    """The fast per-sequence LLM.int8() equals bitsandbytes' own forward on each sequence alone,
    bit for bit, for a decoding step (1 token) and a prompt (8 tokens), while the plain forward
    on the whole batch does not."""
    import bitsandbytes as bnb
    import torch

    model, _ = models["lora-int8"]
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt))
    torch.manual_seed(3)
    x = (torch.randn(4, n_tokens, layer.in_features) * 3).to(torch.bfloat16)
    x[1, 0, 5] = 40.0  # an outlier column only the second sequence has
    alone = torch.cat([layer(x[row : row + 1]) for row in range(x.shape[0])])  # 1 sequence: bnb's forward
    fast = layer(x)
    assert torch.equal(fast, alone)
    bnb_forward = layer.forward.__defaults__[1]  # the layer's own forward, kept by int8_per_sequence
    assert not torch.equal(bnb_forward(x), alone)  # across the batch, the outlier columns mix


@pytest.mark.parametrize(("name", "strategy"), [("base-fp32", "greedy"), ("lora-int8", "sample")])
def test_policies_that_differ_in_no_repeat_share_slabs_and_answer_as_alone(models, name, strategy):
    """The decoding ablation's plain-greedy rows ride in the policy's slabs (predict's one call):
    every answer equals the one its policy gives in a call of its own, byte for byte. (That the
    ban lands on the right rows, where it fires, is the next test's.)"""
    model, tokenizer = models[name]
    policy = POLICIES[strategy]
    no_ban = DecodingPolicy(**{**policy.to_dict(), "no_repeat_ngram_size": 0})
    ban_1 = DecodingPolicy(**{**policy.to_dict(), "no_repeat_ngram_size": 1})
    requests = [(QUESTIONS, policy), (QUESTIONS[:5], no_ban), (QUESTIONS[2:], ban_1)]
    mixed = modeling.answer_question_sets(model, tokenizer, requests, SYSTEM_PROMPT, ROWS,
                                          bucket_tokens=BUCKET_TOKENS)
    assert [len(result.answers) for result in mixed] == [len(questions) for questions, _ in requests]
    for (questions, alone_policy), together in zip(requests, mixed, strict=True):
        assert together.answers == answer(model, tokenizer, questions, alone_policy), alone_policy.describe()


def test_a_per_row_no_repeat_ban_scores_as_transformers_own():
    """`_per_row_no_repeat` gives each row the scores transformers' NoRepeatNGramLogitsProcessor
    gives it in a batch of one size, so a slab of one policy decodes as generate's built-in ban."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor

    torch.manual_seed(0)
    input_ids = torch.randint(0, 6, (4, 30))  # a small vocabulary: many repeated n-grams
    scores = torch.randn(4, 6)
    sizes = [3, 0, 2, 3]
    got = modeling._per_row_no_repeat(sizes)(input_ids, scores)
    for row, size in enumerate(sizes):
        expected = scores[row : row + 1] if size == 0 else NoRepeatNGramLogitsProcessor(size)(
            input_ids[row : row + 1], scores[row : row + 1].clone())
        assert torch.equal(got[row : row + 1], expected), row
    assert torch.isinf(got).any() and not torch.isinf(got[1]).any()


def test_plan_slabs_fills_slabs_across_policies_that_can_share():
    """Policies that differ only in no_repeat_ngram_size share slabs; others never do."""
    greedy = DecodingPolicy.greedy(8)
    banned = DecodingPolicy(no_repeat_ngram_size=4, max_new_tokens=8)
    sampled = DecodingPolicy(strategy="sample", no_repeat_ngram_size=0, max_new_tokens=8)
    items = [modeling._Item(0, i, [1] * 5, banned) for i in range(3)]
    items += [modeling._Item(1, i, [1] * 5, greedy) for i in range(2)]
    items += [modeling._Item(2, 0, [1] * 5, sampled)]
    plan = modeling.plan_slabs(items, rows=4, bucket_tokens=8)
    assert [(policy.strategy, slab) for policy, _, slab in plan] == [("greedy", [0, 1, 2, 3]), ("greedy", [4]),
                                                                      ("sample", [5])]
