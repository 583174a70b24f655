"""Convert a trained run to a Hugging Face model directory (`nestlearn export RUN --hf OUT`)."""

from __future__ import annotations

from pathlib import Path

from nestlearn.hf.config import NestlearnConfig
from nestlearn.hf.modeling import NestlearnForCausalLM
from nestlearn.hf.tokenizer import NestlearnTokenizer
from nestlearn.loading import load
from nestlearn.utils.io import atomic_directory, usual_mode


def export_run(path: str | Path, out_dir: str | Path) -> Path:
    """Write the model of a run directory (its newest valid checkpoint) or of one checkpoint
    directory to ``out_dir``: config, safetensors weights, generation config and tokenizer,
    replacing ``out_dir`` in one rename. Returns ``out_dir``; it loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` after ``import nestlearn.hf``."""
    loaded = load(path)
    config = NestlearnConfig.from_model_config(loaded.model.config, eos_token_id=loaded.tokenizer.eos_id)
    model = NestlearnForCausalLM(config, model=loaded.model)
    tokenizer = NestlearnTokenizer(str(loaded.tokenizer.path))
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for file in tmp.iterdir():  # transformers writes the weights private (0600)
            file.chmod(usual_mode(0o666))
    return out_dir
