"""Edit submission and training jobs: the durable store of facts, jobs and published versions,
and the worker that trains, checks and publishes new pack versions."""
