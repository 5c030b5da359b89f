"""Encoders — analysis results become DICOM objects (one builder per object)."""
