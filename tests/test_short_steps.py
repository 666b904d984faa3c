"""Short steps attended another way give what the fused kernel gives.

On CUDA, steps of a few positions (speculative verification) attend over a KV
cache's whole buffer, or with composed operations, instead of as mlx-lm does
(models/short_steps.py). Neither is the default here; these tests turn each on,
on the CPU, and check it changes no number that matters and leaves every cache
as it would be.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from unittest.mock import patch

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, make_prompt_cache, trim_prompt_cache
from mlx_lm.utils import load_model

from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.models import short_steps
from mlx_cluster.models.architecture import inner_model, run_layers
from mlx_cluster.models.short_steps import (
    ComposedView,
    PaddedStep,
    WholeBufferView,
    route_attention,
    short_step_views,
)
from mlx_cluster.models.slicing import load_layer_slice
from mlx_cluster.worker.drafter import DraftModel
from tests.conftest import make_engine
from tests.test_golden import assert_same, reference
from tests.test_speculative import LOOKUP, NEW_TOKENS, PROMPT, assert_drafts_tested, run


def hidden(length: int, seed: int, size: int) -> mx.array:
    return mx.random.normal((1, length, size), key=mx.random.key(seed))


def assert_caches_equal(a: list[KVCache], b: list[KVCache]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.offset == y.offset
        kx, vx = x.keys_and_values() if hasattr(x, "keys_and_values") else x.state
        ky, vy = y.keys_and_values() if hasattr(y, "keys_and_values") else y.state
        assert mx.array_equal(kx, ky) and mx.array_equal(vx, vy)


HOW = ["whole_buffer", "padded"]
VIEWS = {"whole_buffer": WholeBufferView, "padded": ComposedView}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text", "deepseek_v2"])
def test_short_steps_equal_fused_steps(model_factory, model_type, how):
    """Steps of 1 to 17 positions from offsets that cross the buffer's 256-position
    growth, and after a trim leaves stale values past the offset: the same hidden states
    (allclose) and identical caches. gemma3's rotating caches are left as they are."""
    model, _ = load_model(model_factory(model_type))
    layers = inner_model(model).layers
    size = model.args.hidden_size
    exact, whole = make_prompt_cache(model), make_prompt_cache(model)
    prompt = hidden(250, 0, size)
    for caches in (exact, whole):
        mx.eval(run_layers(layers, prompt, caches))
    viewed = 0
    for n, positions in enumerate([5, 1, 3, 17, 2, 9, 4, 40, 100]):
        x = hidden(positions, n + 1, size)
        want = run_layers(layers, x, exact)
        got = run_layers(layers, x, whole, short_steps=how)
        assert mx.allclose(got, want, atol=1e-5, rtol=1e-5), f"step {n}"
        assert_caches_equal(exact, whole)
        if positions > 1:  # drop two positions, as a rejected draft does
            trim_prompt_cache(exact, 2)
            trim_prompt_cache(whole, 2)
        viewed += sum(isinstance(v, VIEWS[how]) for v in short_step_views(whole, positions, how))
    assert viewed > 0
    assert exact[0].offset > 256  # the steps crossed the buffer's growth


def test_only_short_steps_over_plain_caches_are_viewed(model_factory):
    model, _ = load_model(model_factory("gemma3_text"))
    caches = make_prompt_cache(model)
    assert short_step_views(caches, 4, "whole_buffer")[0] is caches[0]  # empty: nothing to view
    mx.eval(run_layers(inner_model(model).layers, hidden(8, 0, model.args.hidden_size), caches))
    for how in HOW:
        views = short_step_views(caches, 4, how)
        kinds = {
            type(c).__name__: isinstance(v, VIEWS[how]) for c, v in zip(caches, views, strict=True)
        }
        assert kinds == {"RotatingKVCache": False, "KVCache": True}
    for positions, how in (
        (1, "whole_buffer"),
        (33, "whole_buffer"),
        (4, "fused"),
        (257, "padded"),
    ):
        assert short_step_views(caches, positions, how) == caches


@pytest.mark.parametrize("model_type, padded", [("llama", True), ("gemma3_text", False)])
def test_a_padded_step_pads_only_over_plain_caches_and_attends_composed(
    model_factory, model_type, padded
):
    """Over plain caches a step of 5 runs 8 positions, through composed attention; over
    gemma3's rotating caches it runs its own 5 (composed in its plain layers)."""
    model, _ = load_model(model_factory(model_type))
    layers = inner_model(model).layers
    caches = make_prompt_cache(model)
    mx.eval(run_layers(layers, hidden(20, 0, model.args.hidden_size), caches))
    step = PaddedStep(caches, 5, "padded")
    assert step.width == (8 if padded else 5)
    assert PaddedStep(caches, 5, "whole_buffer").width == 5
    route_attention(layers)
    module = sys.modules[type(layers[0].self_attn).__module__]
    calls = []
    with patch.object(
        short_steps, "composed_attention", side_effect=short_steps.composed_attention
    ) as spy:
        mx.eval(
            run_layers(layers, hidden(5, 1, model.args.hidden_size), caches, short_steps="padded")
        )
        calls = spy.call_args_list
    assert module.scaled_dot_product_attention is short_steps._attention
    assert len(calls) == sum(type(c) is KVCache for c in caches)
    assert {c.offset for c in caches if type(c) is KVCache} == {25}


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
def test_composed_attention_is_mlx_attention(heads, kv_heads):
    """Against mx.fast's under the same mask: a step of 6 queries over 30 keys."""
    keys = [mx.random.key(n) for n in range(3)]
    q = mx.random.normal((1, heads, 6, 16), key=keys[0])
    k = mx.random.normal((1, kv_heads, 30, 16), key=keys[1])
    v = mx.random.normal((1, kv_heads, 30, 16), key=keys[2])
    mask = mx.arange(24, 30)[:, None] >= mx.arange(30)[None]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = short_steps.composed_attention(q, k, v, 0.25, mask)
    assert got.shape == want.shape and mx.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", HOW)
async def test_verification_attended_so_keeps_the_golden_rule(model_factory, start_workers, how):
    """Workers that verify drafts so (as on CUDA) give mlx-lm's tokens."""
    model = model_factory("qwen3")
    params = SamplingParams(max_tokens=NEW_TOKENS)
    clients = await start_workers(3, short_step_attention=how)
    engine = await make_engine(model, clients, [1, 5, 2])
    got, stats = await run(engine, PROMPT, params, LOOKUP)
    assert_same(got, reference(model, PROMPT, params))
    assert_drafts_tested(stats)


@pytest.mark.parametrize("how", HOW)
def test_a_draft_model_drafts_what_it_drafts_with_the_fused_kernel(model_factory, how):
    """The same drafts, step after step, as its cache is cut back past rejected drafts."""
    draft = model_factory("llama", quantize_bits=4)
    drafters = [DraftModel.load("d", draft, "fused"), DraftModel.load("d", draft, how)]
    sessions = [SimpleNamespace(draft=None) for _ in drafters]
    tokens = list(PROMPT)
    for n in range(12):
        pairs = zip(drafters, sessions, strict=True)
        exact, whole = (d.drafts(s, tokens, 4) for d, s in pairs)  # type: ignore[arg-type]
        assert exact == whole, f"step {n}"
        tokens += [*exact[: n % 3], (exact[0] + n) % 64]  # some kept, then another token


def test_a_rehearsal_runs_a_padded_step_of_each_width(model_factory):
    """What a GPU worker runs when it loads a slice (LayerSlice.warm_up), here on the CPU:
    after each prefix, one composed step of each width, in every layer."""
    layer_slice = load_layer_slice(model_factory("llama"), 2, 6)
    layer_slice.short_steps = "padded"
    with patch.object(
        short_steps, "composed_attention", side_effect=short_steps.composed_attention
    ) as spy:
        layer_slice.rehearse(prefixes=(20, 40), chunk=64)  # each prefix in one step
    widths = {call.args[0].shape[2] for call in spy.call_args_list}
    assert widths == set(short_steps.PADDED_WIDTHS)
    assert spy.call_count == 2 * len(short_steps.PADDED_WIDTHS) * 4  # prefixes, widths, layers


def test_a_padded_worker_verifies_drafts_over_whole_buffers(model_factory):
    """A verification's shapes come back step after step: on `padded` workers it attends
    over whole buffers (cuDNN keeps its plans on CUDA); other short steps are padded."""
    layer_slice = load_layer_slice(model_factory("llama"), 0, 4)
    layer_slice.short_steps = "padded"
    caches = layer_slice.make_caches()
    size = layer_slice.hidden_size
    mx.eval(layer_slice(hidden(20, 0, size), caches))
    with patch.object(
        short_steps, "composed_attention", side_effect=short_steps.composed_attention
    ) as spy:
        mx.eval(layer_slice(hidden(5, 1, size), caches, verifying=True))
        assert spy.call_count == 0
        mx.eval(layer_slice(hidden(5, 2, size), caches))
        assert spy.call_count == 4  # one a layer
    assert caches[0].offset == 30
