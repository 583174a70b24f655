"""Hugging Face `transformers` wrappers for every registered nestlearn model (extra `hf`).

Importing this package registers them with the auto classes, so after `import nestlearn.hf`
a directory written by `export_run` (or `save_pretrained`) loads offline with
`AutoConfig`, `AutoModelForCausalLM` and `AutoTokenizer`, without `trust_remote_code`.
Nothing else in nestlearn imports transformers.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nestlearn.hf.config import NestlearnConfig
from nestlearn.hf.export import export_run
from nestlearn.hf.modeling import NestlearnCache, NestlearnForCausalLM
from nestlearn.hf.tokenizer import NestlearnTokenizer

AutoConfig.register(NestlearnConfig.model_type, NestlearnConfig)
AutoModelForCausalLM.register(NestlearnConfig, NestlearnForCausalLM)
AutoTokenizer.register(NestlearnConfig, tokenizer_class=NestlearnTokenizer)  # type: ignore[no-untyped-call]

__all__ = ["NestlearnCache", "NestlearnConfig", "NestlearnForCausalLM", "NestlearnTokenizer",
           "export_run"]
