"""`genrecal eval`: a student (or any model) on lm-eval benchmarks and genrecal's own task.

run.py: the run and its protocol; inputs.py: the models and data checked before lm-eval loads
them; report.py: the results, side by side; tasks/: genrecal's lm-eval task configs.
"""

from .run import evaluate, latest_student, parse_benchmarks

__all__ = ["evaluate", "latest_student", "parse_benchmarks"]
