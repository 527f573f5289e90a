"""The policy file: a typed, frozen model, and a loader whose every complaint names file, line and key path.

The model below *is* the contract: each field's type, default and ``doc`` drive validation here, the JSON
Schema (``proxy.policy.schema``) and ``sidecar explain``. Loading goes:

    text ──${ENV} substitution──▶ YAML nodes (with line marks) ──defaults merged per upstream──▶ dataclasses
                                                             └──▶ cross-field rules ──▶ SidecarConfig

Durations are ``"250ms"``, ``"1s"``, ``"2m"``, ``"1h"`` or a number of seconds. Unknown keys are errors (with a
"did you mean" hint), never ignored.
"""
