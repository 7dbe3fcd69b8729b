"""`medlora export`: a run directory → a folder other tools load (adapter, merged model, GGUF).

run.py drives an export; merge.py folds LoRA into the base; gguf.py converts for llama.cpp;
card.py writes the model card the export carries; common.py holds the shared names.
"""

from medlora.export.common import DEFAULT_GGUF_TYPE, GGUF_TYPES, ExportError, ExportResult
from medlora.export.gguf import (
    base_gguf,
    convert_lora_to_gguf,
    convert_to_gguf,
    install_llama_cpp_tools,
    llama_cpp_tools_dir,
)
from medlora.export.merge import check_run, load_merged, run_base_spec
from medlora.export.run import cached_gguf, cached_gguf_lora, export_run

__all__ = [
    "DEFAULT_GGUF_TYPE",
    "GGUF_TYPES",
    "ExportError",
    "ExportResult",
    "base_gguf",
    "cached_gguf",
    "cached_gguf_lora",
    "check_run",
    "convert_lora_to_gguf",
    "convert_to_gguf",
    "export_run",
    "install_llama_cpp_tools",
    "llama_cpp_tools_dir",
    "load_merged",
    "run_base_spec",
]
