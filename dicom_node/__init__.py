"""Lung Vision's DICOM node: receive → spool → complete → queue, plus the SCU that sends results back."""
