"""Refresh a generated section of BENCHMARKS.md from a `tridlm bench` output folder.

    python scripts/update_benchmarks.py bench-out --section cpu

copies the run's PNG plots to benchmarks/<section>/ and replaces the text between
`<!-- bench:<section> -->` and `<!-- /bench:<section> -->` in BENCHMARKS.md with the run's report
(tables, machine, exact command). The prose around the markers is written by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from tridlm.bench.report import PLOTS, markdown

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the output folder of a tridlm bench run (holds bench.json and the plots)")
    ap.add_argument("--section", default="cpu", help="section name: cpu, gpu, ... (default cpu)")
    ap.add_argument("--file", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()

    run = Path(args.run)
    rep = json.loads((run / "bench.json").read_text())
    assets = ROOT / "benchmarks" / args.section
    assets.mkdir(parents=True, exist_ok=True)
    for p in PLOTS:
        shutil.copyfile(run / p, assets / p)
    shutil.copyfile(run / "bench.json", assets / "bench.json")
    body = markdown(rep, plot_prefix=f"benchmarks/{args.section}/")

    doc = Path(args.file)
    text = doc.read_text() if doc.is_file() else ""
    start, end = f"<!-- bench:{args.section} -->", f"<!-- /bench:{args.section} -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {args.section.upper()} run\n\n{block}\n"
    doc.write_text(text)
    print(f"updated {doc} section {args.section!r}; plots in {assets}")


if __name__ == "__main__":
    main()
