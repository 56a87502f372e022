"""Markdown tables for the infilling and revision evaluations, and their place in BENCHMARKS.md.

The results live in the section "## Infilling and revision" (appended when missing); each run
writes one block there between markers named by its key, replacing that block on a rerun and
touching nothing else in the file.
"""

from __future__ import annotations

import re
from pathlib import Path

SECTION = "## Infilling and revision"
KIND_TITLES = {"single-line": "single line", "multi-line": "2-4 lines", "two-holes": "two separate lines",
               "stdlib-line": "stdlib line"}
SETTING_TITLES = {"oracle": "true length", "stop": "up to a newline"}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def infill_table(summary: list[dict], methods: list[str], metric: str) -> str:
    """Rows: task kind x length setting; columns: methods; cells: the metric (and exact match)."""
    by = {(r["kind"], r["setting"], r["method"]): r for r in summary}
    keys = sorted({(r["kind"], r["setting"]) for r in summary},
                  key=lambda k: (list(KIND_TITLES).index(k[0]) if k[0] in KIND_TITLES else 9, k[1] != "oracle"))
    head = "| holes | length | n | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (3 + len(methods))]
    for kind, setting in keys:
        cells = []
        n = 0
        for m in methods:
            r = by.get((kind, setting, m))
            if r is None:
                cells.append("")
                continue
            n = max(n, r["n"])
            cells.append(_pct(r[metric]) + (f" ({_pct(r['exact_match'])})" if metric == "pass_rate" else ""))
        lines.append(f"| {KIND_TITLES.get(kind, kind)} | {SETTING_TITLES.get(setting, setting)} | {n} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(summary: list[dict], methods: list[str]) -> str:
    lines = ["| method | forwards / task | seconds / task |", "|---|---|---|"]
    for m in methods:
        rs = [r for r in summary if r["method"] == m]
        if rs:
            n = sum(r["n"] for r in rs)
            f = sum(r["forwards_per_task"] * r["n"] for r in rs) / n
            s = sum(r["seconds_per_task"] * r["n"] for r in rs) / n
            lines.append(f"| {m} | {f:.1f} | {s:.2f} |")
    return "\n".join(lines)


def nll_table(nll: dict[str, list[dict]]) -> str:
    kinds = list(nll)
    layouts = list(dict.fromkeys(r["layout"] for rows in nll.values() for r in rows))
    by = {(k, r["layout"]): r for k in kinds for r in nll[k]}
    lines = ["| layout | " + " | ".join(f"{KIND_TITLES.get(k, k)} (n={nll[k][0]['tasks']})" for k in kinds) + " |",
             "|" + "---|" * (1 + len(kinds))]
    for lay in layouts:
        cells = [f"{by[(k, lay)]['nll_per_token']:.3f}" if (k, lay) in by else "" for k in kinds]
        lines.append(f"| {lay} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def revision_table(summary: list[dict]) -> str:
    lines = ["| setting | errors | tasks | planted | fixed | broken (of correct tokens) | re-masked: planted / all |",
             "|---|---|---|---|---|---|---|"]
    settings = list(dict.fromkeys(r["setting"] for r in summary))
    order = {"replace": 0, "swap": 1, "all": 2}
    for r in sorted(summary, key=lambda r: (settings.index(r["setting"]), order.get(r["kind"], 3))):
        lines.append(f"| {r['setting']} | {r['kind']} | {r['tasks']} | {r['planted']} | {r['fixed']} "
                     f"({_pct(r['fixed_rate'])}) | {r['broken']} of {r['correct_tokens']} "
                     f"({100 * r['broken_rate']:.1f}%) | {r['detected']} / {r['selected']} |")
    return "\n".join(lines)


def update_section(path, key: str, body: str) -> None:
    """Put `body` in BENCHMARKS.md's infilling section under `key` (replacing that key's old block)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    start, end = f"<!-- tridlm-eval:{key} -->", f"<!-- /tridlm-eval:{key} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        if SECTION not in text:
            text = (text.rstrip() + "\n\n" if text.strip() else "") + SECTION + "\n"
        # after the section's last block (or its heading), before the next section
        i = text.index(SECTION) + len(SECTION)
        nxt = re.search(r"^## ", text[i:], re.M)
        cut = i + nxt.start() if nxt else len(text)
        text = text[:cut].rstrip() + "\n\n" + block + "\n" + ("\n" + text[cut:] if nxt else "")
    path.write_text(text, encoding="utf-8")
