"""Instruction records, chat templates and response-only loss masks for supervised fine-tuning (method.md §7).

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str} messages. `conversation`
reads one from the record formats instruction datasets use:

    {"messages": [{"role", "content"}, ...]}                  chat messages (OpenAI / Hugging Face style)
    {"conversations": [{"from", "value"}, ...]}               ShareGPT (human / gpt / system)
    {"prompt", "response"} (+ optional "system")              prompt / response pairs
    {"system_prompt", "question", "response"}                 OpenOrca (the paper's fine-tuning data)
    {"instruction", "input", "output"}                        Alpaca

`encode` renders a conversation with a chat template into token ids and a loss mask that is 1 exactly on the tokens
the model is trained to produce: every assistant message and the template's end-of-turn marker after it. Each piece
of the template (a role's header, a message, a turn's end) is tokenized on its own and the ids concatenated, so the
mask follows piece boundaries exactly; `render` gives the same conversation as one string.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from qsparse_jax.data.tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")
RECORD_FORMATS = ("messages", "conversations", "prompt+response", "system_prompt+question+response (OpenOrca)",
                  "instruction+input+output (Alpaca)")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How each role's message is wrapped: header + content + footer. `eos_after_response` appends the tokenizer's
  end-of-sequence id after each assistant turn (trained, so that the model learns to stop)."""

  name: str
  headers: Mapping[str, str]
  footers: Mapping[str, str]
  eos_after_response: bool = False
  system_into_first_user: bool = False  # templates without a system turn prepend it to the first user message


TEMPLATES = {
    # Qwen1.5 / Qwen2 chat models (the paper fine-tunes Qwen1.5 7B).
    "chatml": ChatTemplate(
        "chatml",
        headers={"system": "<|im_start|>system\n", "user": "<|im_start|>user\n",
                 "assistant": "<|im_start|>assistant\n"},
        footers={"system": "<|im_end|>\n", "user": "<|im_end|>\n", "assistant": "<|im_end|>\n"}),
    # Mistral-7B-Instruct's [INST] form (the paper fine-tunes Mistral 7B); end of turn = the tokenizer's eos.
    "mistral": ChatTemplate(
        "mistral", headers={"user": "[INST] ", "assistant": ""}, footers={"user": " [/INST]", "assistant": ""},
        eos_after_response=True, system_into_first_user=True),
    # A plain-text form for tokenizers without special tokens.
    "plain": ChatTemplate(
        "plain",
        headers={"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"},
        footers={"system": "\n\n", "user": "\n\n", "assistant": "\n\n"}, eos_after_response=True),
}


class RecordError(ValueError):
  """An instruction record this module cannot read."""


def _text(value: Any, where: str) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, np.ndarray) and value.shape == ():
    return _text(value.item(), where)
  if not isinstance(value, str):
    raise RecordError(f"{where} must be text, got {type(value).__name__}")
  return value


def _rows(value: Any) -> list[Mapping[str, Any]]:
  """A list of message dicts; TFDS gives a Sequence of dicts as one dict of arrays."""
  if isinstance(value, Mapping):
    keys = list(value)
    return [{k: value[k][i] for k in keys} for i in range(len(value[keys[0]]))] if keys else []
  return list(value)


def conversation(record: Mapping[str, Any]) -> list[dict[str, str]]:
  """The messages of an instruction record in any of RECORD_FORMATS (see the module docstring).

  Raises RecordError naming the record's keys and the formats expected, or the message that is malformed. Empty
  system prompts and inputs are dropped; at least one assistant message is required.
  """
  keys = set(record)
  if "messages" in keys:
    messages = []
    for i, m in enumerate(_rows(record["messages"])):
      if not isinstance(m, Mapping) or not {"role", "content"} <= set(m):
        raise RecordError(f"messages[{i}] must have 'role' and 'content', got {m!r}")
      messages.append({"role": _text(m["role"], f"messages[{i}].role"),
                       "content": _text(m["content"], f"messages[{i}].content")})
  elif "conversations" in keys:
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    messages = []
    for i, m in enumerate(_rows(record["conversations"])):
      if not isinstance(m, Mapping) or not {"from", "value"} <= set(m):
        raise RecordError(f"conversations[{i}] must have 'from' and 'value', got {m!r}")
      who = _text(m["from"], f"conversations[{i}].from")
      if who not in roles:
        raise RecordError(f"conversations[{i}].from is {who!r}; expected one of {sorted(roles)}")
      messages.append({"role": roles[who], "content": _text(m["value"], f"conversations[{i}].value")})
  elif {"prompt", "response"} <= keys:
    messages = [{"role": "system", "content": _text(record.get("system", ""), "system")},
                {"role": "user", "content": _text(record["prompt"], "prompt")},
                {"role": "assistant", "content": _text(record["response"], "response")}]
  elif {"question", "response"} <= keys:
    messages = [{"role": "system", "content": _text(record.get("system_prompt", ""), "system_prompt")},
                {"role": "user", "content": _text(record["question"], "question")},
                {"role": "assistant", "content": _text(record["response"], "response")}]
  elif {"instruction", "output"} <= keys:
    instruction, extra = _text(record["instruction"], "instruction"), _text(record.get("input", ""), "input")
    messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                {"role": "assistant", "content": _text(record["output"], "output")}]
  else:
    raise RecordError(f"an instruction record has keys {sorted(keys)}; expected one of: {', '.join(RECORD_FORMATS)}")
  messages = [m for m in messages if not (m["role"] == "system" and not m["content"])]
  for i, m in enumerate(messages):
    if m["role"] not in ROLES:
      raise RecordError(f"message {i} has role {m['role']!r}; expected one of {ROLES}")
  if not any(m["role"] == "assistant" for m in messages):
    raise RecordError("an instruction record has no assistant message (nothing to train on)")
  return messages


def _pieces(messages: Sequence[Mapping[str, str]], template: ChatTemplate) -> list[tuple[str | None, bool]]:
  """The conversation as (text, trained) pieces in order; None stands for the tokenizer's eos id."""
  messages = list(messages)
  if template.system_into_first_user and messages and messages[0]["role"] == "system":
    system, rest = messages[0]["content"], messages[1:]
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first_user is not None:
      rest[first_user] = {"role": "user", "content": f"{system}\n\n{rest[first_user]['content']}"}
    messages = rest
  pieces = []
  for m in messages:
    trained = m["role"] == "assistant"
    pieces.append((template.headers.get(m["role"], ""), False))
    pieces.append((m["content"], trained))
    pieces.append((template.footers.get(m["role"], ""), trained))
    if trained and template.eos_after_response:
      pieces.append((None, True))
  return [(text, trained) for text, trained in pieces if text != ""]


def get_template(name: str) -> ChatTemplate:
  if name not in TEMPLATES:
    raise ValueError(f"data.chat_template must be one of {sorted(TEMPLATES)}, got {name!r}")
  return TEMPLATES[name]


def encode(messages: Sequence[Mapping[str, str]], template: ChatTemplate, tokenizer: Tokenizer
           ) -> tuple[np.ndarray, np.ndarray]:
  """(token ids [N] int32, loss mask [N] int32): the rendered conversation, and 1 on every token the model is trained
  to produce (assistant messages, their end-of-turn marker and, with eos_after_response, the eos id)."""
  ids, mask = [], []
  for text, trained in _pieces(messages, template):
    piece = [tokenizer.eos_id] if text is None else tokenizer.encode(text)
    ids += piece
    mask += [int(trained)] * len(piece)
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def render(messages: Sequence[Mapping[str, str]], template: ChatTemplate, eos: str = "") -> str:
  """The conversation as one string (eos stands in for the eos id)."""
  return "".join(eos if text is None else text for text, _ in _pieces(messages, template))


def generation_prompt(user_text: str, template: ChatTemplate, system: str = "") -> str:
  """The text that asks the model for an answer to user_text: the user turn, then the assistant's header."""
  messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
  return render(messages, template) + template.headers["assistant"]
