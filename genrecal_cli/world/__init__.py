"""The offline tiny world: tiny models and tokenizers built from configs (`zoo`), the synthetic
shapes data (`shapes`). Used by the edge (recipe resolution, CLI), tests and benchmarks only."""
