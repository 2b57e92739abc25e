"""CLIP: the visual and textual encoders and the query-text tokenizer."""
