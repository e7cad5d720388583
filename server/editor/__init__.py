"""The LKS editor core: facts, subject detection and scope, the hypernetwork, the layer split,
the activation cache and training (its config, sequences, precompute and trainer). Facts in, a
trained subject table out. Pure torch; imports only `settings` and `model` from the server
(tests/unit/test_layers.py checks it)."""
