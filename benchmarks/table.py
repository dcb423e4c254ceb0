"""Print the figures of the last benchmark run as a Markdown table: ``python3 -m benchmarks.table``."""
from __future__ import annotations

import json
import sys

from benchmarks.figures import results_path

ORDER = ["scrape", "base62", "hashing", "bus", "environments", "dispatch", "footprint", "start-up",
         "results", "peers"]


def main() -> int:
    path = results_path()
    try:
        figures = json.loads(path.read_text())["figures"]
    except (OSError, ValueError) as exc:
        print(f"no benchmark figures in {path}: {exc}", file=sys.stderr)
        return 1
    figures.sort(key=lambda f: (ORDER.index(f["suite"]) if f["suite"] in ORDER else 99, f["at"]))
    print("| suite | figure | value | bar | met |")
    print("|---|---|---|---|---|")
    missed = 0
    for f in figures:
        number = f["value"]
        value = "—" if number != number else f"{number:.3g} {f['unit']}".strip()  # NaN: none
        if f["note"]:
            value += f" ({f['note']})"
        met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
        missed += f["met"] is False
        print(f"| {f['suite']} | {f['figure']} | {value} | {f['bar']} | {met} |")
    quick = any(f.get("quick") for f in figures)
    print(f"\n{len(figures)} figures{' (quick mode)' if quick else ''}; "
          f"{missed} bar{'s' if missed != 1 else ''} missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
