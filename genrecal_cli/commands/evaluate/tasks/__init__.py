"""lm-eval task configs shipped with genrecal (package data): pass this folder as lm-eval's
`include_path` (`lm_eval --include_path "$(python -c 'import genrecal_cli.commands.evaluate.tasks as t; print(t.TASKS_DIR)')"`)."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
