"""Data: tfds text sources (the embedded local-text builder and any prepared tfds dataset),
the sentencepiece tokenizer, and packing of documents into training rows."""
