"""Render report blocks as Markdown (GitHub flavour); figures link to their PNG files."""

from __future__ import annotations

from .document import Block, Bullets, Figure, Heading, Paragraph, Raw, Table


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(t: Table) -> str:
    align = t.align or ["l"] + ["r"] * (len(t.headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in t.headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
    return ("_" + t.caption + "_\n\n" if t.caption else "") + "\n".join(lines)


def render(title: str, blocks: list[Block]) -> str:
    parts = [f"# {title}"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append("#" * b.level + " " + b.text)
        elif isinstance(b, Paragraph):
            parts.append(b.text)
        elif isinstance(b, Bullets):
            parts.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            parts.append(table(b))
        elif isinstance(b, Figure):
            parts.append(f"![{b.caption}]({b.path})")
        elif isinstance(b, Raw) and b.markdown:
            parts.append(b.markdown)
    return "\n\n".join(parts) + "\n"
