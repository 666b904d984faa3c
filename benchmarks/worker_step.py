"""`python -m benchmarks.worker_step`: a ring stage's decode step against mlx-lm's, in one process.

The yardstick of a pipeline's decode: a stage's whole step, bytes in to bytes
out, should cost its share of mlx-lm's overlapped step. This takes the network
and the other processes away: the same weights, in this process, one decode
step of B sessions at a time (the worker batches them itself), greedy:

- mlx-lm, each step waited for (its greedy token read to the host), and mlx-lm
  overlapped as its generate loop runs it (the next step is built and queued
  while the current one computes; only possible when the next input is known
  in this process, which a pipeline stage never has);
- one worker stage holding everything: token ids in, the embedding, every
  layer, the head and the sampling, tokens out (`WorkerRuntime.forward_sample`);
- that stage stepping ahead, as the decode loop of a ring of one stage drives
  it (`LookAhead`): step n+1 is built on step n's lazy tokens and started
  before step n is read, mlx-lm's overlap, so compare it with mlx-lm overlapped;
- N worker stages in turn (`--stages`, N > 1), the layers split into N runs of
  (nearly) equal length, as the ring runs them: stage 0 embeds the token ids
  and runs its layers, each stage's output goes on as a serialized
  `ForwardRequest` (the hidden states and token ids as wire `Tensor`s), which
  the next stage parses and decodes before its layers; the last one adds the
  head and the sampling. Each part is reported as well as the whole.

Every step but those stepping ahead waits for its result before the next is
built: a worker reads its sampled tokens to the host.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, cast

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache, trim_prompt_cache
from mlx_lm.utils import load_model

from benchmarks.models import DEFAULT_CACHE_DIR, SHAPES, ensure_model
from benchmarks.pipeline import int_list, positive_ints
from benchmarks.report import text_table
from mlx_cluster import tensor
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.sampling import SampledToken, SamplingParams
from mlx_cluster.models.demo import DEMO_DTYPE, ensure_demo_model
from mlx_cluster.models.random_model import DTYPES
from mlx_cluster.models.short_steps import ShortStepAttention
from mlx_cluster.worker.capabilities import detect
from mlx_cluster.worker.lookahead import LookAhead
from mlx_cluster.worker.runtime import WorkerRuntime, WorkerSettings


def prompt_tokens(batch: int, length: int) -> mx.array:
    """Row b's prompt [B, length] (uint32): distinct rows, ids every vocabulary has."""
    return mx.arange(batch * length, dtype=mx.uint32).reshape(batch, length) % 1000 + 5


def timed(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Mean seconds per call of `step` (which must wait for its own result)."""
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


# --- mlx-lm ----------------------------------------------------------------------


def mlx_lm_steps(
    path: Path, batch: int, prompt: int, warmup: int, steps: int, verify: tuple[int, ...] = ()
) -> dict[str, float]:
    model, _ = load_model(path)
    tokens = prompt_tokens(batch, prompt)
    if batch == 1:
        cache = make_prompt_cache(model)
    else:
        cache = [BatchKVCache([0] * batch) for _ in model.layers]
    mx.eval(model(tokens, cache=cache))
    y = tokens[:, -1:]

    def synced() -> None:
        nonlocal y
        y = mx.argmax(model(y, cache=cache)[:, -1, :], axis=-1)[:, None]
        y.tolist()

    sync_s = timed(synced, warmup, steps)
    # mlx-lm's generate loop: queue step n+1 (fed by step n's lazy argmax) before waiting on n
    y = mx.argmax(model(y, cache=cache)[:, -1, :], axis=-1)[:, None]
    mx.async_eval(y)
    started = time.perf_counter()
    for _ in range(warmup + steps):
        if _ == warmup:
            started = time.perf_counter()
        following = mx.argmax(model(y, cache=cache)[:, -1, :], axis=-1)[:, None]
        mx.async_eval(following)
        y.item() if batch == 1 else y.tolist()
        y = following
    overlapped_s = (time.perf_counter() - started) / steps
    seconds = {"mlx-lm, each step waited for": sync_s, "mlx-lm, overlapped": overlapped_s}
    for k in verify:  # as mlx-lm's speculative step verifies k drafts, all rejected here

        def verifying(k: int = k) -> None:
            nonlocal y
            fed = mx.concatenate([y, mx.repeat(y + 1, k, axis=1)], axis=1)
            picked = mx.argmax(model(fed, cache=cache), axis=-1)
            picked.tolist()
            trim_prompt_cache(cache, k)
            y = picked[:, :1]

        seconds[f"mlx-lm, {k} rejected drafts verified"] = timed(verifying, warmup, steps)
    return seconds


# --- the worker's stages -----------------------------------------------------------


class Laps:
    """Seconds between consecutive marks, by the name of the part each ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now


def send_on(ids: list[str], offsets: list[int], token_ids: mx.array, hidden: mx.array) -> bytes:
    """What a stage sends the next one, as the worker's relay builds it: a serialized
    ForwardRequest with the stage's output and the step's token ids."""
    request = pb.ForwardRequest(session_ids=ids, offsets=offsets, sample=True)
    tensor.encode(token_ids, out=request.token_ids)
    tensor.encode(hidden, out=request.hidden)
    return request.SerializeToString()


def receive(wire: bytes) -> tuple[list[str], list[int], mx.array, mx.array]:
    """A stage's inputs from the bytes the previous one sent: ids, offsets, hidden, token ids."""
    request = pb.ForwardRequest.FromString(wire)
    hidden, token_ids = tensor.decode(request.hidden), tensor.decode(request.token_ids)
    return list(request.session_ids), list(request.offsets), hidden, token_ids


class Ring:
    """Worker stages of one model in this process, stepped in turn as a ring steps them,
    with B sessions open, prefilled and stepped together."""

    def __init__(
        self,
        path: Path,
        splits: list[tuple[int, int]],
        eval_every: int,
        batch: int,
        prompt: int,
        short_steps: ShortStepAttention | None = None,
    ) -> None:
        layers = splits[-1][1]
        self.stages = []
        for start, end in splits:
            settings = WorkerSettings(
                name=f"stage{len(self.stages)}",
                eval_every=eval_every,
                short_step_attention=short_steps,
            )
            stage = WorkerRuntime(settings, detect())
            stage.load(str(path), start, end, embedding=start == 0, head=end == layers)
            self.stages.append(stage)
        self.names = [stage.require_loaded().describe() for stage in self.stages]
        self.session_ids = [f"s{row}" for row in range(batch)]
        self.message_bytes = 0  # the last step's message from one stage to the next
        self.tokens: list[int] = []  # each session's next input
        prompts = prompt_tokens(batch, prompt)
        for row, sid in enumerate(self.session_ids):
            for stage in self.stages:
                stage.open_session(sid, 0, sampling=SamplingParams())
            picked, _ = self.run([sid], [0], prompts[row : row + 1])
            self.tokens.append(picked[0].token)
        self.offsets = [prompt] * batch

    def run(
        self, ids: list[str], offsets: list[int], token_ids: mx.array
    ) -> tuple[list[SampledToken], dict[str, float]]:
        """Token ids [B, L] through every stage; each row's next token and each part's seconds."""
        laps = Laps()
        hidden: mx.array | None = None
        for k, stage in enumerate(self.stages[:-1]):
            hidden = stage.forward(ids, hidden, offsets, False, token_ids=token_ids)
            laps.mark(f"stage {k}: {self.names[k]}")
            wire = send_on(ids, offsets, token_ids, hidden)
            self.message_bytes = len(wire)
            laps.mark(f"stage {k} -> {k + 1}: encode, serialize")
            ids, offsets, hidden, token_ids = receive(wire)
            laps.mark(f"stage {k} -> {k + 1}: parse, decode")
        picked = self.stages[-1].forward_sample(ids, hidden, offsets, token_ids=token_ids)
        laps.mark(f"stage {len(self.stages) - 1}: {self.names[-1]}, sampling")
        return picked, laps.seconds

    def step(self) -> dict[str, float]:
        """One decode step of every session, fed the tokens it sampled; seconds per part."""
        token_ids = mx.array(self.tokens, dtype=mx.uint32)[:, None]
        picked, parts = self.run(self.session_ids, self.offsets, token_ids)
        self.advance(picked)
        return parts

    def stepping_ahead(self, lookahead: LookAhead, count: int) -> Callable[[], dict[str, float]]:
        """`step` for a ring of one stage, as its decode loop drives `lookahead`: each of
        the next `count` steps but the last builds and starts the one after it."""
        left = iter(range(count - 1, -1, -1))  # steps after this one

        def step() -> dict[str, float]:
            ahead = next(left) > 0
            picked, _ = lookahead.step(self.session_ids, self.offsets, self.tokens, ahead)
            self.advance(picked)
            return {}

        return step

    def verifying(self, drafts: int) -> Callable[[], dict[str, float]]:
        """`step` as a step that verifies `drafts` drafts the model will not sample (each
        row's token + 1, repeated): what a traversal whose drafts are rejected costs. Every
        stage first forgets the previous step's rejected positions, as the ring does."""

        def step() -> dict[str, float]:
            fed = [[token] + [token + 1] * drafts for token in self.tokens]
            token_ids = mx.array(fed, dtype=mx.uint32)
            ids, offsets, hidden = self.session_ids, self.offsets, None
            for stage in self.stages[:-1]:
                stage.rewind(ids, offsets)
                hidden = stage.forward(ids, hidden, offsets, False, token_ids=token_ids)
                ids, offsets, hidden, token_ids = receive(send_on(ids, offsets, token_ids, hidden))
            last = self.stages[-1]
            last.rewind(ids, offsets)
            kept = last.verify_sample(ids, hidden, offsets, token_ids=token_ids)
            self.tokens = [row[-1].token for row in kept]
            self.offsets = [offset + len(row) for offset, row in zip(offsets, kept, strict=True)]
            return {}

        return step

    def advance(self, picked: list[SampledToken]) -> None:
        """Each session's next input: the token it sampled, at the next position."""
        self.tokens = [p.token for p in picked]
        self.offsets = [offset + 1 for offset in self.offsets]

    def close(self) -> None:
        for stage in self.stages:
            stage.unload()


def splits_of(layers: int, stages: int) -> list[tuple[int, int]]:
    """[start, end) of each of `stages` consecutive runs of (nearly) equal length."""
    bounds = [k * layers // stages for k in range(stages + 1)]
    return list(itertools.pairwise(bounds))


def ring_steps(
    path: Path,
    splits: list[tuple[int, int]],
    eval_every: int,
    batch: int,
    args: argparse.Namespace,
    ahead: bool = False,
    drafts: int = 0,
    short_steps: ShortStepAttention | None = None,
) -> tuple[float, dict[str, float], int]:
    """Mean seconds of a step through `splits` and of each of its parts, and the bytes
    each stage sends the next (0 for one stage). With `ahead` (one stage only), the
    steps are driven through a `LookAhead`; with `drafts`, each step verifies that many
    rejected drafts (`Ring.verifying`); then no part is timed on its own. `short_steps`:
    the workers' short_step_attention (None: their default)."""
    ring = Ring(path, splits, eval_every, batch, args.prompt_tokens, short_steps)
    count = args.warmup + args.steps
    lookahead = LookAhead(ring.stages[0], stream_id=0) if ahead else None
    step = ring.step if lookahead is None else ring.stepping_ahead(lookahead, count)
    if drafts:
        step = ring.verifying(drafts)
    for _ in range(args.warmup):
        step()
    laps: list[dict[str, float]] = []
    total = timed(lambda: laps.append(step()), 0, args.steps)
    ring.close()
    if lookahead is not None and lookahead.taken < count - 1:
        print(f"B={batch}: only {lookahead.taken} of {count} steps taken ahead", file=sys.stderr)
    parts = {name: sum(lap[name] for lap in laps) / args.steps for name in laps[0]}
    return total, parts, ring.message_bytes


def released() -> None:
    """Free what the last measurement held before the next one loads its weights."""
    gc.collect()
    mx.clear_cache()


# --- the command -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.worker_step", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--demo", action="store_true", help="the bundled demo model itself (not --model-shape)"
    )
    p.add_argument("--model-shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--bits", type=int, choices=[4, 8], default=None)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--batches", type=positive_ints, default=(1, 16), help="sessions per step")
    p.add_argument(
        "--stages", type=positive_ints, default=(1, 2), help="worker stage counts, e.g. 1,2,4"
    )
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument(
        "--eval-every",
        type=int_list(0),
        default=None,
        help="the workers' --eval-every values, e.g. 0,1,4 (default: the workers' default)",
    )
    p.add_argument(
        "--verify-drafts",
        type=int_list(1),
        default=(),
        help="also steps that verify this many drafts, all rejected (e.g. 4,8): "
        "the cost of a traversal whose drafts fail",
    )
    p.add_argument(
        "--short-step-attention",
        type=lambda text: tuple(text.split(",")),
        default=None,
        help="the workers' --short-step-attention values for the --verify-drafts rows, "
        "e.g. fused,whole_buffer,ops (default: the workers' default)",
    )
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--json", type=Path, default=None)
    return p


class Run(NamedTuple):
    """One of the worker's rows."""

    name: str
    stages: int
    ahead: bool = False  # stepping ahead
    drafts: int = 0  # rejected drafts verified at each step
    short_steps: ShortStepAttention | None = None  # the workers' short_step_attention


def worker_runs(
    stage_counts: tuple[int, ...], verify: tuple[int, ...], attention: tuple[str, ...] | None
) -> list[Run]:
    """The worker's rows."""
    runs: list[Run] = []
    for n in stage_counts:
        if n == 1:
            runs += [Run("one stage", 1), Run("one stage, stepping ahead", 1, ahead=True)]
        else:
            runs.append(Run(f"{n} stages in turn", n))
        stages = "one stage" if n == 1 else f"{n} stages"
        for k in verify:
            name = f"{stages}, {k} rejected drafts verified"
            if attention is None:
                runs.append(Run(name, n, drafts=k))
            else:
                runs += [
                    Run(f"{name}, {how}", n, False, k, cast(ShortStepAttention, how))
                    for how in attention
                ]
    return runs


def measure_batch(
    path: Path, layers: int, batch: int, eval_every: tuple[int, ...], args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, str], int]:
    """One column of the table: seconds by row, the rows' labels, the message's bytes."""
    row = mlx_lm_steps(path, batch, args.prompt_tokens, args.warmup, args.steps, args.verify_drafts)
    labels = {name: name for name in row}
    released()
    message_bytes = 0
    for every in eval_every:
        for run in worker_runs(args.stages, args.verify_drafts, args.short_step_attention):
            key = f"worker, {run.name}, eval every {every}"
            splits = splits_of(layers, run.stages)
            total, parts, sent = ring_steps(
                path, splits, every, batch, args, run.ahead, run.drafts, run.short_steps
            )
            row[key], labels[key] = total, key
            if len(parts) > 1:
                row |= {f"{key}: {part}": s for part, s in parts.items()}
                labels |= {f"{key}: {part}": f"  {part}" for part in parts}
                message_bytes = sent
            released()
    return row, labels, message_bytes


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:  # the demo's activations are DEMO_DTYPE whatever --dtype says
        args.dtype, args.bits = DEMO_DTYPE, None
        path = ensure_demo_model()
    else:
        path = ensure_model(args.model_shape, args.dtype, args.bits, args.cache_dir)
    layers = int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
    if max(args.stages) > layers:
        parser.error(f"--stages: at most {layers} stages, one per layer of this model")
    eval_every = args.eval_every or (
        WorkerSettings(name="default").layer_eval_every(metal=mx.metal.is_available()),
    )
    results: dict[int, dict[str, float]] = {}
    message_bytes: dict[int, int] = {}
    labels: dict[str, str] = {}
    for batch in args.batches:
        results[batch], labels, message_bytes[batch] = measure_batch(
            path, layers, batch, eval_every, args
        )
    width = max(len(label) for label in labels.values())  # left-aligned: parts stay indented
    print(
        text_table(
            ["decode step ms".ljust(width), *(f"B={b}" for b in results)],
            [
                [label.ljust(width), *(f"{results[b][key] * 1e3:.2f}" for b in results)]
                for key, label in labels.items()
            ],
        )
    )
    if any(message_bytes.values()):
        sizes = ", ".join(f"B={b}: {n} bytes" for b, n in message_bytes.items())
        print(f"each stage -> the next, message (ForwardRequest): {sizes}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"model": str(path), "seconds": results, "message_bytes": message_bytes}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
