"""memopt's hooks: one file per technique, each a config dataclass, a diffusers ``ModelHook`` and an ``apply_*``."""
