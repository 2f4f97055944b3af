"""Ling 2.0's chat format, with the two DFT modes (`detailed thinking on` / `off`, SPEC 11).

    <role>SYSTEM</role>{system + "\\n"}{tools block}detailed thinking off<|role_end|>
    <role>HUMAN</role>{user}<|role_end|><role>ASSISTANT</role>{reply}<|role_end|>...
    <role>ASSISTANT</role>                      (the generation prompt)

Two renderers give the same text: `render_chat_template` runs the `chat_template` of a
`tokenizer_config.json` with jinja2 (as Hugging Face does: trim/lstrip blocks, `tojson` without
key sorting or HTML escaping), and `ling_chat_prompt` implements the same format directly, for
environments without jinja2. The released template hard-codes
`{% set thinking_option = 'off' %}`; the mode is switched by rewriting that statement.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ling_jax.io import paths

THINKING_MODES = ("on", "off")
ROLE_END = "<|role_end|>"
_THINKING_SET = re.compile(r"\{%-?\s*set\s+thinking_option\s*=\s*['\"](on|off)['\"]\s*-?%\}")
_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n'
)

Message = Mapping[str, Any]


def _tojson(value: Any) -> str:
    """Hugging Face's `tojson` filter: no key sorting, no HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


def _check_thinking(thinking: str) -> None:
    if thinking not in THINKING_MODES:
        raise ValueError(f"thinking = {thinking!r}: expected one of {THINKING_MODES}")


def _last_query_index(messages: Sequence[Message]) -> int:
    """Index of the last user turn that is not a wrapped tool response."""
    for index in range(len(messages) - 1, -1, -1):
        m = messages[index]
        content = m.get("content")
        if (
            m.get("role") == "user"
            and isinstance(content, str)
            and not (content.startswith("<tool_response>") and content.endswith("</tool_response>"))
        ):
            return index
    return len(messages) - 1


def _assistant(m: Message, content: str, after_last_query: bool) -> str:
    reasoning = m.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
    if after_last_query and reasoning:
        text = (
            "<role>ASSISTANT</role>\n<think>\n"
            + reasoning.strip("\n")
            + "\n</think>\n\n"
            + content.lstrip("\n")
        )
    else:
        text = "<role>ASSISTANT</role>" + content
    for j, call in enumerate(m.get("tool_calls") or ()):
        if (j == 0 and content) or j > 0:
            text += "\n"
        call = call.get("function") or call
        arguments = call["arguments"]
        if not isinstance(arguments, str):
            arguments = _tojson(arguments)
        text += '<tool_call>\n{"name": "' + call["name"] + '", "arguments": '
        text += arguments + "}\n</tool_call>"
    return text + ROLE_END


def ling_chat_prompt(
    messages: Sequence[Message],
    *,
    thinking: str = "off",
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Renders `messages` ({"role", "content", ...} dicts) in Ling's chat format, directly."""
    _check_thinking(thinking)
    if not messages:
        raise ValueError("ling_chat_prompt: no messages")
    text = "<role>SYSTEM</role>"
    if messages[0].get("role") == "system":
        text += messages[0]["content"] + "\n"
    if tools:
        text += _TOOLS_HEADER + "".join("\n" + _tojson(tool) for tool in tools) + _TOOLS_FOOTER
    text += "detailed thinking " + thinking + ROLE_END
    last_query = _last_query_index(messages)
    for i, m in enumerate(messages):
        role = m.get("role")
        content = m.get("content")
        content = content if isinstance(content, str) else ""
        if role == "user":
            text += "<role>HUMAN</role>" + m["content"] + ROLE_END
        elif role == "system" and i > 0:
            text += "<role>SYSTEM</role>" + content + ROLE_END
        elif role == "assistant":
            text += _assistant(m, content, i > last_query)
        elif role == "tool":
            if i == 0 or messages[i - 1].get("role") != "tool":
                text += "<role>OBSERVATION</role>"
            text += "\n<tool_response>\n" + content + "\n</tool_response>"
            if i == len(messages) - 1 or messages[i + 1].get("role") != "tool":
                text += ROLE_END
    if add_generation_prompt:
        text += "<role>ASSISTANT</role>"
    return text


def with_thinking_mode(template: str, thinking: str) -> str:
    """The template with its hard-coded `thinking_option` set to `thinking`."""
    _check_thinking(thinking)
    return _THINKING_SET.sub(f"{{% set thinking_option = '{thinking}' %}}", template, count=1)


def render_chat_template(
    template: str,
    messages: Sequence[Message],
    *,
    thinking: str = "off",
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **special_tokens: str,
) -> str:
    """Renders a Hugging Face `chat_template` with jinja2 (needs `jinja2>=3.1`)."""
    try:
        import jinja2
        from jinja2 import sandbox
    except ImportError as error:
        raise ImportError(
            "rendering a tokenizer's chat_template needs jinja2 (pip install 'jinja2>=3.1'); "
            "ling_chat_prompt renders Ling's format without it"
        ) from error

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(with_thinking_mode(template, thinking))
    return compiled.render(
        messages=list(messages),
        tools=list(tools) if tools else None,
        add_generation_prompt=add_generation_prompt,
        thinking_option=thinking,
        **special_tokens,
    )


def load_tokenizer_config(path: str) -> dict[str, Any]:
    """`tokenizer_config.json` in `path` (a folder, or a file inside it); {} if absent."""
    folder = path if paths.isdir(path) else paths.dirname(path)
    config_path = paths.join(folder, "tokenizer_config.json")
    if not paths.exists(config_path):
        return {}
    return json.loads(paths.read_text(config_path))


def generation_stop_ids(path: str) -> list[int]:
    """`eos_token_id` (an id or a list) of a `generation_config.json` in `path` (a folder, or a
    file inside it); [] if absent. Ling's chat models list <|endoftext|> and <|role_end|>."""
    folder = path if paths.isdir(path) else paths.dirname(path)
    config_path = paths.join(folder, "generation_config.json")
    if not paths.exists(config_path):
        return []
    ids = json.loads(paths.read_text(config_path)).get("eos_token_id")
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]


def apply_chat_template(
    messages: Sequence[Message],
    *,
    template: str | None = None,
    thinking: str = "off",
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """`template` rendered with jinja2 when both exist, else Ling's format rendered directly."""
    if template is not None:
        try:
            return render_chat_template(
                template,
                messages,
                thinking=thinking,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
            )
        except ImportError:
            warnings.warn(
                "jinja2 is not installed: rendering Ling's chat format directly instead of the "
                "tokenizer's chat_template (pip install 'jinja2>=3.1' to use the template)",
                stacklevel=2,
            )
    return ling_chat_prompt(
        messages, thinking=thinking, tools=tools, add_generation_prompt=add_generation_prompt
    )
