"""Data: record sources (the embedded local-text builder, prepared tfds datasets, JSON Lines and
ArrayRecord files), the sentencepiece tokenizer, packing of documents into rows, and the grain
streams that shard, tokenise, pack and resume them."""
