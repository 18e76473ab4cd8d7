"""Rewrite the results table at the top of bench/RESULTS.md from bench/results/*.json (``make bench`` ends here).

    PYTHONPATH=. .venv/bin/python bench/table.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- table: written by bench/table.py -->", "<!-- end of table -->"


def fmt(x) -> str:
    return "—" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def table() -> str:
    rows = ["| name | ratio | target | met | what | command | when |", "|---|---|---|---|---|---|---|"]
    for path in sorted((HERE / "results").glob("*.json")):
        r = json.loads(path.read_text())
        met = {True: "yes", False: "**no**", None: "—"}[r.get("met")]
        rows.append(f"| {r['name']} | {fmt(r.get('ratio'))} | {fmt(r.get('target'))} | {met} | {r.get('what', '')} "
                    f"| `{r['command']}` | {r.get('when', '')} |")
    return "\n".join(rows)


def main() -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text()
    block = f"{BEGIN}\n{table()}\n{END}"
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:  # first time: after the page's opening paragraph
        head, _, rest = text.partition("\n\n## ")
        text = f"{head}\n\n{block}\n\n## {rest}"
    path.write_text(text)
    print(table())


if __name__ == "__main__":
    main()
