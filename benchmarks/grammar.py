"""`python -m benchmarks.grammar`: what a JSON-schema constraint costs per token, by engine.

A synthetic byte-level BPE tokenizer of --vocab tokens (128k by default, the size
of Llama 3's) is built offline with the `tokenizers` library: the 256 byte tokens,
then word prefixes of a made-up lexicon (with and without a leading space, and
capitalised), numbers, JSON punctuation, indentation and multi-byte characters,
each token the merge of two earlier ones, as BPE training makes them.

Documents that satisfy a realistic schema (nested objects, an array of objects,
enums, integers, numbers, booleans, strings) are tokenized with it; each engine
that is installed (llguidance, xgrammar, outlines-core) then walks every token
of them as constrained decoding does: compute the mask of allowed tokens, apply it
to [1, vocab] float32 logits in MLX (worker/constraint.py's `apply_bitmask`, the
same for every engine) and evaluate, then advance the matcher by the token. The
grammar's compile time (up to its first mask) is reported apart. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from benchmarks.pipeline import default_json_path, host_info, say
from benchmarks.report import text_table
from mlx_cluster.worker.constraint import apply_bitmask

EOS = "<|end_of_text|>"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer"},
        "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "email": {"type": "string"},
                "vip": {"type": "boolean"},
            },
            "required": ["name", "email", "vip"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer"},
                    "price": {"type": "number"},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "note": {"type": "string"},
    },
    "required": ["order_id", "status", "customer", "items", "note"],
    "additionalProperties": False,
}


# --- the tokenizer ---------------------------------------------------------------------


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _pieces(rng: random.Random) -> Iterator[str]:
    """Texts whose every prefix becomes a token, most common kinds first."""
    yield from ("{", '{"', '":', '",', '":"', '"}', "},", "],", "[{", "}]", ' "', "\n")
    for width in range(1, 17):
        yield " " * width
        yield "\n" + " " * width
    yield from (str(n) for n in range(1000))
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiouy"] + list("aeiou")
    multibyte = [chr(c) for c in (*range(0xC0, 0x17F), *range(0x4E00, 0x4E00 + 3000))]
    while True:
        if rng.random() < 0.1:
            yield "".join(rng.choices(multibyte, k=rng.randint(1, 3)))
            continue
        word = "".join(rng.choices(syllables, k=rng.randint(1, 5)))
        yield from (word, " " + word, " " + word.capitalize(), word + rng.choice(".,:;!?"))


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE tokenizer of `vocab_size` tokens, the last one EOS (see module)."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    merges: list[tuple[str, str]] = []
    for piece in _pieces(random.Random(seed)):
        symbols = [chars[b] for b in piece.encode("utf-8")]
        current = symbols[0]
        for symbol in symbols[1:]:
            merged = current + symbol
            if merged not in vocab:
                if len(vocab) >= vocab_size - 1:
                    break
                vocab[merged] = len(vocab)
                merges.append((current, symbol))
            current = merged
        if len(vocab) >= vocab_size - 1:
            break
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    return tokenizer


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """Each token id's bytes (special tokens as their text)."""
    decode = {c: b for b, c in enumerate(_byte_chars())}
    out = [b""] * tokenizer.get_vocab_size()
    for text, i in tokenizer.get_vocab().items():
        if all(c in decode for c in text):
            out[i] = bytes(decode[c] for c in text)
        else:
            out[i] = text.encode()
    return out


def documents(count: int, seed: int) -> list[str]:
    """`count` JSON texts that satisfy SCHEMA, compact, as a model writes them."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(50)]
    docs = []
    for n in range(count):
        doc = {
            "order_id": rng.randint(1, 10**6),
            "status": rng.choice(SCHEMA["properties"]["status"]["enum"]),
            "customer": {
                "name": " ".join(rng.choices(words, k=2)).title(),
                "email": f"{rng.choice(words)}@{rng.choice(words)}.com",
                "vip": rng.random() < 0.5,
            },
            "items": [
                {
                    "sku": f"SKU-{rng.randint(100, 999)}",
                    "quantity": rng.randint(1, 20),
                    "price": round(rng.uniform(1, 500), 2),
                }
                for _ in range(1 + n % 4)
            ],
            "note": " ".join(rng.choices(words, k=rng.randint(4, 16))).capitalize() + ".",
        }
        docs.append(json.dumps(doc, separators=(",", ":")))
    return docs


# --- the engines -----------------------------------------------------------------------


class Matcher(Protocol):
    def fill(self, bitmask: np.ndarray) -> None: ...  # the allowed tokens, one bit each
    def advance(self, token: int) -> bool: ...  # False: the token is not allowed


@dataclass(frozen=True)
class Setup:
    """An engine ready for one schema: a fresh matcher for each document."""

    compile_s: float
    new_matcher: Callable[[], Matcher]


def llguidance_setup(tokenizer: Tokenizer, vocab: int, eos: int) -> Setup:
    import llguidance

    lltok = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab, eos_token=eos)
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    llguidance.LLMatcher(lltok, grammar).compute_bitmask()  # it compiles lazily
    compile_s = time.perf_counter() - started

    class Guided:
        def __init__(self) -> None:
            self.matcher = llguidance.LLMatcher(lltok, grammar)

        def fill(self, bitmask: np.ndarray) -> None:
            self.matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

        def advance(self, token: int) -> bool:
            return self.matcher.consume_token(token)

    return Setup(compile_s, Guided)


def xgrammar_setup(tokenizer: Tokenizer, vocab: int, eos: int) -> Setup:
    import xgrammar as xgr

    info = xgr.TokenizerInfo(
        token_bytes(tokenizer), xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=[eos]
    )
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True)
    compile_s = time.perf_counter() - started
    torch_mask = xgr.allocate_token_bitmask(1, vocab)

    class Guided:
        def __init__(self) -> None:
            self.matcher = xgr.GrammarMatcher(compiled)

        def fill(self, bitmask: np.ndarray) -> None:
            self.matcher.fill_next_token_bitmask(torch_mask)
            bitmask[:] = torch_mask[0].numpy()

        def advance(self, token: int) -> bool:
            return bool(self.matcher.accept_token(token))

    return Setup(compile_s, Guided)


def outlines_setup(tokenizer: Tokenizer, vocab: int, eos: int) -> Setup:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    ids: dict[bytes, list[int]] = {}
    for i, piece in enumerate(token_bytes(tokenizer)):
        if i != eos:
            ids.setdefault(piece, []).append(i)
    vocabulary = outlines_core.Vocabulary(eos, ids)
    started = time.perf_counter()
    index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    compile_s = time.perf_counter() - started

    class Guided:
        def __init__(self) -> None:
            self.guide = outlines_core.Guide(index)

        def fill(self, bitmask: np.ndarray) -> None:
            self.guide.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)

        def advance(self, token: int) -> bool:
            try:
                self.guide.advance(token)
            except ValueError:
                return False
            return True

    return Setup(compile_s, Guided)


ENGINES = {
    "llguidance": llguidance_setup,
    "xgrammar": xgrammar_setup,
    "outlines-core": outlines_setup,
}


# --- measuring -------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineResult:
    engine: str
    version: str
    compile_s: float
    tokens: int
    mask_us_median: float  # compute the mask
    apply_us_median: float  # apply it to the logits in MLX and evaluate
    advance_us_median: float  # advance the matcher by the token
    total_us_median: float  # the three, per token
    total_us_p99: float
    total_us_mean: float


def measure(name: str, setup: Setup, docs: list[list[int]], vocab: int) -> EngineResult:
    """Walk every document's tokens under the engine; per-token times in microseconds."""
    bitmask = np.zeros((vocab + 31) // 32, dtype=np.int32)
    logits = mx.random.normal((1, vocab))
    mx.eval(logits)
    mask_s, apply_s, advance_s = [], [], []
    for doc in docs:
        matcher = setup.new_matcher()
        for token in doc:
            t0 = time.perf_counter()
            matcher.fill(bitmask)
            t1 = time.perf_counter()
            mx.eval(apply_bitmask(logits, bitmask))
            t2 = time.perf_counter()
            if not matcher.advance(token):
                raise RuntimeError(f"{name} refused token {token} of a valid document")
            t3 = time.perf_counter()
            mask_s.append(t1 - t0)
            apply_s.append(t2 - t1)
            advance_s.append(t3 - t2)
    total = [a + b + c for a, b, c in zip(mask_s, apply_s, advance_s, strict=True)]

    def us(values: list[float]) -> float:
        return round(statistics.median(values) * 1e6, 1)

    return EngineResult(
        name,
        _version(name),
        round(setup.compile_s, 3),
        len(total),
        us(mask_s),
        us(apply_s),
        us(advance_s),
        us(total),
        round(float(np.percentile(total, 99)) * 1e6, 1),
        round(statistics.fmean(total) * 1e6, 1),
    )


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name.replace("-", "_") if name == "outlines-core" else name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=128_256, help="tokenizer size")
    parser.add_argument("--documents", type=int, default=8, help="JSON documents walked")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args(argv)

    say(f"building a {args.vocab}-token byte-level BPE tokenizer")
    tokenizer = synthetic_tokenizer(args.vocab)
    vocab, eos = tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS)
    docs = [tokenizer.encode(text).ids for text in documents(args.documents, seed=1)]
    say(f"{len(docs)} documents, {sum(map(len, docs))} tokens")
    results = []
    for name in args.engines.split(","):
        try:
            setup = ENGINES[name](tokenizer, vocab, eos)
        except ImportError as exc:
            say(f"{name}: not installed ({exc})")
            continue
        measure(name, setup, docs[:1], vocab)  # warm-up
        results.append(measure(name, setup, docs, vocab))
        say(f"{name}: {results[-1]}")
    rows = [
        [r.engine, r.version, f"{r.compile_s * 1e3:.0f}", str(r.tokens)]
        + [str(v) for v in (r.mask_us_median, r.apply_us_median, r.advance_us_median)]
        + [str(r.total_us_median), str(r.total_us_p99)]
        for r in results
    ]
    header = ["engine", "version", "compile ms", "tokens", "mask us", "apply us"]
    print(text_table([*header, "advance us", "total us (median)", "total us (p99)"], rows))
    out = args.json or default_json_path("grammar")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"host": host_info(), "vocab": vocab, "results": [asdict(r) for r in results]}
    out.write_text(json.dumps(report, indent=2))
    say(f"wrote {out}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
