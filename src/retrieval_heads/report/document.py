"""The report as a list of blocks, rendered to Markdown (markdown.py) and to one HTML page (html.py).

Text may use two bits of inline markup, both rendered by each renderer: ``**bold**`` and ```code```.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    align: list[str] = field(default_factory=list)  # "l" or "r" per column; default: first left, rest right
    inline: bool = False  # small table: HTML lays consecutive inline tables side by side


@dataclass
class Figure:
    path: str  # relative to the report folder, where the PNG is written
    png: bytes
    caption: str
    width: int = 0  # display width in px for HTML; 0 = natural
    regions: list[dict] = field(default_factory=list)  # clickable heatmap axes (figures.region), HTML only


@dataclass
class Raw:
    """Ready-made HTML for the page (e.g. the explorer) and its Markdown stand-in (may be empty)."""

    html: str
    markdown: str = ""


Block = Heading | Paragraph | Bullets | Table | Figure | Raw
