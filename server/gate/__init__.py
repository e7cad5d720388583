"""The scope gate: the sentence encoder, the opening rule, the gate table and the relation head
(whose fitted weights ship as relation_head.safetensors beside it)."""
