"""Scoring students: agreement with the teacher, image linear probes, text downstream tasks."""
