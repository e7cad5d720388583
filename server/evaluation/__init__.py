"""Evaluating edits: teacher-forced and generated metrics over benchmark items, and the
benchmark datasets they are read from."""
