"""Datasets the students train on (images, text, emoji image-caption pairs), their augmentation,
tokenizer and per-worker shards; ``build.build_dataset`` builds one by its registered name."""
