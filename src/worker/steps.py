"""A step's protobuf in, protobuf out: what the compute thread runs for Forward and Decode.

Plain functions over a WorkerRuntime, called on the compute thread only. They
decode the wire tensors, run the runtime's step and encode what goes on: the
answer of a step that ends here (hidden states, or each row's next token), or
the request for the next stage of the ring.
"""

from __future__ import annotations

import time

import mlx.core as mx

from mlx_cluster import tensor
from mlx_cluster.contract import speculation
from mlx_cluster.contract.errors import InvalidArgument
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.tensor.shared import SharedArena, SharedViews
from mlx_cluster.worker.runtime import WorkerRuntime


def inputs(
    request: pb.ForwardRequest, views: SharedViews | None = None
) -> tuple[mx.array | None, mx.array | None]:
    """A step's hidden states and token ids, decoded (either may be absent); hidden states
    a peer put in shared memory are read through `views`."""
    hidden = _hidden(request.hidden, views) if request.HasField("hidden") else None
    tokens = tensor.decode(request.token_ids) if request.HasField("token_ids") else None
    if hidden is None and tokens is None:
        raise InvalidArgument("a ForwardRequest needs hidden states or token ids")
    return hidden, tokens


def _hidden(msg: pb.Tensor, views: SharedViews | None) -> mx.array:
    if not msg.HasField("shared"):
        return tensor.decode(msg)
    if views is None:
        raise InvalidArgument("hidden states in shared memory, and this worker takes none")
    return views.decode(msg)


Inputs = tuple[mx.array | None, mx.array | None]  # a step's hidden states and token ids


def step_here(
    runtime: WorkerRuntime,
    request: pb.ForwardRequest,
    stream_id: int,
    decoded: Inputs | None = None,
) -> pb.ForwardResponse:
    """One step that ends here: hidden states out, or each row's next token.

    `decoded`: the request's inputs where the caller has them as arrays already.
    """
    started = time.perf_counter()
    hidden, tokens = decoded or inputs(request, runtime.shared_views)
    ids, offsets = list(request.session_ids), list(request.offsets)
    if request.rewind:
        runtime.rewind(ids, offsets)
    response = pb.ForwardResponse(step_id=request.step_id)
    if request.sample and request.verify:
        kept = runtime.verify_sample(ids, hidden, offsets, stream_id, tokens)
        for row in kept:
            for token in row:
                token.to_proto(response.sampled.add())
        response.counts[:] = [len(row) for row in kept]
    elif request.sample:
        picked = runtime.forward_sample(ids, hidden, offsets, stream_id, tokens)
        for token in picked:
            token.to_proto(response.sampled.add())
    else:
        only_last = request.last_position_only
        out = runtime.forward(ids, hidden, offsets, only_last, stream_id, tokens, request.verify)
        tensor.encode(out, out=response.hidden)
    response.compute_seconds = time.perf_counter() - started
    response.stage_compute_seconds.append(response.compute_seconds)
    return response


def step_onward(
    runtime: WorkerRuntime,
    request: pb.ForwardRequest,
    stream_id: int,
    decoded: Inputs | None = None,
    arena: SharedArena | None = None,
) -> tuple[pb.ForwardRequest, float]:
    """This stage's part of a relayed step: the request for the next stage, and the
    seconds it took. The next stages decide what the end returns (`decoded` as for
    `step_here`; `arena`: where large hidden states go for a next stage on this host)."""
    started = time.perf_counter()
    hidden, tokens = decoded or inputs(request, runtime.shared_views)
    ids, offsets = list(request.session_ids), list(request.offsets)
    if request.rewind:
        runtime.rewind(ids, offsets)
    out = runtime.forward(ids, hidden, offsets, False, stream_id, tokens, request.verify)
    onward = pb.ForwardRequest(
        session_ids=ids,
        offsets=offsets,
        last_position_only=request.last_position_only,
        sample=request.sample,
        rewind=request.rewind,
        verify=request.verify,
    )
    if request.HasField("token_ids"):
        onward.token_ids.CopyFrom(request.token_ids)
    if arena is None or arena.put(out, onward.hidden) is None:
        tensor.encode(out, out=onward.hidden)
    return onward, time.perf_counter() - started


def ring_first(
    runtime: WorkerRuntime,
    ids: list[str],
    offsets: list[int],
    tokens: list[list[int]],
    stream_id: int,
) -> tuple[pb.ForwardRequest, float]:
    """The first stage's part of a decode step through a ring of several stages, feeding
    row b `tokens[b]` (its last token, then any drafts; every row as long): the request
    for the next stage, and the seconds it took. (A ring of one stage: lookahead.py.)"""
    request = ring_request(ids, offsets, tokens)
    token_ids = mx.array(tokens, dtype=mx.uint32)
    tensor.encode(token_ids, out=request.token_ids)  # the last stage's processors see them
    return step_onward(runtime, request, stream_id, (None, token_ids))


def ring_request(ids: list[str], offsets: list[int], tokens: list[list[int]]) -> pb.ForwardRequest:
    """A decode step's request: it samples, verifies drafts if it feeds any, and lets each
    stage forget the drafts the previous step's last stage rejected."""
    return pb.ForwardRequest(
        session_ids=ids, offsets=offsets, sample=True, rewind=True, verify=len(tokens[0]) > 1
    )


def verify_alone(
    runtime: WorkerRuntime,
    ids: list[str],
    offsets: list[int],
    tokens: list[list[int]],
    stream_id: int,
) -> tuple[list[list[pb.Sampled]], float]:
    """A decode step that feeds drafts on a stage that is the whole ring: each row's
    tokens, and the seconds it took."""
    request = ring_request(ids, offsets, tokens)
    reply = step_here(runtime, request, stream_id, (None, mx.array(tokens, dtype=mx.uint32)))
    return split_rows(reply), reply.compute_seconds


def split_rows(reply: pb.ForwardResponse) -> list[list[pb.Sampled]]:
    """Row b's tokens of a sampling step's reply (one each unless it verified drafts)."""
    counts = list(reply.counts) or [1] * len(reply.sampled)
    try:
        return speculation.split_rows(reply.sampled, counts)
    except ValueError as exc:
        raise InvalidArgument(f"the last stage's answer: {exc}") from exc
