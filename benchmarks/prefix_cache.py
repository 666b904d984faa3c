"""`python -m benchmarks.prefix_cache`: a conversation's second turn, with and without prefixes.

A chat with a long system prompt (about --prompt-tokens tokens): the first turn
asks a question, the second resends the whole conversation (system, question,
the model's answer) with a new question, as chat clients do. On a cluster that
keeps prefixes, the second turn starts from what the first left cached and
prefills only the rest; on one that keeps none (`kv.prefix_cache_gb: 0`) it
prefills everything. Time to first token of each turn, in one run, on the same
workers; greedy, so the second turn's tokens must be the same on both clusters
(exit 1 if not). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_config, load_tokenizer

from benchmarks.cluster import WORKER_ARGS
from benchmarks.models import DEFAULT_CACHE_DIR, SHAPES, ensure_model
from benchmarks.pipeline import default_json_path, host_info, say
from benchmarks.report import text_table
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.events import Event, HopEvent
from mlx_cluster.coordinator.engine.prefixes import PromptReuse
from mlx_cluster.local import TRANSPORTS, gpu_list, local_workers
from mlx_cluster.models.demo import ensure_demo_model
from mlx_cluster.models.random_model import DTYPES

RULE = (
    "Rule {n}: when a customer asks about order {n}, check the warehouse log for shelf "
    "{shelf}, confirm the delivery window, and answer politely in one short paragraph.\n"
)
QUESTIONS = ("What should I do about order 12?", "And what about order 40?")


def system_prompt(tokenizer: TokenizerWrapper, tokens: int) -> str:
    """Numbered rules until the text is about `tokens` tokens long."""
    lines: list[str] = []
    while len(tokenizer.encode("".join(lines))) < tokens:
        n = len(lines) + 1
        lines.extend(RULE.format(n=n + k, shelf=(7 * (n + k)) % 97) for k in range(20))
    return "".join(lines)


def chat(tokenizer: TokenizerWrapper, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def timeline(cluster: Cluster) -> list[dict[str, Any]]:
    """Where a turn's time goes: the cluster's events from now on, each with when it
    arrived (ms since the call) and its compute (ms); stop with `cluster.events`."""
    started, seen = time.perf_counter(), []

    def on(event: Event) -> None:
        entry = {"at_ms": round((time.perf_counter() - started) * 1e3, 1)}
        if isinstance(event, HopEvent):
            entry |= {"hop": event.worker, "tokens": event.tokens}
        else:
            entry |= {"decode_step": event.lane, "wall_ms": round(event.wall_s * 1e3, 1)}
        seen.append(entry | {"compute_ms": round(event.compute_s * 1e3, 1)})

    cluster.events.subscribe(on)
    return seen


async def timed_turn(
    cluster: Cluster, prompt: list[int], max_tokens: int
) -> tuple[float, list[int], int]:
    """(time to first token, the tokens, prompt tokens a kept prefix gave)."""
    reuse = PromptReuse()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    started, first, tokens = time.perf_counter(), 0.0, []
    async for sampled in cluster.engine.generate_tokens(prompt, params, reuse=reuse):
        first = first or time.perf_counter() - started
        tokens.append(sampled.token)
    return first, tokens, reuse.cached_tokens


async def conversation(
    model_dir: Path, addresses: list[str], cache_gb: float, tokenizer: TokenizerWrapper, args: Any
) -> dict[str, Any]:
    """Both turns on a cluster over `addresses` keeping `cache_gb` of prefixes."""
    cluster = await Cluster.start(
        model_dir, addresses, kv={"prefix_cache_gb": cache_gb, "max_session_tokens": 16384}
    )
    try:
        system = system_prompt(tokenizer, args.prompt_tokens)
        warm = chat(tokenizer, [{"role": "user", "content": "Hello."}])
        await timed_turn(cluster, warm, 4)  # kernels built before anything is timed
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": QUESTIONS[0]},
        ]
        turn1 = chat(tokenizer, messages)
        ttft1, answer, _ = await timed_turn(cluster, turn1, args.max_tokens)
        await cluster.engine.chain.ends_done()  # turn 1's prefix kept
        messages += [
            {"role": "assistant", "content": tokenizer.decode(answer)},
            {"role": "user", "content": QUESTIONS[1]},
        ]
        turn2 = chat(tokenizer, messages)
        events = timeline(cluster)
        ttft2, tokens2, cached = await timed_turn(cluster, turn2, args.max_tokens)
        first_events = events[: len(cluster.stages) * 2 + 2]
    finally:
        await cluster.close()
    return {
        "prefix_cache_gb": cache_gb,
        "turn1": {"prompt_tokens": len(turn1), "ttft_s": ttft1},
        "turn2": {
            "prompt_tokens": len(turn2),
            "ttft_s": ttft2,
            "cached_tokens": cached,
            "first_events": first_events,  # the prompt's steps on each stage, then decode
        },
        "ttft_ratio": ttft2 / ttft1,
        "turn2_tokens": tokens2,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    shape = (args.model_shape, args.dtype, None, args.cache_dir)
    model_dir = ensure_model(*shape) if args.model_shape else ensure_demo_model()
    tokenizer = load_tokenizer(model_dir, eos_token_ids=load_config(model_dir).get("eos_token_id"))
    gpus = f", GPUs {list(args.gpus)} per worker" if args.gpus else ""
    say(f"model {model_dir}; {args.workers} workers on {args.transport}{gpus}")
    async with local_workers(
        args.workers, [*WORKER_ARGS, *args.worker_arg], transport=args.transport, gpus=args.gpus
    ) as processes:
        addresses = [w.address for w in processes]
        runs = [
            await conversation(model_dir, addresses, gb, tokenizer, args)
            for gb in (args.prefix_cache_gb, 0.0)
        ]
    return {
        **host_info(),
        "model": str(model_dir),
        "workers": args.workers,
        "worker_args": args.worker_arg,
        "runs": runs,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.prefix_cache", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--model-shape", choices=sorted(SHAPES), help="a random-weight model, not the demo"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="with --model-shape")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="built models")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=3000, help="the system prompt's length")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens a turn")
    p.add_argument("--prefix-cache-gb", type=float, default=2.0, help="each worker's, when on")
    p.add_argument("--transport", choices=TRANSPORTS, default="tcp")
    p.add_argument("--gpus", type=gpu_list, default=(), help="GPU index for each worker, cycled")
    p.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="one more flag for every worker, e.g. --worker-arg=--short-step-attention=fused",
    )
    p.add_argument("--json", type=Path, default=None, help="results file (default under /tmp)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = asyncio.run(measure(args))
    cached, plain = result["runs"]
    rows = [
        [
            "on" if run["prefix_cache_gb"] else "off",
            str(run["turn1"]["prompt_tokens"]),
            f"{run['turn1']['ttft_s'] * 1e3:.1f}",
            str(run["turn2"]["prompt_tokens"]),
            str(run["turn2"]["cached_tokens"]),
            f"{run['turn2']['ttft_s'] * 1e3:.1f}",
            f"{run['ttft_ratio']:.3f}",
        ]
        for run in result["runs"]
    ]
    header = [
        "prefix cache",
        "turn 1 tokens",
        "TTFT ms",
        "turn 2 tokens",
        "cached",
        "TTFT ms",
        "turn 2 / turn 1",
    ]
    print(text_table(header, rows))
    same = cached["turn2_tokens"] == plain["turn2_tokens"]
    result["turn2_tokens_equal"] = same
    path = args.json or default_json_path("prefix_cache")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print("second turn, with the cache: its first events (ms)", cached["turn2"]["first_events"])
    print(f"second turn's tokens with and without the cache: {'equal' if same else 'DIFFERENT'}")
    print(f"results: {path}")
    mx.clear_streams()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
