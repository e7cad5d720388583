"""The scope gate: the sentence encoder (encoder), the opening rule (rule), the gate table
(table), the relation head (relation_head, whose fitted weights ship as
relation_head.safetensors beside it) and the gate they make (scope_gate)."""
