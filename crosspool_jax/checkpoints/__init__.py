"""Checkpoints: Hugging Face safetensors loading, orbax convert/restore, tokenizer and chat template.

`load_model(path)` reads a Hugging Face folder (config.json, *.safetensors with or without an
index, generation_config.json, tokenizer files) or an orbax folder written by `convert`.
"""
from crosspool_jax.checkpoints.errors import CheckpointError
from crosspool_jax.checkpoints.loader import LoadedModel, Placement, load_model, parse_dtype
from crosspool_jax.checkpoints.tokenizer import TemplateError, Tokenizer, load_tokenizer

__all__ = ["CheckpointError", "LoadedModel", "Placement", "load_model", "parse_dtype",
           "TemplateError", "Tokenizer", "load_tokenizer"]
