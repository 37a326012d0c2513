"""Print the before/after table of docs/training.md from `segany eval` result folders.

python benchmarks/train_table.py runs/eval base noreplay replay
(reads RUNS/<name>_{dsb,davis}_{points,boxes}/results.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _result(folder: Path) -> dict | None:
    path = folder / "results.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "runs" in data:
        data = data["runs"]
    return data[0] if isinstance(data, list) else data


def main(root: str, *names: str) -> None:
    base = Path(root)
    cols = [("dsb", "points"), ("dsb", "boxes"), ("davis", "points"), ("davis", "boxes")]
    print("| model | nuclei 1 click | nuclei 1 click oracle | nuclei box | DAVIS 1 click | "
          "DAVIS 1 click oracle | DAVIS box |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in names:
        cells = []
        for ds, proto in cols:
            r = _result(base / f"{name}_{ds}_{proto}")
            if r is None:
                cells += ["-"] * (2 if proto == "points" else 1)
            elif proto == "points":
                cells += [f"{r['miou']['1']:.2f}", f"{r['oracle_miou_1']:.2f}"]
            else:
                cells.append(f"{r['miou']:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
