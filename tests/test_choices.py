"""n completions of one prompt (OpenAI's `n`), through the official openai client.

Each choice is its own session branched from the prompt, prefilled once (the
prefix cache) and seeded seed + its index, so a seeded request with n = 3 gives
the three completions that three requests seeded seed, seed + 1, seed + 2 give.
"""

from __future__ import annotations

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Tell me a story about the sea and its ships."}]


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


async def test_n_seeded_choices_are_the_requests_seeded_one_by_one(serve_cluster):
    url, _ = await serve_cluster(kv={"prefix_cache_gb": 0.5})
    sampling = {"model": "m", "max_tokens": 10, "temperature": 0.9, "seed": 40}
    async with client(url) as oa:
        many = await oa.chat.completions.create(messages=MESSAGES, n=3, **sampling)
        one_by_one = [
            await oa.chat.completions.create(messages=MESSAGES, **{**sampling, "seed": 40 + i})
            for i in range(3)
        ]
    assert [c.index for c in many.choices] == [0, 1, 2]
    texts = [c.message.content for c in many.choices]
    assert texts == [r.choices[0].message.content for r in one_by_one]
    assert len(set(texts)) > 1  # sampled: the seeds differ
    assert many.usage.completion_tokens == sum(r.usage.completion_tokens for r in one_by_one)
    assert many.usage.prompt_tokens == one_by_one[0].usage.prompt_tokens
    # the prompt was prefilled once, then every choice started from it
    cached = many.usage.prompt_tokens_details.cached_tokens
    assert cached == many.usage.prompt_tokens - 1


async def test_n_streamed_choices_carry_their_index_and_one_usage_at_the_end(serve_cluster):
    url, _ = await serve_cluster()
    async with client(url) as oa:
        whole = await oa.completions.create(
            model="m", prompt="The harbour at dawn", n=2, max_tokens=8, temperature=0
        )
        texts = {0: "", 1: ""}
        usages = []
        async for chunk in await oa.completions.create(
            model="m",
            prompt="The harbour at dawn",
            n=2,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            for choice in chunk.choices:
                texts[choice.index] += choice.text
            if chunk.usage is not None:
                usages.append(chunk.usage)
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert texts[0] == texts[1]  # greedy: the same completion twice
    (usage,) = usages
    assert usage.completion_tokens == whole.usage.completion_tokens == 16


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 9}),  # past limits.max_choices
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 0}),
        ("/generate", {"prompt": "x", "n": 2}),
    ],
)
async def test_a_bad_n_is_a_400_naming_it(serve_cluster, path, body):
    url, _ = await serve_cluster()
    async with httpx.AsyncClient(base_url=url) as http:
        reply = await http.post(path, json={"max_tokens": 2, **body})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n"
