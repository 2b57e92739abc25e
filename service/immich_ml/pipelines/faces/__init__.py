"""Faces: SCRFD detection and ArcFace recognition with alignment."""
