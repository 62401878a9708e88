"""Print an `inspect-vocab` report as rich tables, the aligned sample sentence and the verdict."""

from __future__ import annotations

from .compare import Report, role_name
from .source import SPECIAL_ROLES

_KIND_STYLE = {"1:1": "green", "1:n": "yellow", "n:1": "cyan", "n:m": "magenta", "1:0": "red", "0:1": "red"}


def _fmt_int(x: int | None) -> str:
    return "—" if x is None else f"{x:,}"


def _pct(x: float) -> str:
    if 0 < x < 0.001:
        return "<0.1%"
    if 0.999 < x < 1:
        return ">99.9%"
    return f"{100 * x:.1f}%"


def _special_cell(d: dict | None) -> str:
    return "—" if d is None else f"{d['token']}  {d['id']:,}"


def _aligned_lines(sample: dict, width: int):
    """Teacher and student renderings of the sample sentence, padded (·) span by span to line up."""
    from rich.text import Text

    rows = []
    top, bottom = Text(), Text()
    used = 0
    prev_end = None
    for sp in sample["spans"]:
        # spans that touch get a cut mark; a gap is whitespace that no token holds
        sep = "" if prev_end is None else (" " * (sp["start"] - prev_end) or "│")
        prev_end = sp["end"]
        a = "│".join(sp["teacher"])
        b = "│".join(sp["student"])
        w = max(len(a), len(b))
        if used and used + len(sep) + w > width:
            rows.append((top, bottom))
            top, bottom, used, sep = Text(), Text(), 0, ""
        style = _KIND_STYLE.get(sp["kind"], "white")
        for line, piece in ((top, a), (bottom, b)):
            line.append(sep, style="dim")
            line.append(piece, style=style)
            line.append("·" * (w - len(piece)), style="dim")
        used += len(sep) + w
    rows.append((top, bottom))
    return rows


def render(report: Report, console) -> None:
    """Print the report as rich tables, the aligned sample sentence and the verdict."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t, s = report.teacher, report.student

    def table(title: str) -> Table:
        tab = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left", title_style="bold")
        tab.add_column("")
        tab.add_column("teacher", overflow="fold")
        tab.add_column("student", overflow="fold")
        return tab

    sizes = table("Sizes")
    sizes.add_row("source", Text(t.source), Text(s.source))
    sizes.add_row("loaded as", f"{t.kind} ({t.tokenizer_class})", f"{s.kind} ({s.tokenizer_class})")
    sizes.add_row("word marker", t.marker, s.marker)
    sizes.add_row("len(tokenizer)", _fmt_int(t.len_tokenizer), _fmt_int(s.len_tokenizer))
    sizes.add_row("base vocabulary", _fmt_int(t.base_vocab), _fmt_int(s.base_vocab))
    sizes.add_row("config vocab_size", _fmt_int(t.config_vocab_size), _fmt_int(s.config_vocab_size))
    sizes.add_row("head rows", _fmt_int(t.head_rows), _fmt_int(s.head_rows))
    sizes.add_row("added tokens (special)", f"{t.added_tokens:,} ({t.special_added_tokens:,})",
                  f"{s.added_tokens:,} ({s.special_added_tokens:,})")
    console.print(sizes)

    spec = table("Special tokens")
    for r in SPECIAL_ROLES:
        spec.add_row(role_name(r), Text(_special_cell(t.special_tokens[r])),
                     Text(_special_cell(s.special_tokens[r])))
    spec.add_row("added at start", Text(" ".join(t.adds_at_start) or "—"), Text(" ".join(s.adds_at_start) or "—"))
    spec.add_row("added at end", Text(" ".join(t.adds_at_end) or "—"), Text(" ".join(s.adds_at_end) or "—"))
    console.print(spec)
    for a in report.asymmetries:
        console.print(Text(f"  ! {a}", style="yellow"))

    o = report.overlap
    ov = table("Vocabulary overlap (surface strings, markers normalised, special tokens left out)")
    ov.add_row("surfaces", _fmt_int(o["size_a"]), _fmt_int(o["size_b"]))
    shared = f"{o['shared']:,}"
    ov.add_row("also in the other", f"{shared} ({_pct(o['share_of_a'])})", f"{shared} ({_pct(o['share_of_b'])})")
    ov.add_row("of those, at the same id", f"{o['same_id']:,} ({_pct(o['same_id_share'])})",
               f"{o['same_id']:,} ({_pct(o['same_id_share'])})")
    console.print(ov)

    sp = report.splits
    txt = report.text
    plural = "s" if txt["texts"] != 1 else ""
    splits = table(f"Splits on {txt['source']} ({txt['chars']:,} chars, {txt['texts']:,} text{plural})")
    splits.add_row("tokens per 100 chars", f"{sp['tokens_per_100_chars_a']:.1f}", f"{sp['tokens_per_100_chars_b']:.1f}")
    splits.add_row("boundaries", _fmt_int(sp["boundaries_a"]), _fmt_int(sp["boundaries_b"]))
    splits.add_row("shared with the other", _pct(sp["boundary_share_a"]), _pct(sp["boundary_share_b"]))
    splits.add_row("boundary agreement", _pct(sp["boundary_agreement"]), "")
    n = sp["spans"] or 1
    splits.add_row("aligned spans", _fmt_int(sp["spans"]), "")
    for label, key in (("  1:1", "one_one"), ("  1:n (1 teacher token, n student)", "one_many"),
                       ("  n:1", "many_one"), ("  n:m", "many_many")):
        splits.add_row(label, f"{sp[key]:,} ({_pct(sp[key] / n)})", "")
    if sp["unmatched"]:
        splits.add_row("  one side only", f"{sp['unmatched']:,}", "")
    console.print(splits)

    if report.sample:
        console.print(Text("Sample sentence, span by span (│ cuts a token, · pads; ", style="bold")
                      + Text("1:1 ", style="green") + Text("1:n ", style="yellow") + Text("n:1 ", style="cyan")
                      + Text("n:m", style="magenta") + Text(")", style="bold"))
        width = max(40, (console.width or 100) - 10)
        for top, bottom in _aligned_lines(report.sample, width):
            console.print(Text("teacher  ", style="dim") + top)
            console.print(Text("student  ", style="dim") + bottom)
        console.print()

    if t.image or s.image:
        im = table("Images (processor, no weights)")
        g = lambda side, k: "—" if not side.image or side.image.get(k) is None else str(side.image[k])  # noqa: E731
        im.add_row("placeholder", Text(g(t, "placeholder")), Text(g(s, "placeholder")))
        im.add_row("image token", Text(f"{g(t, 'image_token')}  {g(t, 'image_token_id')}"),
                   Text(f"{g(s, 'image_token')}  {g(s, 'image_token_id')}"))
        im.add_row("tokens per image, default size",
                   f"{g(t, 'tokens_default')} at {g(t, 'default_size')}",
                   f"{g(s, 'tokens_default')} at {g(s, 'default_size')}")
        im.add_row("tokens per image, 448x448", g(t, "tokens_448"), g(s, "tokens_448"))
        console.print(im)

    if t.chat_template or s.chat_template:
        ct = Table(title="Chat templates on one conversation", box=box.SIMPLE_HEAVY, title_justify="left",
                   title_style="bold")
        ct.add_column("teacher", overflow="fold")
        ct.add_column("student", overflow="fold")
        ct.add_row(Text(t.chat_template or "(no chat template)"), Text(s.chat_template or "(no chat template)"))
        console.print(ct)

    for side in (t, s):
        for note in side.notes:
            console.print(Text(f"  note ({side.role}): {note}", style="dim"))

    v = report.verdict
    style = "bold green" if v["same"] else "bold red"
    line = Text(v["headline"], style=style)
    if v["reasons"]:
        line.append(" (" + "; ".join(v["reasons"]) + ")", style=style.replace("bold ", ""))
    console.print(line)
