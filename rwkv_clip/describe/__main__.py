"""`python -m rwkv_clip.describe [rewrite|caption|tags|all] --input rows.csv ...`

- `rewrite` (also the bare form, `python -m rwkv_clip.describe --input ...`): an LLM merges the raw text, the
  synthetic caption and the tags into `generated_caption`;
- `caption`: a vision model writes `synthetic_caption` from each image;
- `tags`: a CLIP model (or a vision model on a server) lists the objects in each image as `tags`;
- `all`: the three steps in one resumable run.

Options as in `--help` of each (any of them may come from `--config FILE.yaml`); dashes work too (--text-key),
and a boolean option given bare (--resume) means true. Exit status: 0 when every row is generated or fell back
(in every step); 1 when some rows failed or could not be read (rerun with --resume true to retry them), the run
stopped early, or the input or options are wrong; 130 on Ctrl-C.
"""

import logging
import sys
from typing import Optional, Sequence

from rwkv_clip.command import run
from rwkv_clip.describe.core import describe
from rwkv_clip.describe.pipeline import caption, describe_all, tags

COMMANDS = {"rewrite": describe, "caption": caption, "tags": tags, "all": describe_all}


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    common = dict(prog="python -m rwkv_clip.describe", errors=(ValueError, OSError, ImportError, RuntimeError),
                  interrupted="finished rows are saved; rerun with --resume true to continue",
                  ok=lambda summary: summary.ok)
    if argv and argv[0] in COMMANDS:
        return run(COMMANDS, argv, **common)
    return run(describe, argv, **common)  # the bare form is `rewrite`, as before the subcommands


if __name__ == "__main__":
    sys.exit(main())
