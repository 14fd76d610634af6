"""Diverse description generation, RWKV-CLIP's three texts per image: a captioner writes `synthetic_caption`
(`caption`), a tagger lists the objects as `tags` (`tags`), and an LLM merges the raw web text, the caption and
the tags into one faithful `generated_caption` (`describe`); `describe_all` runs the three.

CLI: `python -m rwkv_clip.describe [rewrite|caption|tags|all] --help`. Python: `from rwkv_clip.describe import
describe, caption, tags, describe_all`. Each step is a `Stage` run by `run_step` over three parts, each usable on
its own: read (`RowReader`) -> request (the `Runner`) -> record (`Recorder`, `OutputWriter`, `load_done`).
"""

from rwkv_clip.describe.client import (Backend, FatalBackendError, OpenAIChatClient, RequestFailed,
                                       TransformersBackend, backoff_delay)
from rwkv_clip.describe.core import describe, run_step, write_instruction_data
from rwkv_clip.describe.pipeline import PipelineSummary, caption, describe_all, tags
from rwkv_clip.describe.prompt import DEFAULT_SYSTEM_PROMPT, PromptTemplate, check_answer, clean_answer
from rwkv_clip.describe.read import RowReader
from rwkv_clip.describe.record import OutputPaths, OutputWriter, Recorder, Summary, load_done
from rwkv_clip.describe.request import (CaptionStage, ImageStage, Outcome, RewriteStage, Runner, Stage, TagStage,
                                        TooManyFailures)

__all__ = ["describe", "caption", "tags", "describe_all", "run_step", "PipelineSummary", "CaptionStage",
           "TagStage", "ImageStage", "Summary", "write_instruction_data", "OpenAIChatClient", "TransformersBackend", "Backend",
           "RequestFailed", "FatalBackendError", "backoff_delay", "PromptTemplate", "clean_answer", "check_answer",
           "DEFAULT_SYSTEM_PROMPT", "RowReader", "Stage", "RewriteStage", "Runner", "Outcome", "TooManyFailures",
           "OutputPaths", "OutputWriter", "Recorder", "load_done"]
