"""Instruction records, chat templates and response-only loss masks (qsparse_jax.data.chat)."""

import numpy as np
import pytest

from qsparse_jax.data import chat
from qsparse_jax.data.tokenizers import ByteTokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("record", [
    {"messages": CONVERSATION},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                       {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "2+2?"},
                       {"from": "gpt", "value": "4"}]},
])
def test_chat_records_keep_every_turn(record):
  assert chat.conversation(record) == CONVERSATION


@pytest.mark.parametrize("record, want", [
    ({"prompt": "Q", "response": "A"}, [("user", "Q"), ("assistant", "A")]),
    ({"system": "S", "prompt": "Q", "response": "A"}, [("system", "S"), ("user", "Q"), ("assistant", "A")]),
    ({"id": "x", "system_prompt": "", "question": "Q", "response": "A"}, [("user", "Q"), ("assistant", "A")]),
    ({"instruction": "Do", "input": "this", "output": "Done"}, [("user", "Do\n\nthis"), ("assistant", "Done")]),
    ({"instruction": "Do", "input": "", "output": "Done"}, [("user", "Do"), ("assistant", "Done")]),
    ({"messages": {"role": np.array([b"user", b"assistant"]), "content": np.array([b"Q", b"A"])}},  # TFDS form
     [("user", "Q"), ("assistant", "A")]),
])
def test_record_formats(record, want):
  assert [(m["role"], m["content"]) for m in chat.conversation(record)] == want


@pytest.mark.parametrize("record, message", [
    ({"text": "x"}, r"has keys \['text'\]; expected one of: messages, conversations, prompt\+response"),
    ({"messages": [{"role": "user", "content": "Q"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "Q"}]}, r"role 'robot'; expected one of \('system', 'user'"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must have 'role' and 'content'"),
    ({"conversations": [{"from": "bot", "value": "A"}]}, r"conversations\[0\].from is 'bot'"),
    ({"prompt": 3, "response": "A"}, "prompt must be text, got int"),
])
def test_bad_records_name_what_is_wrong(record, message):
  with pytest.raises(chat.RecordError, match=message):
    chat.conversation(record)


def spans(ids, mask, tokenizer):
  """The trained stretches of a conversation, decoded."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  return [tokenizer.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]


def test_chatml_trains_on_the_assistant_turns_and_their_end_marker_only():
  tok = ByteTokenizer()
  ids, mask = chat.encode(CONVERSATION, chat.TEMPLATES["chatml"], tok)
  want = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
          "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
          "<|im_start|>assistant\n4<|im_end|>\n")
  assert tok.decode(ids) == want == chat.render(CONVERSATION, chat.TEMPLATES["chatml"])
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape
  assert spans(ids, mask, tok) == ["Hello.<|im_end|>\n", "4<|im_end|>\n"]


def test_mistral_folds_the_system_prompt_into_the_first_user_turn_and_trains_the_eos():
  tok = ByteTokenizer()
  ids, mask = chat.encode(CONVERSATION, chat.TEMPLATES["mistral"], tok)
  eos_at = np.flatnonzero(ids == tok.eos_id)
  assert mask[eos_at].tolist() == [1, 1] and len(eos_at) == 2
  assert chat.render(CONVERSATION, chat.TEMPLATES["mistral"], eos="</s>") == (
      "[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] 2+2? [/INST]4</s>")
  assert spans(ids, mask, tok) == ["Hello.", "4"]  # ByteTokenizer.decode drops the eos id


def test_generation_prompt_ends_with_the_assistant_header():
  assert chat.generation_prompt("Hi", chat.TEMPLATES["plain"]) == "### Instruction:\nHi\n\n### Response:\n"
  assert chat.generation_prompt("Hi", chat.TEMPLATES["chatml"], system="S") == (
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(ValueError, match=r"data.chat_template must be one of \['chatml', 'mistral', 'plain'\]"):
    chat.get_template("llama")
