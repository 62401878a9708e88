"""`genrecal chat`: a multi-turn session with any supported VLM (an exported student, a teacher,
a tiny model), written with the model's own chat template, images included.

`run_chat` loads the model and puts two thin front ends on the session (session.py): a rich
prompt with answers streamed token by token in a terminal, one turn per line when piped.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from ...errors import ModelLoadError
from .session import ChatSession, EndSession, TurnError, chat_template_of, parse_command


# --------------------------------------------------------------------------- loading


def load_chat_model(source: str, device: str | None = None):
    """The VLM for `source` (a folder, hub id or zoo:NAME), checked to have a chat template."""
    from ...models import load_vlm
    from ...world.zoo import resolve_source

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    vlm = load_vlm(resolve_source(source), device=device)
    if not chat_template_of(vlm.processor):
        raise ModelLoadError(
            f"{source}: no chat template (no chat_template.jinja, and none in tokenizer_config.json or "
            "processor_config.json), so chat cannot tell how to write a conversation; copy the chat "
            "template of the checkpoint this model was made from into the folder"
        )
    return vlm


# --------------------------------------------------------------------------- front ends


def run_chat(model: str, *, images: Iterable[str] = (), system: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0, device: str | None = None, context: int | None = None,
             stdin: TextIO | None = None, interactive: bool | None = None, console=None) -> None:
    """`genrecal chat`: a rich prompt with streamed answers in a terminal; one turn per input
    line, one answer per output line when stdin is piped."""
    from rich.console import Console

    stdin = stdin or sys.stdin
    interactive = stdin.isatty() if interactive is None else interactive
    for path in images:  # checked before the (slow) model load
        p = Path(path).expanduser()
        if not p.is_file():
            raise TurnError(f"--image {path}: no such file")
    vlm = load_chat_model(model, device)
    session = ChatSession(vlm, system=system, max_new_tokens=max_new_tokens, temperature=temperature, context=context)
    for path in images:
        try:
            session.attach(path)
        except TurnError as exc:
            raise TurnError(f"--image {exc}") from None
    # Piped: answers alone on stdout, everything else on stderr, so the output is scriptable.
    say = console or Console(stderr=not interactive, highlight=False)
    for note in session.start_notices():
        say.print(f"[yellow]{note}[/]")
    if interactive:
        _terminal(session, say, model)
    else:
        _piped(session, say, stdin)


def _dispatch(session: ChatSession, line: str, say, answer: Callable[[str], None]) -> bool:
    """Handle one input line; False when the session should end."""
    cmd = parse_command(line)
    try:
        if cmd is None:
            answer(line.strip())
        else:
            say.print(session.command(cmd), markup=False, soft_wrap=True)
    except EndSession:
        return False
    except TurnError as exc:
        from rich.markup import escape

        first, _, rest = str(exc).partition("\n")
        say.print(f"[red]{escape(first)}[/]", soft_wrap=True)
        if rest:
            say.print(rest, markup=False)
    return True


def _piped(session: ChatSession, say, stdin: TextIO) -> None:
    def answer(text: str) -> None:
        turn = session.prepare(text)
        for note in turn.notices:
            say.print(note, markup=False, soft_wrap=True)
        # One answer, one line: line breaks inside it become spaces here (/save keeps them).
        print(re.sub(r"\s*\n\s*", " ", session.record(turn, session.generate(turn))), flush=True)

    for line in stdin:
        if line.strip() and not _dispatch(session, line, say, answer):
            break


def _terminal(session: ChatSession, console, model: str) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    vlm = session.vlm
    console.print(
        f"[bold]genrecal chat[/] · {model} ({vlm.family}, context {session.context} tokens, "
        f"{'greedy' if session.temperature == 0 else f'temperature {session.temperature:g}'})\n"
        "[dim]/help for commands · Ctrl-C stops an answer · Ctrl-D leaves[/]"
    )

    def answer(text: str) -> None:
        _stream(session, console, text)

    while True:
        try:
            line = console.input("[bold cyan]you ›[/] ")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-D or /exit to leave)[/]")
            continue
        if line.strip() and not _dispatch(session, line, console, answer):
            return


def _stream(session: ChatSession, console, text: str) -> None:
    """Generate on a thread and print the answer as it comes; Ctrl-C sets the stop flag."""
    from transformers import TextIteratorStreamer

    turn = session.prepare(text)
    for note in turn.notices:
        console.print(f"[yellow]{note}[/]")
    streamer = TextIteratorStreamer(session.vlm.tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["ids"] = session.generate(turn, streamer=streamer, stop=stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            result["error"] = exc
            streamer.end()

    console.print("[bold magenta]model ›[/] ", end="")
    start = time.perf_counter()
    thread = threading.Thread(target=work, name="genrecal-generate", daemon=True)
    thread.start()
    first = True
    try:
        for piece in streamer:
            if first:
                piece, first = piece.lstrip(), False
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        stop.set()
    while thread.is_alive():  # a second Ctrl-C while the last step finishes changes nothing
        try:
            thread.join(0.1)
        except KeyboardInterrupt:
            stop.set()
    elapsed = time.perf_counter() - start
    console.print()
    if "error" in result:
        raise result["error"]
    ids = result["ids"]
    session.record(turn, ids, stopped=stop.is_set())
    rate = len(ids) / elapsed if elapsed > 0 else float("nan")
    console.print(f"[dim]{len(ids)} token{'' if len(ids) == 1 else 's'} · {rate:.1f} tokens/s{' · stopped' if stop.is_set() else ''}[/]")
