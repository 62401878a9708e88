"""What each subcommand adds over the core (recipe, models, data, engine): `distill` and `teach`
(distill.py, teach.py, display.py, tables.py, report.py) resolve a recipe into the engine's inputs,
then show its progress; `eval` (evaluate.py, tasks/), `chat`, `inspect-vocab`, `plan`. Nothing in
engine/ or data/ imports from here."""
