"""A deterministic generator of fictional company filings.

Each sample is one fictional company. Its Section 1 ("Business") is the needle: it states the state and
year of incorporation, the number of employees and the headquarters state, in wording drawn from several
templates. The haystack is made of the other sections of filings (risk factors, properties, legal
proceedings, market, management's discussion), of this company and of other fictional companies, full of
other states, years and numbers as distractors, but never another company's Section 1 facts.

Everything is drawn from ``random.Random(f"{seed}:{index}")``, so sample ``i`` does not depend on how
many samples are asked for.

>>> c = make_company(random.Random("0:0"))
>>> c.facts["inc_state"] in c.section_1()
True
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .questions import STATES

_SYL = ["an", "bel", "cor", "dax", "el", "fen", "gor", "hal", "ix", "jon", "kel", "lum", "mar", "nor",
        "ost", "pra", "quin", "ral", "sor", "tev", "ul", "var", "wex", "yor", "zen", "tri", "bra", "ven"]
_SUFFIX = ["Holdings, Inc.", "Corporation", "Technologies, Inc.", "Industries, Inc.", "Group, Inc.",
           "Systems Corp.", "Therapeutics, Inc.", "Logistics Inc.", "Materials Corp.", "Brands, Inc."]
_INDUSTRY = [
    ("industrial pumps and flow-control equipment", "manufacturers and utilities"),
    ("cloud-based payroll software", "small and mid-sized businesses"),
    ("specialty packaging films", "food and beverage producers"),
    ("regional freight and warehousing services", "retailers and distributors"),
    ("generic injectable medicines", "hospitals and clinics"),
    ("residential solar installations", "homeowners"),
    ("precision optical components", "semiconductor equipment makers"),
    ("frozen and prepared foods", "grocery chains"),
    ("commercial insurance brokerage", "mid-market companies"),
    ("outdoor apparel and footwear", "specialty retailers and consumers"),
    ("water treatment chemicals", "municipalities and industrial plants"),
    ("data-center cooling systems", "hyperscale operators"),
]
_CITIES = ["Springfield", "Riverton", "Fairview", "Lakeside", "Greenville", "Franklin", "Clinton",
           "Madison", "Georgetown", "Salem", "Ashland", "Oxford", "Milton", "Dover", "Burlington"]


@dataclass
class Company:
    name: str
    industry: str
    customers: str
    city: str
    facts: dict[str, str]  # question key -> answer text, exactly as it appears in the needle
    wording_seed: float = field(repr=False)  # seeds the needle's wording: every call gives the same text

    def section_1(self) -> str:
        """The needle: Item 1, Business, stating all four facts (the same text on every call)."""
        return self.section_1_with_spans()[0]

    def section_1_with_spans(self) -> tuple[str, dict[str, tuple[int, int]]]:
        """The needle and, per fact (question key), the character span ``[start, end)`` where the needle states
        it: ``text[start:end] == facts[key]``. The same on every call (its wording comes from ``wording_seed``)."""
        r, n = random.Random(self.wording_seed), self.name
        f = {k: f"{_MARK[0]}{k}{_MARK[1]}{v}{_MARK[2]}" for k, v in self.facts.items()}  # located after joining
        intro = r.choice([
            f"{n} (the \"Company\") designs, makes and sells {self.industry} to {self.customers}.",
            f"{n} is a supplier of {self.industry}, serving {self.customers} across North America.",
            f"Founded as a family business, {n} today provides {self.industry} to {self.customers}.",
        ])
        inc = r.choice([
            f"The Company was incorporated in the State of {f['inc_state']} in {f['inc_year']}.",
            f"{n} was organized under the laws of {f['inc_state']} in {f['inc_year']}.",
            f"We were incorporated in {f['inc_state']} in {f['inc_year']} and have operated continuously since then.",
            f"The Company is a {f['inc_state']} corporation, incorporated in {f['inc_year']}.",
        ])
        hq = r.choice([
            f"Our principal executive offices are located in {self.city}, {f['hq_state']}.",
            f"The Company is headquartered in {self.city}, {f['hq_state']}.",
            f"Our headquarters are in {self.city}, {f['hq_state']}, where we also run our main laboratory.",
        ])
        emp = r.choice([
            f"As of the end of the fiscal year, we had {f['employee_count']} full-time employees.",
            f"The Company employed approximately {f['employee_count']} people at year end.",
            f"Our workforce consisted of {f['employee_count']} employees, none of whom are represented by a union.",
        ])
        extra = r.choice([
            "We sell through a direct sales force and a network of independent distributors.",
            "Our largest customer accounted for less than ten percent of net sales.",
            "We hold a number of patents, none of which is individually material to the business.",
        ])
        body = [intro, inc, hq, emp, extra]
        head, tail = body[:1], body[1:]
        r.shuffle(tail)
        return _unmark("Item 1. Business\n\n" + " ".join(head + tail))


_MARK = ("\x1e", "\x1f", "\x1d")  # fact start, key/value separator, fact end: never in generated text


def _unmark(marked: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """The text without the fact markers, and each marked fact's character span in it."""
    pattern = re.compile(f"{_MARK[0]}([^{_MARK[1]}]*){_MARK[1]}([^{_MARK[2]}]*){_MARK[2]}")
    out: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    at, length = 0, 0
    for m in pattern.finditer(marked):
        out.append(marked[at : m.start()])
        length += m.start() - at
        spans[m.group(1)] = (length, length + len(m.group(2)))
        out.append(m.group(2))
        length += len(m.group(2))
        at = m.end()
    out.append(marked[at:])
    return "".join(out), spans


def _word(r: random.Random, k: int) -> str:
    return "".join(r.choice(_SYL) for _ in range(k)).capitalize()


def make_company(r: random.Random) -> Company:
    states = list(STATES)
    industry, customers = r.choice(_INDUSTRY)
    count = r.randrange(120, 95000)
    count_text = f"{count:,}" if r.random() < 0.7 else str(count)
    facts = {
        "inc_state": r.choice(states),
        "inc_year": str(r.randrange(1905, 2021)),
        "employee_count": count_text,
        "hq_state": r.choice(states),
    }
    return Company(f"{_word(r, 2)} {r.choice(_SUFFIX)}", industry, customers, r.choice(_CITIES), facts,
                   r.random())


def haystack_paragraphs(r: random.Random, company_name: str) -> list[str]:
    """One filing's non-needle sections: paragraphs with distractor states, years and numbers."""
    states = list(STATES)
    st = lambda: r.choice(states)  # noqa: E731
    yr = lambda: str(r.randrange(1950, 2025))  # noqa: E731
    num = lambda lo, hi: f"{r.randrange(lo, hi):,}"  # noqa: E731
    n = company_name
    pool = [
        f"Item 1A. Risk Factors\n\nOur results depend on demand from a small number of large customers. "
        f"A downturn in {st()} or {st()}, where many of them operate, could reduce our net sales. "
        f"Since {yr()}, several competitors have entered our markets with lower prices.",
        f"Competition for skilled workers is intense. Wage inflation in {st()} raised our labor costs by "
        f"{r.randrange(2, 15)} percent last year, and a shortage of technicians could delay projects.",
        f"We rely on information systems that may fail or be breached. In {yr()} a vendor serving "
        f"{num(200, 9000)} of our accounts reported an outage that lasted {r.randrange(2, 40)} hours.",
        f"Item 2. Properties\n\nWe lease a {num(20000, 400000)} square foot distribution center in {st()} "
        f"and own a manufacturing plant in {st()}, built in {yr()}.",
        f"Our facilities in {st()} and {st()} operate at about {r.randrange(40, 95)} percent of capacity. "
        f"We believe they are adequate for our needs for the next several years.",
        f"Item 3. Legal Proceedings\n\nIn {yr()}, a former supplier filed suit in a state court in {st()} "
        f"seeking ${num(1, 90)} million in damages. We believe the claims are without merit.",
        f"From time to time we are party to claims arising in the ordinary course of business, including "
        f"{r.randrange(3, 60)} pending product liability matters in {st()}.",
        f"Item 5. Market for Common Equity\n\nOur common stock trades under the symbol "
        f"\"{_word(r, 1).upper()[:4]}\". There were approximately {num(300, 9000)} holders of record.",
        f"Item 7. Management's Discussion and Analysis\n\nNet sales rose {r.randrange(1, 30)} percent to "
        f"${num(40, 9000)} million, driven by volume growth in {st()} and price increases.",
        f"Gross margin was {r.randrange(18, 61)}.{r.randrange(0, 10)} percent, compared with "
        f"{r.randrange(18, 61)}.{r.randrange(0, 10)} percent a year earlier. Selling and administrative "
        f"expenses were ${num(5, 900)} million.",
        f"Capital expenditures of ${num(2, 400)} million were spent mainly on a new line in {st()}. "
        f"We expect to spend a similar amount next year.",
        f"{n} repurchased {num(10000, 900000)} shares during the year under a program approved in {yr()}.",
        f"Item 7A. Quantitative and Qualitative Disclosures About Market Risk\n\nA one percentage point rise "
        f"in interest rates would increase annual interest expense by about ${num(1, 30)} million.",
        f"Our pension plans cover {num(100, 30000)} current and former workers, mostly in {st()}; the plans "
        f"were closed to new participants in {yr()}.",
        "Item 9A. Controls and Procedures\n\nManagement assessed internal control over financial reporting "
        "as of year end and concluded that it was effective.",
        f"A distributor in {st()} accounted for {r.randrange(5, 20)} percent of net sales. The agreement, "
        f"signed in {yr()}, renews annually.",
    ]
    r.shuffle(pool)
    return pool[: r.randrange(6, len(pool))]


@dataclass
class FilingSample:
    company: Company
    needle: str
    haystack_before: list[str]  # paragraphs, read backwards from the needle (nearest last)
    haystack_after: list[str]  # paragraphs that follow the needle
    fact_spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # question key -> [start, end) in needle


def make_sample(seed: int, index: int, min_paragraphs: int = 250) -> FilingSample:
    """Sample ``index`` of the synthetic set for ``seed``: a company, its needle and two haystack streams.

    Each stream holds at least ``min_paragraphs`` paragraphs (about 45 tokens each), enough for 8K-token
    prompts with the needle at any depth.
    """
    r = random.Random(f"{seed}:{index}")
    company = make_company(r)
    needle, spans = company.section_1_with_spans()
    own = haystack_paragraphs(r, company.name)
    before: list[str] = []
    after: list[str] = list(own)
    while len(before) < min_paragraphs or len(after) < min_paragraphs:
        other = make_company(r)
        side = before if len(after) >= min_paragraphs or (len(before) < min_paragraphs and r.random() < 0.5) else after
        side.extend(haystack_paragraphs(r, other.name))
    return FilingSample(company, needle, before, after, spans)
