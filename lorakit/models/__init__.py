"""Loading base models: the embedded default (SmolLM2-135M-Instruct) or any local Hugging Face folder."""

from lorakit.models.loading import EMBEDDED_MODELS, load_base, resolve_model_folder

__all__ = ["load_base", "resolve_model_folder", "EMBEDDED_MODELS"]
