"""The coordinator: tokenizer, embedding and head, and the chain of workers between them."""
