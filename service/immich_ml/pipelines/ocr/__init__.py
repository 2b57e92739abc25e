"""OCR: PP-OCR text detection (boxes) and recognition (lines)."""
