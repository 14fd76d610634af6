"""`python -m rwkv_clip.describe --input rows.csv --base_url http://localhost:8000/v1 --output rows.described.csv`

Flags are spelled with underscores (jsonargparse); dashes (--text-key) are accepted too, and a boolean flag
given bare (--resume) means true. Exit status: 0 when every row is done (some may be failed: see the summary),
1 when the run stopped early (rerun with --resume true), 130 on Ctrl-C.
"""

import inspect
import logging
import sys

from jsonargparse import CLI

from rwkv_clip.describe.core import describe

_BOOLS = {name for name, p in inspect.signature(describe).parameters.items() if p.annotation in (bool, "bool")}


def normalize_argv(argv: list[str]) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--") and len(a) > 2:
            flag, eq, val = a[2:].partition("=")
            a = "--" + flag.replace("-", "_") + eq + val
            if not eq and flag.replace("-", "_") in _BOOLS and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                out += [a, "true"]
                continue
        out.append(a)
    return out


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = normalize_argv(sys.argv[1:] if argv is None else list(argv))
    try:
        summary = CLI(describe, args=argv, as_positional=False)
    except KeyboardInterrupt:
        print("interrupted: finished rows are saved; rerun with --resume true to continue", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if summary.complete else 1


if __name__ == "__main__":
    sys.exit(main())
