"""Tiny models trained on CPU to answer given conversations: with a tool call, or with a
`<think>` block and then an answer. They let the tests check tool calling and reasoning
on text a model really generates, not canned text.

Each model is a random tiny llama (models.random_model) with a byte-level BPE tokenizer
built here (the `tokenizers` library, offline) that holds the tokens its chat template
needs, trained with an mlx optimizer until greedy decoding gives every target exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.generate import generate
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer, save_model
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from mlx_cluster.models.random_model import build_random_model

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = "<|im_end|>"

# --- the conversations ------------------------------------------------------------------

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name."}},
            "required": ["city"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_ARGUMENTS = {"city": "Paris"}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOL_RESULT = "sunny, 22 C"
WITH_RESULT = [
    *QUESTION,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": CALL_ARGUMENTS},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": TOOL_RESULT},
]
RESULT_ANSWER = "It is sunny in Paris."
NO_TOOLS_ANSWER = "I cannot look that up."

GREETING = [{"role": "user", "content": "Hi there!"}]
REASONING = "\nThe user greets me. I greet back.\n"
THOUGHT_ANSWER = "\n\nHello! How can I help?"
THINKING_TEXT = f"<think>{REASONING}</think>{THOUGHT_ANSWER}"
UNTHOUGHT_ANSWER = "Hello!"

# --- chat templates (HF renders them with trim_blocks and lstrip_blocks) -----------------

TOOL_TEMPLATE = """\
{%- if tools %}
<|im_start|>system
Tools:
{% for tool in tools %}
{{ tool.function.name }}({{ tool.function.parameters.properties | list | join(', ') }}): \
{{ tool.function.description }}
{% endfor %}
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}
<|im_start|>assistant
{% for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>
{%- endfor %}
<|im_end|>
{% elif message.role == 'tool' %}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

THINK_TEMPLATE = """\
{%- if reasoning_effort is defined %}
<|im_start|>system
Reasoning effort: {{ reasoning_effort }}<|im_end|>
{% endif %}
{%- for message in messages %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}
<think>

</think>

{% endif %}
{%- endif %}"""


@dataclass(frozen=True)
class Example:
    """One conversation and the reply the model learns to give it."""

    messages: list[dict[str, Any]]
    reply: str  # without the end-of-turn token, which the model also learns
    template_kwargs: dict[str, Any]


TOOL_EXAMPLES = [
    Example(QUESTION, CALL_TEXT, {"tools": [WEATHER_TOOL]}),
    Example(WITH_RESULT, RESULT_ANSWER, {"tools": [WEATHER_TOOL]}),
    Example(QUESTION, NO_TOOLS_ANSWER, {}),
]
THINK_EXAMPLES = [
    Example(GREETING, THINKING_TEXT, {}),
    Example(GREETING, UNTHOUGHT_ANSWER, {"enable_thinking": False}),
]

# --- building ---------------------------------------------------------------------------


def _save_tokenizer(out: Path, template: str, added: list[str], corpus: list[str]) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Like Qwen's <tool_call> and <think>: single tokens, but not special (decoded as text).
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _render(tokenizer: TokenizerWrapper, example: Example) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(
        example.messages, add_generation_prompt=True, **example.template_kwargs
    )
    reply = tokenizer.encode(example.reply + EOS, add_special_tokens=False)
    return list(prompt), list(reply)


def _batch(pairs: list[tuple[list[int], list[int]]], pad: int) -> tuple[mx.array, ...]:
    """Inputs, next-token targets and a mask over the reply positions, padded."""
    length = max(len(p) + len(r) for p, r in pairs) - 1
    inputs, targets, mask = [], [], []
    for prompt, reply in pairs:
        tokens = prompt + reply
        fill = length - (len(tokens) - 1)
        inputs.append(tokens[:-1] + [pad] * fill)
        targets.append(tokens[1:] + [pad] * fill)
        mask.append([0] * (len(prompt) - 1) + [1] * len(reply) + [0] * fill)
    return mx.array(inputs), mx.array(targets), mx.array(mask, dtype=mx.float32)


def _answers_all(model: nn.Module, tokenizer: TokenizerWrapper, examples: list[Example]) -> bool:
    for example in examples:
        prompt, _ = _render(tokenizer, example)
        text = generate(model, tokenizer, prompt, max_tokens=64)
        if text != example.reply:
            return False
    return True


def _train(out: Path, examples: list[Example], max_steps: int = 1500) -> int:
    """Train the model in `out` until it gives every reply greedily; the steps it took."""
    tokenizer = load_tokenizer(out)
    model, _ = load_model(out)
    pairs = [_render(tokenizer, e) for e in examples]
    inputs, targets, mask = _batch(pairs, tokenizer.pad_token_id)

    def loss_fn(model: nn.Module) -> mx.array:
        losses = nn.losses.cross_entropy(model(inputs), targets) * mask
        return losses.sum() / mask.sum()

    optimizer = optim.Adam(learning_rate=3e-3)
    step_fn = nn.value_and_grad(model, loss_fn)
    for step in range(1, max_steps + 1):
        loss, grads = step_fn(model)
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        if step % 50 == 0 and loss.item() < 0.05 and _answers_all(model, tokenizer, examples):
            save_model(out, model)
            return step
    raise RuntimeError(f"the model did not learn its replies in {max_steps} steps")


def build_trained_model(
    out: Path, template: str, added: list[str], examples: list[Example], seed: int = 0
) -> tuple[Path, float]:
    """A tiny llama in `out` that answers each example's conversation with its reply.

    Returns:
        The directory, and the seconds the training took.
    """
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    corpus = [e.reply for e in examples] + [json.dumps(e.messages) for e in examples]
    _save_tokenizer(out, template, added, [template, *corpus])
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL}
    build_random_model(
        out,
        "llama",
        num_layers=4,
        hidden_size=64,
        vocab_size=tokenizer.get_vocab_size(),
        seed=seed,
        tokenizer=False,
        config_overrides={"eos_token_id": ids[EOS], "pad_token_id": ids["<|endoftext|>"]},
    )
    mx.random.seed(seed)
    _train(out, examples)
    return out, time.perf_counter() - started


def build_tool_model(out: Path) -> tuple[Path, float]:
    return build_trained_model(
        out,
        TOOL_TEMPLATE,
        ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
        TOOL_EXAMPLES,
    )


def build_thinking_model(out: Path) -> tuple[Path, float]:
    return build_trained_model(out, THINK_TEMPLATE, ["<think>", "</think>"], THINK_EXAMPLES)
