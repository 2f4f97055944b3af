"""Ling's chat format against the released template (reference tokenizer_config.json)."""

from __future__ import annotations

import json
import os

import pytest

from ling_jax.infer.chat import (
    apply_chat_template,
    generation_stop_ids,
    ling_chat_prompt,
    load_tokenizer_config,
    render_chat_template,
    with_thinking_mode,
)

# Ling-mini-2.0's released tokenizer_config.json, special_tokens_map.json and
# generation_config.json, copied verbatim into the repository so the tests are self-contained.
REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "ling_tokenizer_sft")


@pytest.fixture(scope="module")
def template() -> str:
    return load_tokenizer_config(REFERENCE)["chat_template"]


CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hi"}],
    "system": [{"role": "system", "content": "You are Ling."}, {"role": "user", "content": "Hi"}],
    "multi_turn_think": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "\n<think>r2</think>A2"},
    ],
    "reasoning_field": [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "reasoning_content": "\nR\n"},
    ],
    "tools": [
        {"role": "user", "content": "Q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "f", "arguments": {"x": 1, "é": "<b>"}}},
                {"name": "g", "arguments": '{"y": 2}'},
            ],
        },
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
        {"role": "assistant", "content": "<think>t</think>done"},
    ],
    "tool_response_as_user": [
        {"role": "user", "content": "Q"},
        {"role": "system", "content": "mid"},
        {"role": "user", "content": "<tool_response>x</tool_response>"},
        {"role": "assistant", "content": "<think>z</think>w"},
    ],
}
TOOLS = [{"type": "function", "function": {"name": "f", "description": "d <x> & é"}}]


def test_direct_format_by_hand():
    messages = CONVERSATIONS["system"]
    assert ling_chat_prompt(messages, thinking="on") == (
        "<role>SYSTEM</role>You are Ling.\ndetailed thinking on<|role_end|>"
        "<role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>"
    )
    assert ling_chat_prompt(CONVERSATIONS["user"], add_generation_prompt=False) == (
        "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>Hi<|role_end|>"
    )
    # Reasoning is kept only after the last user query, in a <think> block.
    text = ling_chat_prompt(CONVERSATIONS["multi_turn_think"], add_generation_prompt=False)
    assert text.endswith(
        "<role>HUMAN</role>Q1<|role_end|><role>ASSISTANT</role>A1<|role_end|>"
        "<role>HUMAN</role>Q2<|role_end|><role>ASSISTANT</role>\n<think>\nr2\n</think>\n\nA2"
        "<|role_end|>"
    )


def test_template_holds_the_format_pieces(template):
    for piece in (
        "{% set thinking_option = 'off' %}",
        "'<role>SYSTEM</role>'",
        "'detailed thinking ' + thinking_option + '<|role_end|>'",
        "'<role>HUMAN</role>' + message.content + '<|role_end|>'",
        "'<role>ASSISTANT</role>'",
        "'<role>OBSERVATION</role>'",
    ):
        assert piece in template, piece
    assert "thinking_option = 'on'" in with_thinking_mode(template, "on")
    assert with_thinking_mode(template, "off") == template


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", ["on", "off"])
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no_tools", "tools"])
def test_direct_format_equals_the_jinja_template(template, name, thinking, tools):
    messages = CONVERSATIONS[name]
    for generation_prompt in (True, False):
        kwargs = dict(thinking=thinking, tools=tools, add_generation_prompt=generation_prompt)
        assert ling_chat_prompt(messages, **kwargs) == render_chat_template(
            template, messages, **kwargs
        )


def test_apply_falls_back_without_a_template():
    messages = CONVERSATIONS["user"]
    assert apply_chat_template(messages, thinking="on") == ling_chat_prompt(messages, thinking="on")


def test_thinking_mode_is_checked():
    with pytest.raises(ValueError, match="thinking"):
        ling_chat_prompt(CONVERSATIONS["user"], thinking="yes")


def test_generation_stop_ids(tmp_path):
    assert generation_stop_ids(REFERENCE) == [156892, 156895]
    assert generation_stop_ids(str(tmp_path)) == []
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert generation_stop_ids(str(tmp_path / "tokenizer.json")) == [7]
