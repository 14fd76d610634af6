"""Diverse description generation: an LLM merges each image's raw web text, synthetic caption and tags into one
faithful `generated_caption`, the third training text of RWKV-CLIP.

CLI: `python -m rwkv_clip.describe --help`. Python: `from rwkv_clip.describe import describe`.
The run is three stages, each usable on its own: read (`RowReader`) -> request (a `Stage` run by the `Runner`)
-> record (`Recorder`, `OutputWriter`, `load_done`).
"""

from rwkv_clip.describe.client import (Backend, FatalBackendError, OpenAIChatClient, RequestFailed,
                                       TransformersBackend, backoff_delay)
from rwkv_clip.describe.core import describe, write_instruction_data
from rwkv_clip.describe.prompt import DEFAULT_SYSTEM_PROMPT, PromptTemplate, check_answer, clean_answer
from rwkv_clip.describe.read import RowReader
from rwkv_clip.describe.record import OutputPaths, OutputWriter, Recorder, Summary, load_done
from rwkv_clip.describe.request import Outcome, RewriteStage, Runner, Stage, TooManyFailures

__all__ = ["describe", "Summary", "write_instruction_data", "OpenAIChatClient", "TransformersBackend", "Backend",
           "RequestFailed", "FatalBackendError", "backoff_delay", "PromptTemplate", "clean_answer", "check_answer",
           "DEFAULT_SYSTEM_PROMPT", "RowReader", "Stage", "RewriteStage", "Runner", "Outcome", "TooManyFailures",
           "OutputPaths", "OutputWriter", "Recorder", "load_done"]
