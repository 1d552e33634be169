#!/usr/bin/env python
"""Write tiny synthetic checkpoints with the real tensor names of each family (developer script).

    python tools/make_tiny_checkpoint.py /tmp/tiny            # every family x layout under /tmp/tiny
    python tools/make_tiny_checkpoint.py /tmp/tiny --family deepseek-v3 --layout engine
"""

import argparse
from pathlib import Path

from fp8norm.examples import FAMILIES, LAYOUTS, make_example


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--family", choices=FAMILIES, action="append")
    ap.add_argument("--layout", choices=LAYOUTS, action="append")
    args = ap.parse_args()
    for family in args.family or FAMILIES:
        for layout in args.layout or LAYOUTS:
            path = make_example(args.root / f"{family}-{layout}", family, layout, overwrite=True)
            print(path)


if __name__ == "__main__":
    main()
