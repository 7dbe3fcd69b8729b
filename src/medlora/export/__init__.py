"""`medlora export`: a run directory → a folder other tools load (adapter, merged model, GGUF).

run.py drives an export; merge.py folds LoRA into the base; gguf.py converts for llama.cpp;
card.py writes the model card the export carries; common.py holds the shared names.
"""
