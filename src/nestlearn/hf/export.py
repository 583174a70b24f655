"""Convert a trained run to a Hugging Face model directory (`nestlearn export RUN --hf OUT`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nestlearn.config.schema import RunConfig
from nestlearn.data.tokenizer import MODEL_FILE as TOKENIZER_FILE
from nestlearn.data.tokenizer import load_tokenizer
from nestlearn.hf.config import NestlearnConfig
from nestlearn.hf.modeling import NestlearnForCausalLM
from nestlearn.hf.tokenizer import NestlearnTokenizer
from nestlearn.loading import LoadedModel, load
from nestlearn.utils.device import resolve_device
from nestlearn.utils.io import atomic_directory, usual_mode


def export_run(path: str | Path, out_dir: str | Path) -> Path:
    """Write the model of a run directory (its newest valid checkpoint) or of one checkpoint
    directory to ``out_dir``: config, safetensors weights, generation config and tokenizer,
    replacing ``out_dir`` in one rename. Returns ``out_dir``; it loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` after ``import nestlearn.hf``."""
    loaded = load(path)
    config = NestlearnConfig.from_model_config(loaded.model.config, eos_token_id=loaded.tokenizer.eos_id,
                                               train_seq_len=loaded.config.train.seq_len)
    model = NestlearnForCausalLM(config, model=loaded.model)
    tokenizer = NestlearnTokenizer(str(loaded.tokenizer.path))
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for file in tmp.iterdir():  # transformers writes the weights private (0600)
            file.chmod(usual_mode(0o666))
    return out_dir


def load_exported(path: str | Path, device: str = "cpu") -> LoadedModel:
    """The nestlearn model and tokenizer of a directory ``export_run`` wrote, as
    `nestlearn.load` returns those of a run (its run config: the defaults, with the model's
    config and the training sequence length the export recorded)."""
    path = Path(path)
    hf = NestlearnForCausalLM.from_pretrained(path)
    model = hf.model.to(resolve_device(device)).eval()
    base = RunConfig()
    seq_len = int(getattr(hf.config, "train_seq_len", None) or model.config.max_seq_len)
    config = dataclasses.replace(base, model=model.config, train=dataclasses.replace(base.train, seq_len=seq_len))
    return LoadedModel(model, load_tokenizer(path / TOKENIZER_FILE), config, path)
