"""Serving: engines (transformers, llama.cpp), a batching scheduler, safety notices, the HTTP app."""
