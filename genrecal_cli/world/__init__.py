"""The offline tiny world that the edge (recipe resolution, CLI), tests and benchmarks use: the
built-in tiny models (`zoo`, built by `tokenizer`, `tiny_vlm`, `pretrain`), the synthetic shapes
data (`shapes`, `chats`)."""
