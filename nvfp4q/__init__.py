"""nvfp4q: f16/bf16 GGUF -> NVFP4 GGUF for stock llama.cpp, with an imatrix-weighted scale search."""

__version__ = "0.1.0"
