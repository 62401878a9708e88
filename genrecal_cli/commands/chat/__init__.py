"""`genrecal chat`: talk to a saved student. run.py loads it and drives the terminal;
session.py is the conversation itself, without a terminal."""

from .run import load_chat_model, run_chat

__all__ = ["load_chat_model", "run_chat"]
