"""Chat SFT data: assistant-only loss mask, its packing beside segment ids, the masked loss."""

import json

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.data import chat, load_tokenizer
from ling_jax.data.packing import MASKED_EXAMPLE_FEATURES, pack_examples
from ling_jax.model.transformer import LingOutput
from ling_jax.train.loss import compute_loss, token_cross_entropy

ROLE_END = "<|role_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    docs = [chat.ArithmeticChatReader(200).read(i) for i in range(200)]
    return load_tokenizer("", None, docs, vocab_size=300)


def _example(tokenizer, index):
    return chat.TokenizeChat(tokenizer).map(chat.ArithmeticChatReader(50).read(index))


def test_mask_covers_exactly_the_assistant_reply(tokenizer):
    for index in (0, 1):  # Thinking on, then off.
        conversation = chat.arithmetic_conversation(index)
        ex = _example(tokenizer, index)
        trained = ex["targets"][ex["loss_mask"] > 0]
        reply = conversation["messages"][1]["content"]
        text = tokenizer.decode(trained)
        # The reply (its <think> block rendered by the template), role_end and EOS; no prompt.
        assert text.endswith(ROLE_END + "<|endoftext|>"), text
        assert reply.split("</think>")[-1].strip() in text
        assert "HUMAN" not in text and "SYSTEM" not in text
        assert ("<think>" in text) == (conversation["thinking"] == "on")
        # Everything before the first trained target is the prompt, ending with the header.
        first = int(np.argmax(ex["loss_mask"] > 0))
        prompt = tokenizer.decode(ex["input_ids"][: first + 1])
        assert prompt.endswith("<role>ASSISTANT</role>"), prompt
        assert ex["loss_mask"][first:].all()


def test_packing_keeps_masks_aligned_with_segments(tokenizer):
    examples = [_example(tokenizer, i) for i in range(6)]
    seq_len = 48  # Shorter than an example: documents are split across rows.
    rows = list(
        pack_examples(
            grain.MapDataset.source(examples).to_iter_dataset(),
            seq_len=seq_len,
            pad_id=tokenizer.pad_id,
            features=MASKED_EXAMPLE_FEATURES,
        )
    )
    # Re-assemble each example's tokens and mask from the packed rows, in order.
    flat_ids = np.concatenate([r["input_ids"][r["segment_ids"] > 0] for r in rows])
    flat_mask = np.concatenate([r["loss_mask"][r["segment_ids"] > 0] for r in rows])
    np.testing.assert_array_equal(flat_ids, np.concatenate([e["input_ids"] for e in examples]))
    np.testing.assert_array_equal(flat_mask, np.concatenate([e["loss_mask"] for e in examples]))
    for r in rows:
        assert not r["loss_mask"][r["segment_ids"] == 0].any()  # Never on padding.
    assert any((r["segment_ids"] == 0).any() for r in rows)  # The last row is padded.


def test_masked_loss_is_the_loss_over_assistant_tokens(tokenizer):
    ex = _example(tokenizer, 3)
    n = ex["input_ids"].shape[0]
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, n, tokenizer.vocab_size)), jnp.float32)
    batch = {
        "input_ids": ex["input_ids"][None],
        "targets": ex["targets"][None],
        "segment_ids": np.ones((1, n), np.int32),
        "positions": np.arange(n)[None],
        "loss_mask": ex["loss_mask"][None],
    }
    output = LingOutput(logits=logits, mtp_logits=None, moe_stats=None, mtp_stats=None)
    _, metrics = compute_loss(output, batch, mtp_weight=0.0, z_loss_weight=0.0)
    ce, _ = token_cross_entropy(logits, batch["targets"])
    assistant = np.flatnonzero(ex["loss_mask"])
    np.testing.assert_allclose(metrics["ce"], ce[0, assistant].mean(), rtol=1e-6)
    assert not np.isclose(metrics["ce"], ce.mean(), rtol=1e-4)  # The prompt is left out.


def test_bad_conversations_are_named(tokenizer):
    tokenize = chat.TokenizeChat(tokenizer)
    with pytest.raises(ValueError, match="not JSON"):
        tokenize.map("{oops")
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize.map(json.dumps([{"role": "user", "content": "hi"}]))
    with pytest.raises(ValueError, match="thinking"):
        tokenize.map(
            json.dumps({"messages": [{"role": "assistant", "content": "a"}], "thinking": 1})
        )
    with pytest.raises(ValueError, match="chat_thinking"):
        chat.TokenizeChat(tokenizer, thinking="maybe")


def test_jsonl_chat_source_reads_whole_conversations(tmp_path):
    lines = [chat.arithmetic_conversation(i) for i in range(3)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in lines))
    source = chat.chat_jsonl_source(str(path), field="train_files")
    assert len(source) == 3
    messages, thinking = chat.parse_conversation(source[1], "mixed")
    assert messages == lines[1]["messages"] and thinking == "off"


def test_build_datasets_in_chat_mode(tmp_path):
    from ling_jax import data
    from tests.data.helpers import tiny_config

    cfg = tiny_config(chat=True, embedded_arithmetic_docs=200, tokenizer_train_max_bytes=30_000)
    train, validation, tok = data.build_datasets(cfg, workdir=str(tmp_path), batch_size=2)
    batch = next(iter(train))
    real = batch["segment_ids"] > 0
    # Prompts are real tokens without loss; replies are trained.
    assert (real & (batch["loss_mask"] == 0)).any() and batch["loss_mask"].any()
    assert not batch["loss_mask"][~real].any()
    assert "<role>HUMAN</role>" in tok.decode(batch["input_ids"][0])
    assert validation is not None
