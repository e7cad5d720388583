"""Building a pack version: the editor's table and the scope gate made into pack content
(`edits`), and one version built from facts and an optional previous version under a policy
(`version`: warm start, reuse, quality gate)."""
