"""Diverse description generation (DESIGN §1): an LLM merges each image's raw web text, synthetic caption and
tags into one faithful `generated_caption`, the third training text of RWKV-CLIP.

CLI: `python -m rwkv_clip.describe --help`. Python: `from rwkv_clip.describe import describe`.
"""

from rwkv_clip.describe.client import (Backend, FatalBackendError, OpenAIChatClient, RequestFailed,
                                       TransformersBackend, backoff_delay)
from rwkv_clip.describe.core import Summary, describe, write_instruction_data
from rwkv_clip.describe.prompt import (DEFAULT_SYSTEM_PROMPT, PromptTemplate, check_answer, clean_answer,
                                       normalize_tags)

__all__ = ["describe", "Summary", "write_instruction_data", "OpenAIChatClient", "TransformersBackend", "Backend",
           "RequestFailed", "FatalBackendError", "backoff_delay", "PromptTemplate", "clean_answer", "check_answer",
           "normalize_tags", "DEFAULT_SYSTEM_PROMPT"]
