"""What each subcommand adds over the core (recipe, models, data, engine): `distill` and `teach`
resolve a recipe into the engine's inputs and show its progress (distill.py, teach.py, display.py,
tables.py, report.py), `eval` runs lm-eval (evaluate.py, tasks/), `chat`, `inspect-vocab` and `plan`.
Nothing in engine/ or data/ imports from here."""
