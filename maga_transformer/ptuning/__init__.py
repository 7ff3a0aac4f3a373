"""P-tuning v2 (ChatGLM2/3's prefix encoder): its key/value prefix computed once into KV blocks that
every request's block table starts with (prefix.py); reading the checkpoint (reader.py)."""
