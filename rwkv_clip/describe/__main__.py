"""`python -m rwkv_clip.describe --input rows.csv --base_url http://localhost:8000/v1 --output rows.described.csv`

Options as in `--help` (any of them may come from `--config FILE.yaml`); dashes work too (--text-key), and a
boolean option given bare (--resume) means true. Exit status: 0 when every row is generated or fell back; 1 when
some rows failed or could not be read (rerun with --resume true to retry them), the run stopped early, or the
input or options are wrong; 130 on Ctrl-C.
"""

import logging
import sys
from typing import Optional, Sequence

from rwkv_clip.command import run
from rwkv_clip.describe.core import describe


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(describe, argv, prog="python -m rwkv_clip.describe",
               errors=(ValueError, OSError, ImportError, RuntimeError),
               interrupted="finished rows are saved; rerun with --resume true to continue",
               ok=lambda summary: summary.ok)


if __name__ == "__main__":
    sys.exit(main())
